#!/usr/bin/env bash
# Builds verdict's container image from host-built files: no base image, no registry,
# no compiler in the build (see Containerfile for the layers).
#
#   scripts/build-image.sh                # CPU image verdict:latest from target/release/verdict
#                                         # (runs `cargo build --release --locked` first)
#   scripts/build-image.sh --cuda         # GPU image verdict:cuda from target-cuda/release/verdict
#                                         # (build that with scripts/build-cuda.sh first)
# Options:
#   --with-ffmpeg   add the pinned static ffmpeg (scripts/setup-ffmpeg.sh, ~170 MB) for video
#   --tag NAME      image name (default verdict:latest, verdict:cuda)
#   --stage-only    stage the build context, check it against the Containerfile, print its path
# Prints the image name on stdout (progress on stderr).
#
# Environment: VERDICT_BIN (package this binary instead), CONTAINER_ENGINE (podman or
# docker; default: podman if present), CUDA_VENV (the venv of scripts/build-cuda.sh,
# default $HOME/.cache/verdict/cuda-venv), BUSYBOX (a static busybox to use instead of
# Debian's busybox-static package), VERDICT_HOME (cache of the default model).
# Needs ldd (glibc host; the image gets the host's copies of the libraries the binary
# was linked against) and, unless BUSYBOX is set, apt-get (Debian or Ubuntu).
set -euo pipefail
export LC_ALL=C
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '%s\n' "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

variant=cpu with_ffmpeg=0 stage_only=0 tag=
while [ $# -gt 0 ]; do
    case $1 in
    --cuda) variant=cuda ;;
    --with-ffmpeg) with_ffmpeg=1 ;;
    --stage-only) stage_only=1 ;;
    --tag) [ $# -ge 2 ] || die "--tag needs a value"; tag=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

if [ "$variant" = cpu ]; then
    containerfile=Containerfile
    tag=${tag:-verdict:latest}
    if [ -z "${VERDICT_BIN:-}" ]; then
        log "cargo build --release --locked"
        cargo build --release --locked >&2
    fi
    bin=${VERDICT_BIN:-target/release/verdict}
else
    containerfile=Containerfile.cuda
    tag=${tag:-verdict:cuda}
    bin=${VERDICT_BIN:-target-cuda/release/verdict}
    if [ ! -x "$bin" ] && [ -z "${VERDICT_BIN:-}" ] && [ -f target-cuda/verdict.xz ]; then
        log "unpacking target-cuda/verdict.xz"
        mkdir -p -- "$(dirname -- "$bin")"
        xz -dc target-cuda/verdict.xz >"$bin.part" && chmod 755 "$bin.part" && mv -f "$bin.part" "$bin"
    fi
    VENV=${CUDA_VENV:-$HOME/.cache/verdict/cuda-venv}
    [ -x "$VENV/bin/python" ] || die "no CUDA venv at $VENV; run scripts/build-cuda.sh (it installs the pinned CUDA wheels)"
    CUDA_LIB=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/nvidia/cu13/lib
    [ -d "$CUDA_LIB" ] || die "$CUDA_LIB missing; run scripts/build-cuda.sh"
fi
[ -x "$bin" ] || die "no binary at $bin (${variant}: $([ "$variant" = cpu ] && echo 'cargo build --release --locked' || echo 'scripts/build-cuda.sh'))"

# True when $1 needs no shared library (busybox and ldconfig must not).
is_static() {
    local out
    out=$(ldd "$1" 2>&1 || true)
    case $out in *"not a dynamic executable"* | *"statically linked"*) return 0 ;; *) return 1 ;; esac
}

ctx=target/image/$variant
rm -rf -- "$ctx"
mkdir -p -- "$ctx/rootfs/bin" "$ctx/rootfs/etc" "$ctx/rootfs/tmp" "$ctx/model" "$ctx/ffmpeg"
[ "$variant" = cpu ] || mkdir -p -- "$ctx/cuda"
chmod 1777 "$ctx/rootfs/tmp"
# Symbols only make the image bigger (panics still name their source line).
if command -v strip >/dev/null; then strip -o "$ctx/verdict" "$bin"; else cp -- "$bin" "$ctx/verdict"; fi

