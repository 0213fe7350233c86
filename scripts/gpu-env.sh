# Sourced by the gpu-*.sh scripts: finds the CUDA binary (unpacking the carried
# target-cuda/verdict.xz when the binary itself did not travel) into VERDICT_BIN,
# and puts the CUDA 13 libraries on LD_LIBRARY_PATH.
VERDICT_BIN=${1:-${VERDICT_BIN:-target-cuda/release/verdict}}
if [ ! -x "$VERDICT_BIN" ]; then
    [ -f target-cuda/verdict.xz ] || { echo "no $VERDICT_BIN and no target-cuda/verdict.xz" >&2; exit 1; }
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        target-cuda/verdict.xz /tmp/verdict-cuda
    chmod +x /tmp/verdict-cuda
    VERDICT_BIN=/tmp/verdict-cuda
fi
export VERDICT_BIN
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
