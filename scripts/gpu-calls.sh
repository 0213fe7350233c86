#!/usr/bin/env bash
# On the GPU machine: where the host spends a `verdict bench` run. Runs the bench with
# VERDICT_TIMING=1 (one line per batch: forward queued / results back) under an
# LD_PRELOAD shim (scripts/cuda_calls.c) that times each CUDA driver and cuBLAS call
# the binary makes, and prints the per-call table at exit.
#   scripts/gpu-calls.sh SHAPE [PROMPTS] [extra bench args...]
# Environment passes through (e.g. VERDICT_CUDA_POOL=0 VERDICT_CUDA_EVENTS=1).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu-env.sh ""
shape=${1:-qwen2.5-0.5b}; n=${2:-512}; shift 2 || shift $#
shim=/tmp/cuda_calls.so
[ -f "$shim" ] || gcc -O2 -shared -fPIC -o "$shim" scripts/cuda_calls.c -ldl
VERDICT_TIMING=1 LD_PRELOAD=$shim "$VERDICT_BIN" bench --shape "$shape" --num-prompts "$n" \
    --device cuda --dtype bfloat16 --cache-dir /tmp/verdict-bench --repeat 2 --json "$@"
