#!/usr/bin/env bash
# Installs the transformers peer for bench/compare-cpu.sh: the current torch and
# transformers from PyPI in a venv (default /opt/torchenv; ~5 GB, torch's wheel
# carries CUDA libraries even when run on the CPU).
set -euo pipefail
VENV=${PEER_VENV:-/opt/torchenv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch transformers
"$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
