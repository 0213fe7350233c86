#!/usr/bin/env bash
# verdict vs Hugging Face transformers on the "mixed" workload, same machine,
# same run, alternating: transformers sorted, transformers arrival, verdict.
# Usage: bench/compare-cpu.sh [shape:prompts ...]   (default: minilm-l6:512 bert-base:256 qwen2.5-0.5b:64)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PEER_PYTHON:-/opt/torchenv/bin/python}
VERDICT=${VERDICT:-target/release/verdict}
[ -x "$VERDICT" ] || cargo build --release -p verdict
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(minilm-l6:512 bert-base:256 qwen2.5-0.5b:64)
printf '%-14s %8s %12s %12s %12s %9s %9s %10s\n' shape prompts hf-sorted hf-arrival verdict "x sorted" "x arrival" "RSS MB"
for spec in "${specs[@]}"; do
    shape=${spec%%:*}; n=${spec##*:}
    sorted=$("$PY" bench/transformers_bench.py --shape "$shape" --mode sorted --num-prompts "$n" --json | tail -1)
    arrival=$("$PY" bench/transformers_bench.py --shape "$shape" --mode arrival --num-prompts "$n" --json | tail -1)
    ours=$("$VERDICT" bench --shape "$shape" --num-prompts "$n" --device cpu --repeat 2 --json | tail -1)
    python3 - "$shape" "$n" "$sorted" "$arrival" "$ours" <<'PYEOF'
import json, sys
shape, n, s, a, v = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
# Best of the repeated runs for every system (the first includes warm-up effects).
ts, ta, tv = (r.get("best_tokens_per_s", r["tokens_per_s"]) for r in (s, a, v))
print(f"{shape:<14} {n:>8} {ts:>12.0f} {ta:>12.0f} {tv:>12.0f} {tv/ts:>9.2f} {tv/ta:>9.2f} {v['peak_rss_mb']:>10.0f}")
PYEOF
done
