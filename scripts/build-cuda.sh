#!/usr/bin/env bash
# Builds the CUDA binary of verdict without a GPU or a system CUDA toolkit:
# NVIDIA's CUDA 13.0 wheels from PyPI provide nvcc, the headers and the libraries,
# and a stub libcuda.so (the driver library, which no package ships) satisfies the
# linker; the real driver replaces it at run time.
#
#   scripts/build-cuda.sh            # -> target-cuda/release/verdict (stripped)
#                                    #    and target-cuda/verdict.xz (to carry to a GPU machine)
#
# Environment: CUDA_VENV (default $HOME/.cache/verdict/cuda-venv),
# CUDA_COMPUTE_CAP (default 90: Hopper, H100/H200), CARGO_TARGET_DIR (default target-cuda).
# Run the result on the GPU machine with
#   LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib target-cuda/release/verdict ...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${CUDA_VENV:-$HOME/.cache/verdict/cuda-venv}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}

# 1. The toolkit, pinned to 13.0.x: cudarc refuses newer nvcc, and driver 580 (CUDA 13.0)
#    cannot load PTX from a newer one.
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.1.0.3 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
export CUDA_ROOT=$SITE/nvidia/cu13
export CUDA_HOME=$CUDA_ROOT CUDA_PATH=$CUDA_ROOT CUDARC_CUDA_VERSION=13000
export PATH=$CUDA_ROOT/bin:$PATH

# 2. Unversioned names for the linker.
for lib in cublas cublasLt curand nvrtc cudart; do
    target=$(cd "$CUDA_ROOT/lib" && ls "lib$lib.so."* 2>/dev/null | sort | head -n1 || true)
    [ -n "$target" ] || { echo "build-cuda: lib$lib.so.* missing in $CUDA_ROOT/lib" >&2; exit 1; }
    ln -sf "$target" "$CUDA_ROOT/lib/lib$lib.so"
done

# 3. A stub libcuda.so.1 defining every driver symbol cudarc declares.
cargo fetch --locked >/dev/null 2>&1 || cargo fetch >/dev/null
CUDARC_VERSION=$(awk '/^name = "cudarc"/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
CUDARC_CRATE=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "cudarc-$CUDARC_VERSION.crate" | head -n1)
[ -n "$CUDARC_CRATE" ] || { echo "build-cuda: cudarc-$CUDARC_VERSION.crate not in the cargo cache" >&2; exit 1; }
CUDARC_SRC=$(mktemp -d)
trap 'rm -rf "$CUDARC_SRC"' EXIT
tar xzf "$CUDARC_CRATE" -C "$CUDARC_SRC" --strip-components=1
STUBS=$CUDA_ROOT/lib/stubs
mkdir -p "$STUBS"
if [ ! -f "$STUBS/libcuda.so" ]; then
    grep -rhoE 'pub (unsafe )?fn (cu[A-Za-z0-9_]+)' "$CUDARC_SRC/src/driver/sys/" \
        | sed -E 's/pub (unsafe )?fn //' | sort -u \
        | awk '{ printf "int %s(void) { return 0; }\n", $1 }' > "$STUBS/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/libcuda_stub.c"
    ln -sf libcuda.so "$STUBS/libcuda.so.1"
fi
export LIBRARY_PATH=$CUDA_ROOT/lib:$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}

# 4. Build, strip, and compress a copy for `device`'s carry (the stripped binary is
#    ~60 MB, mostly candle's PTX; xz brings it to ~10 MB).
cargo build --release --locked -p verdict --features cuda
BIN=$CARGO_TARGET_DIR/release/verdict
strip "$BIN"
xz -T0 -6 -c "$BIN" > "$CARGO_TARGET_DIR/verdict.xz"
ls -la "$BIN" "$CARGO_TARGET_DIR/verdict.xz" >&2
echo "$BIN"
