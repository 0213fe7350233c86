#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a short time from its committed
# seeds (fuzz/seeds/<target>/) and fails on the first crash, leaving the input
# that caused it under fuzz/artifacts/<target>/.
#   VERDICT_FUZZ_SECONDS  seconds per target (default 20; 0 skips fuzzing)
#   VERDICT_FUZZ_TARGETS  space-separated targets to run (default: all)
#   VERDICT_FUZZ=0        skip (as VERDICT_FUZZ_SECONDS=0)
#   VERDICT_FUZZ_SEED     libFuzzer's seed (default 1: CI replays the inputs a run here
#                         did; 0 picks a new one each run, for exploring)
# Needs a nightly toolchain (libFuzzer's sanitizer flags); without one it says so
# and skips. cargo-fuzz is installed with `cargo install` when missing. The sanitized
# build is one more build of the engine (its own target directory, fuzz/target).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=${VERDICT_FUZZ_SECONDS:-20}
if [ "$seconds" = 0 ]; then
    echo "fuzz: skipped (VERDICT_FUZZ_SECONDS=0)"
    exit 0
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: skipped: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if [ "${VERDICT_FUZZ:-1}" = 0 ]; then
    echo "fuzz: skipped (VERDICT_FUZZ=0)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# One build for every target; the runs below reuse it.
started=$(date +%s)
cargo +nightly fuzz build
echo "fuzz: built all targets in $(( $(date +%s) - started )) s"

targets=${VERDICT_FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
for target in $targets; do
    # The seeds stay as committed: each run grows a scratch copy.
    corpus=$(mktemp -d)
    cp -r "seeds/$target/." "$corpus/"
    echo "fuzz: $target for ${seconds} s"
    if ! cargo +nightly fuzz run "$target" "$corpus" -- \
        -seed="${VERDICT_FUZZ_SEED:-1}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 \
        2>"$corpus.log"; then
        tail -n 60 "$corpus.log"
        echo "fuzz: $target CRASHED; the input is under fuzz/artifacts/$target/"
        rm -rf "$corpus" "$corpus.log"
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|Done )' "$corpus.log" || true
    rm -rf "$corpus" "$corpus.log"
done