# 1. The shared libraries of $1, at the paths ldd resolves them to (the dynamic loader
#    included). CUDA libraries go to cuda/; the driver library (libcuda.so.1) is left
#    to the NVIDIA container toolkit.
copy_libs() {
    local file=$1 ldpath='' deps name arrow path _
    [ "$variant" = cpu ] || ldpath=$CUDA_LIB
    deps=$(LD_LIBRARY_PATH=$ldpath ldd "$file") || die "ldd $file failed (a dynamically linked glibc binary is expected)"
    while read -r name arrow path _; do
        if [ "$arrow" != "=>" ]; then
            case $name in /*) path=$name ;; *) continue ;; esac # the loader; the vDSO has no file
        fi
        case $name in libcuda.so.*) continue ;; esac
        [ -f "$path" ] || die "$file needs $name, which ldd cannot resolve ($path)"
        if [ "$variant" = cuda ] && [ "${path#"$CUDA_LIB"/}" != "$path" ]; then
            cp -L -- "$path" "$ctx/cuda/$name"
        else
            mkdir -p -- "$ctx/rootfs$(dirname -- "$path")"
            cp -L -- "$path" "$ctx/rootfs$path"
        fi
    done <<<"$deps"
}
copy_libs "$ctx/verdict"
if [ "$variant" = cuda ]; then
    # libnvrtc opens its builtins library itself when it compiles.
    for f in "$CUDA_LIB"/libnvrtc-builtins.so.*; do
        if [ -f "$f" ]; then cp -L -- "$f" "$ctx/cuda/"; fi
    done
    # The NVIDIA container hook adds the host's driver library and then runs the
    # image's ldconfig so that the loader finds it.
    ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
    is_static "$ldconfig" || die "$ldconfig is not statically linked"
    mkdir -p -- "$ctx/rootfs/sbin" "$ctx/rootfs/etc/ld.so.conf.d"
    cp -- "$ldconfig" "$ctx/rootfs/sbin/ldconfig"
    printf 'include /etc/ld.so.conf.d/*.conf\n' >"$ctx/rootfs/etc/ld.so.conf"
    printf '/usr/local/cuda/lib\n/usr/lib64\n/usr/lib/x86_64-linux-gnu\n' >"$ctx/rootfs/etc/ld.so.conf.d/verdict.conf"
fi

# 2. busybox: wget for HEALTHCHECK, a shell for `exec -it ... sh`.
if [ -n "${BUSYBOX:-}" ]; then
    busybox=$BUSYBOX
else
    command -v apt-get >/dev/null || die "no apt-get to fetch busybox-static; set BUSYBOX to a static busybox"
    debs=${VERDICT_HOME:-$HOME/.cache/verdict}/image-debs
    mkdir -p -- "$debs"
    chmod 777 "$debs" # apt-get download drops privileges to its own user
    version=$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: //p')
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then die "apt has no busybox-static (run apt-get update)"; fi
    busybox=$debs/busybox-$version
    if [ ! -x "$busybox" ]; then
        log "fetching busybox-static $version"
        tmp=$(mktemp -d "$debs/.deb.XXXXXX")
        chmod 777 "$tmp"
        (cd "$tmp" && apt-get download -q "busybox-static=$version" >&2) || die "apt-get download busybox-static failed"
        dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/x"
        mv -f -- "$tmp/x/bin/busybox" "$busybox"
        rm -rf -- "$tmp"
    fi
fi
is_static "$busybox" || die "$busybox is not a static busybox"
"$busybox" wget --help >/dev/null 2>&1 || die "$busybox has no wget applet"
cp -- "$busybox" "$ctx/rootfs/bin/busybox"
ln -s busybox "$ctx/rootfs/bin/sh"

# 3. The unprivileged user (uid 10001, numeric in the Containerfile so that Kubernetes'
#    runAsNonRoot can check it), and name lookups through files first.
printf 'root:x:0:0:root:/root:/sbin/nologin\nverdict:x:10001:10001:verdict:/tmp:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nverdict:x:10001:\n' >"$ctx/rootfs/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$ctx/rootfs/etc/nsswitch.conf"

# 4. The default model, links resolved (the image has no cache folder to point into).
model=$(scripts/setup-default-model.sh)
cp -L -- "$model"/* "$ctx/model/"

# 5. ffmpeg, only when asked: it is 170 MB and only video inputs of vision-language
#    models use it. The pinned build (it links only glibc), not whatever PATH has.
if [ "$with_ffmpeg" = 1 ]; then
    ffmpeg=$(env -u VERDICT_FFMPEG VERDICT_FFMPEG_FORCE_WHEEL=1 scripts/setup-ffmpeg.sh)
    cp -- "$ffmpeg" "$ctx/ffmpeg/ffmpeg"
    copy_libs "$ctx/ffmpeg/ffmpeg"
fi
log "libraries: $(cd "$ctx" && find rootfs cuda -name '*.so*' 2>/dev/null | sed 's,.*/,,' | sort | tr '\n' ' ')"

# Every COPY source of the Containerfile must be in the context (a check that needs
# no container engine).
read -r -a sources <<<"$(sed -n 's/^COPY \([^ ]*\) .*/\1/p' "$containerfile" | tr '\n' ' ')"
for s in "${sources[@]}"; do
    [ -e "$ctx/$s" ] || die "$containerfile copies $s, which the staged context lacks"
done
log "context $ctx: $(du -sh "$ctx" | cut -f1) (${sources[*]})"
if [ "$stage_only" = 1 ]; then
    printf '%s\n' "$ctx"
    exit 0
fi

engine=${CONTAINER_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
command -v "$engine" >/dev/null || die "no podman or docker (or use --stage-only)"
# podman writes OCI images unless told otherwise, and OCI has no HEALTHCHECK.
format=()
[ "$(basename "$engine")" = podman ] && format=(--format docker)
"$engine" build "${format[@]}" -f "$containerfile" -t "$tag" "$ctx" >&2
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
log "built $tag: $((size / 1000000)) MB"
printf '%s\n' "$tag"
