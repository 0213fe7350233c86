#!/usr/bin/env bash
# Validates deploy/kubernetes offline: renders each variant with kustomize
# (`kubectl kustomize`), checks every object against the Kubernetes API schemas of the
# oldest and newest versions kubernetes-validate ships (strict: unknown fields fail),
# then checks what the schemas cannot (scripts/check_kubernetes.py: probe paths and
# ports against the server's routes, the autoscaler's metric against /metrics, the
# grace period against the shutdown timeout, the image's user and port).
#
#   scripts/test-kubernetes.sh [VERDICT_BINARY]
# With a binary, the Deployment's flags are also checked against `verdict serve --help`.
# kubernetes-validate (pinned) goes into a venv under ${VERDICT_HOME:-~/.cache/verdict}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VALIDATOR=kubernetes-validate==1.37.0
SCHEMA_VERSIONS="1.25.0 1.37.0"
venv=${VERDICT_HOME:-$HOME/.cache/verdict}/k8s-venv
log() { printf '%s\n' "test-kubernetes: $*" >&2; }

if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null ||
    [ "$("$venv/bin/python" -m pip show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p')" != "${VALIDATOR#*==}" ]; then
    log "installing $VALIDATOR into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$VALIDATOR" >&2
fi

out=$(mktemp -d)
trap 'rm -rf -- "$out"' EXIT
rendered=()
if command -v kubectl >/dev/null; then
    for variant in base gpu own-model; do
        kubectl kustomize "deploy/kubernetes/$variant" >"$out/$variant.yaml"
        rendered+=("$out/$variant.yaml")
    done
else
    # The base is plain manifests; the overlays need kustomize.
    log "kubectl (for kustomize) is not installed: checking the base only, not the gpu and own-model overlays"
    for f in deployment service hpa; do
        cat "deploy/kubernetes/base/$f.yaml"
        printf -- '---\n'
    done >"$out/base.yaml"
    rendered+=("$out/base.yaml")
fi
for v in $SCHEMA_VERSIONS; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${rendered[@]}"
done
log "schemas: ${#rendered[@]} variants valid against Kubernetes $SCHEMA_VERSIONS"

help=()
if [ $# -ge 1 ]; then
    "$1" serve --help >"$out/serve-help.txt"
    help=(--serve-help "$out/serve-help.txt")
fi
"$venv/bin/python" scripts/check_kubernetes.py "${rendered[@]}" "${help[@]}"
