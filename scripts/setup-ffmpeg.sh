#!/usr/bin/env bash
# Make an ffmpeg binary available for video inputs and print its path on stdout
# (progress goes to stderr). verdict looks for ffmpeg in this order:
#   $VERDICT_FFMPEG, ${VERDICT_HOME:-$HOME/.cache/verdict}/ffmpeg/bin/ffmpeg, PATH.
#
# 1. $VERDICT_FFMPEG or an ffmpeg on PATH that is recent enough (5.1+, for
#    -fps_mode): nothing to do.
# 2. Otherwise the static ffmpeg shipped inside the Python wheel
#    imageio-ffmpeg==0.8.1 (ffmpeg 9.0.2, LGPL/GPL build) is fetched with
#    `pip download`, checked by sha256, and its binary is copied to
#    ${VERDICT_HOME:-$HOME/.cache/verdict}/ffmpeg/bin/ffmpeg. No root needed.
#    (The wheel has no ffprobe; verdict reads stream facts with ffmpeg alone.)
#
# Idempotent; works from any directory. Needs bash, coreutils, and either unzip
# or python3; python3 + pip only to download the wheel.
# Environment:
#   VERDICT_HOME          cache root (default: $HOME/.cache/verdict)
#   VERDICT_FFMPEG        use this binary; nothing is installed
#   VERDICT_FFMPEG_WHEEL  use this local copy of the wheel instead of downloading
#                         it (still checked by sha256)
#   VERDICT_FFMPEG_FORCE_WHEEL=1  install the wheel's ffmpeg even if PATH has one
#   PYTHON                interpreter for `-m pip download` (default python3)
set -euo pipefail
export LC_ALL=C

VERSION=0.8.1
REQ=imageio-ffmpeg==$VERSION
case "$(uname -s)-$(uname -m)" in
Linux-x86_64)
    WHEEL_NAME=imageio_ffmpeg-$VERSION-py3-none-manylinux_2_28_x86_64.whl
    WHEEL_SHA256=050d6850601c3b3890bd2b28306f3b842b3daea390a561101174375a1c460bda
    MEMBER=imageio_ffmpeg/binaries/ffmpeg-linux-x86_64-v9.0.2
    PLATFORM=manylinux_2_28_x86_64
    ;;
Linux-aarch64)
    WHEEL_NAME=imageio_ffmpeg-$VERSION-py3-none-manylinux_2_28_aarch64.whl
    WHEEL_SHA256=fad3176f859b25869e60a8ed79957d4e3ed74a97a95e5f0cdcb91455f6c6d00e
    MEMBER=imageio_ffmpeg/binaries/ffmpeg-linux-aarch64-v9.0.2
    PLATFORM=manylinux_2_28_aarch64
    ;;
*) WHEEL_NAME= ;;
esac

HOME_DIR=${VERDICT_HOME:-$HOME/.cache/verdict}
WHEELS=$HOME_DIR/wheels
DEST=$HOME_DIR/ffmpeg
BIN=$DEST/bin/ffmpeg
STAMP="$REQ ${WHEEL_SHA256:-}"

log() { printf '%s\n' "setup-ffmpeg: $*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=lib/pinned-wheel.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/pinned-wheel.sh"

# True when $1 runs and is ffmpeg 5.1 or newer (or a git build).
usable() {
    local v major minor
    v=$("$1" -hide_banner -version 2>/dev/null | sed -n '1s/^ffmpeg version \([^ ]*\).*/\1/p') || return 1
    [ -n "$v" ] || return 1
    v=${v#n}
    case $v in
    [0-9]*.[0-9]*)
        major=${v%%.*}
        minor=${v#*.}
        minor=${minor%%[!0-9]*}
        [ "$major" -gt 5 ] || { [ "$major" -eq 5 ] && [ "${minor:-0}" -ge 1 ]; }
        ;;
    *) return 0 ;; # N-12345-g... git builds
    esac
}

if [ -n "${VERDICT_FFMPEG:-}" ]; then
    usable "$VERDICT_FFMPEG" || die "VERDICT_FFMPEG=$VERDICT_FFMPEG does not run as ffmpeg 5.1+"
    printf '%s\n' "$VERDICT_FFMPEG"
    exit 0
fi
if [ -x "$BIN" ] && [ "$(cat "$DEST/.installed" 2>/dev/null)" = "$STAMP" ] && usable "$BIN"; then
    printf '%s\n' "$BIN"
    exit 0
fi
if [ "${VERDICT_FFMPEG_FORCE_WHEEL:-0}" != 1 ] && command -v ffmpeg >/dev/null 2>&1 && usable "$(command -v ffmpeg)"; then
    log "using $(command -v ffmpeg) from PATH"
    command -v ffmpeg
    exit 0
fi
[ -n "$WHEEL_NAME" ] || die "no pinned ffmpeg for $(uname -s)-$(uname -m); install ffmpeg 5.1+ on PATH or set VERDICT_FFMPEG"

mkdir -p -- "$WHEELS" "$DEST"
WHEEL=$WHEELS/$WHEEL_NAME
log "fetching $REQ ($PLATFORM, about 65 MB) unless cached"
fetch_pinned_wheel "$WHEELS" "$WHEEL_NAME" "$WHEEL_SHA256" "$REQ" "${VERDICT_FFMPEG_WHEEL:-}" \
    --platform "$PLATFORM" --python-version 3.12

log "extracting ffmpeg from $WHEEL_NAME"
mkdir -p -- "$DEST/bin"
part=$(mktemp "$DEST/bin/.ffmpeg.XXXXXX")
trap 'rm -f -- "$part"' EXIT
if command -v unzip >/dev/null 2>&1; then
    unzip -p -- "$WHEEL" "$MEMBER" >"$part"
else
    "${PYTHON:-python3}" -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$WHEEL" "$MEMBER" "$part"
fi
chmod 755 -- "$part"
usable "$part" || die "the extracted ffmpeg does not run"
mv -f -- "$part" "$BIN"
trap - EXIT
printf '%s\n' "$STAMP" >"$DEST/.installed"
log "installed $BIN"
printf '%s\n' "$BIN"
