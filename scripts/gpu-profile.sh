#!/usr/bin/env bash
# On the GPU machine: where a `verdict bench` batch spends GPU time. Nsight Compute
# times each kernel of a window of launches (past the warm-up); a table sums them by name.
#   scripts/gpu-profile.sh SHAPE [PROMPTS] [SKIP] [COUNT]
# BENCH_ARGS adds `verdict bench` options (e.g. "--lora-adapters 8", with a SKIP past
# the first base-model run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu-env.sh ""
shape=${1:-qwen2.5-1.5b}; n=${2:-128}; skip=${3:-1000}; count=${4:-2000}
csv=${PROFILE_CSV:-/tmp/ncu-$shape.csv}
ncu --metrics gpu__time_duration.sum --launch-skip "$skip" --launch-count "$count" \
    --cache-control none --clock-control none --csv --log-file "$csv" \
    "$VERDICT_BIN" bench --shape "$shape" --num-prompts "$n" --device cuda --dtype bfloat16 \
    --cache-dir /tmp/verdict-bench ${BENCH_ARGS:-} >/dev/null
python3 - "$csv" <<'PY'
import csv, collections, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
head = rows[0]
name_i, unit_i, val_i = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
tot, cnt = collections.Counter(), collections.Counter()
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
for r in rows[1:]:
    name = r[name_i].split("(")[0][:70]
    tot[name] += float(r[val_i].replace(",", "")) * scale.get(r[unit_i], 1.0)
    cnt[name] += 1
all_us = sum(tot.values())
print(f"{len(rows) - 1} kernels, {all_us / 1e3:.1f} ms of GPU time")
for name, us in tot.most_common(30):
    print(f"{us / 1e3:9.2f} ms {100 * us / all_us:5.1f}% {cnt[name]:6d}x  {name}")
PY
