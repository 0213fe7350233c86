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
# ROUNDS (default 2) repeats the three runs in turn and keeps each system's best: on a
# small shared machine one run to the next varies by up to ~10% (the verdict run
# right after the transformers ones was the slow one more often than not).
ROUNDS=${ROUNDS:-2}
for spec in "${specs[@]}"; do
    shape=${spec%%:*}; n=${spec##*:}
    runs=()
    for _ in $(seq "$ROUNDS"); do
        runs+=("sorted $("$PY" bench/transformers_bench.py --shape "$shape" --mode sorted --num-prompts "$n" --json | tail -1)")
        runs+=("arrival $("$PY" bench/transformers_bench.py --shape "$shape" --mode arrival --num-prompts "$n" --json | tail -1)")
        runs+=("verdict $("$VERDICT" bench --shape "$shape" --num-prompts "$n" --device cpu --repeat 2 --json | tail -1)")
    done
    printf '%s\n' "${runs[@]}" | python3 -c '
import json, sys
shape, n = sys.argv[1], sys.argv[2]
best, rss = {}, 0
for line in sys.stdin:
    system, report = line.split(" ", 1)
    r = json.loads(report)
    # Best of the repeated runs for every system (the first includes warm-up effects).
    best[system] = max(best.get(system, 0), r.get("best_tokens_per_s", r["tokens_per_s"]))
    if system == "verdict":
        rss = max(rss, r["peak_rss_mb"])
ts, ta, tv = best["sorted"], best["arrival"], best["verdict"]
print(f"{shape:<14} {n:>8} {ts:>12.0f} {ta:>12.0f} {tv:>12.0f} {tv/ts:>9.2f} {tv/ta:>9.2f} {rss:>10.0f}")
' "$shape" "$n"
done
