#!/usr/bin/env bash
# On the GPU machine: verdict vs transformers (bf16, sdpa) on the "mixed"
# workload, sorted and arrival modes, same machine, same call.
#   scripts/gpu-bench.sh [shape:prompts ...]
# Each run appends one JSON line (with a "run" label) to $BENCH_LOG (default
# /tmp/gpu-bench.jsonl); a table follows. VERDICT_MODES="auto loop" runs verdict once
# per attention path (VERDICT_CUDA_ATTN); PEERS=0 skips transformers.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu-env.sh ""
PY=${PEER_PYTHON:-python3}
LOG=${BENCH_LOG:-/tmp/gpu-bench.jsonl}
MODES=${VERDICT_MODES:-auto}
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(bert-base:1024 qwen2.5-0.5b:1024 qwen2.5-1.5b:1024 qwen2.5-7b:512 gemma2-2b:512)
label() {
    python3 -c 'import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        print(json.dumps({**json.loads(line), "run": sys.argv[1]}), flush=True)' "$1" | tee -a "$LOG"
}
for spec in "${specs[@]}"; do
    shape=${spec%%:*}; n=${spec##*:}
    echo "== $shape ($n prompts)" >&2
    for m in $MODES; do
        VERDICT_CUDA_ATTN=$m "$VERDICT_BIN" bench --shape "$shape" --num-prompts "$n" --device cuda \
            --dtype bfloat16 --cache-dir /tmp/verdict-bench --repeat 2 --json | label "verdict-$m"
    done
    if [ "${PEERS:-1}" != 0 ]; then
        for mode in sorted arrival; do
            "$PY" bench/transformers_bench.py --shape "$shape" --num-prompts "$n" --device cuda \
                --dtype bfloat16 --attn sdpa --mode "$mode" --budget 32768 --batch-size 32 --json \
                | label "transformers-$mode"
        done
    fi
done
python3 - "$LOG" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    tps = r.get("best_tokens_per_s", r["tokens_per_s"])
    by.setdefault(r["shape"], {})[r["run"]] = tps
print(f"{'shape':<14} {'run':<22} {'tokens/s':>10} {'x sorted':>9} {'x arrival':>10}")
for shape, runs in by.items():
    s, a = runs.get("transformers-sorted"), runs.get("transformers-arrival")
    for run, tps in runs.items():
        xs = f"{tps / s:.2f}" if s else "-"
        xa = f"{tps / a:.2f}" if a else "-"
        print(f"{shape:<14} {run:<22} {tps:>10.0f} {xs:>9} {xa:>10}")
PY
