#!/usr/bin/env bash
# On the GPU machine: every fixture through the CUDA binary, float32 (within 1e-4 of
# transformers) and bfloat16 (within 1e-2), printing a table; exits non-zero on a miss.
#   scripts/gpu-parity.sh [BINARY]        # default: target-cuda/release/verdict,
#                                         # else target-cuda/verdict.xz unpacked
# VERDICT_PARITY_ONLY=REGEX runs only the rows it matches (e.g. "lora", "deberta").
# VERDICT_CUDA_ATTN=loop|rows|auto picks the attention path (see layers/cuda_attention.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/gpu-env.sh "${1:-}"
python3 scripts/gpu_parity.py "$VERDICT_BIN"
