#!/usr/bin/env bash
# Builds the Python wheel (maturin, abi3, manylinux), installs it into a venv with
# the test tools (numpy, pytest, pyarrow, Ray on CPU, tqdm; python/requirements-test.txt)
# and runs python/tests against the installed package, not the source tree.
#
#   VERDICT_PYTHON_ENV     the venv (default: $VERDICT_HOME/python-env, kept between runs)
#   VERDICT_WHEEL_PROFILE  cargo profile of the wheel: release, dev, or auto (default:
#                          release when a release build is there, as after the container
#                          test's, else dev, which reuses `cargo test`'s build)
#   PYTHON                 the interpreter that creates the venv (default: python3)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

home=${VERDICT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/verdict}
venv=${VERDICT_PYTHON_ENV:-$home/python-env}
profile=${VERDICT_WHEEL_PROFILE:-auto}
if [ "$profile" = auto ]; then
    profile=$([ -x target/release/verdict ] && echo release || echo dev)
fi

if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
# Installs only what is missing or at another version.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt

wheels=$repo/target/wheels
rm -f "$wheels"/verdict-*.whl
"$venv/bin/maturin" build --quiet --locked --profile "$profile" \
    --manifest-path python/Cargo.toml --out "$wheels" --interpreter "$venv/bin/python"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheels"/verdict-*.whl

# From outside the repository, so `import verdict` can only find the installed package.
cd "$(mktemp -d)"
VERDICT_REPO=$repo "$venv/bin/python" -m pytest -p no:cacheprovider --rootdir "$repo/python/tests" \
    "$repo/python/tests" "$@"
