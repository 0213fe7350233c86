#!/usr/bin/env bash
# The deployment tests, run by scripts/test.sh: the Kubernetes manifests
# (scripts/test-kubernetes.sh) and the container image (scripts/test-container.sh).
# The container test needs podman: in CI (CI=true, as root, with apt-get) it is
# installed here, once per machine, within 5 minutes; elsewhere the test is skipped
# with the reason. VERDICT_CONTAINER_TEST=0 skips it everywhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${VERDICT_CONTAINER_TEST:-1}" != 0 ] && ! command -v podman >/dev/null &&
    [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test-deploy: installing podman and runc for the container test"
    timeout 300 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc' >/dev/null ||
        echo "test-deploy: installing podman failed; the container test is skipped"
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
