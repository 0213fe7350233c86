#!/usr/bin/env bash
# End-to-end test of the CPU container image with podman: builds it
# (scripts/build-image.sh, from the host's release binary), starts it the way the
# Kubernetes Deployment runs it (non-root, read-only root file system, no
# capabilities), waits for /health, classifies the default model's two demo sentences
# over HTTP and checks their labels, checks the image's user, HEALTHCHECK command,
# preStop command and queue metric, then sends SIGTERM and checks that the server
# exits 0 within the shutdown deadline.
#
#   scripts/test-container.sh
# Skips (exit 0, with the reason) when podman is missing or cannot run containers here.
# Environment: VERDICT_BIN (binary for the image; default: `cargo build --release
# --locked`'s target/release/verdict), PODMAN_RUNTIME (default runc when installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SHUTDOWN_DEADLINE_S=30 # the server's drain deadline; the Deployment gives it 45 s
STARTUP_LIMIT_S=60

log() { printf '%s\n' "test-container: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

command -v podman >/dev/null || { log "skipped: podman is not installed (apt-get install podman runc)"; exit 0; }
podman=(podman)
runtime=${PODMAN_RUNTIME:-}
if [ -z "$runtime" ] && command -v runc >/dev/null; then runtime=runc; fi
[ -z "$runtime" ] || podman+=(--runtime "$runtime")
# The HEALTHCHECK's timer needs systemd, which these machines lack: its command is run
# by hand below instead.
run_flags=(--network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --no-healthcheck)

started=$(date +%s)
image=$(scripts/build-image.sh --tag localhost/verdict:test)
log "image built in $(($(date +%s) - started)) s: $(podman image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }')"

# A podman that cannot start any container (no user namespaces or cgroups in a nested
# container) is this machine's limit, not the image's: the static busybox needs nothing.
if ! probe=$("${podman[@]}" run --rm "${run_flags[@]}" --entrypoint /bin/busybox "$image" true 2>&1); then
    log "skipped: podman cannot run a container here: $(printf '%s' "$probe" | tail -n 1)"
    exit 0
fi

# The image's settings that Kubernetes relies on.
config=$(podman image inspect --format '{{.Config.User}} {{json .Config.ExposedPorts}} {{json .Config.Healthcheck}}' "$image")
case $config in "10001:10001 "*'"8000/tcp"'*'/health'*) ;; *) fail "image config: $config" ;; esac

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name=verdict-test-$$
cleanup() { "${podman[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
logs() { "${podman[@]}" logs "$name" 2>&1 | tail -n 20 >&2 || true; }
# As the Deployment runs it: read-only root (podman mounts a tmpfs on /tmp), no
# capabilities, no privilege escalation.
"${podman[@]}" run -d --name "$name" "${run_flags[@]}" --read-only --cap-drop ALL \
    --security-opt no-new-privileges "$image" --port "$port" >/dev/null
url=http://127.0.0.1:$port

started=$(date +%s)
until curl -fsS -o /dev/null "$url/health" 2>/dev/null; do
    state=$(podman inspect --format '{{.State.Status}}' "$name")
    [ "$state" = running ] || { logs; fail "the container stopped ($state) before /health answered"; }
    [ $(($(date +%s) - started)) -lt $STARTUP_LIMIT_S ] || { logs; fail "no /health within $STARTUP_LIMIT_S s"; }
    sleep 0.5
done
log "/health answered after $(($(date +%s) - started)) s"

body=$(curl -fsS "$url/classify" -H 'Content-Type: application/json' \
    -d '{"input": ["Loved the new café—coffee was great.", "This update broke everything. Frustrating."]}') ||
    { logs; fail "/classify failed"; }
labels=$(printf '%s' "$body" | python3 -c 'import json, sys; print(" ".join(d["label"] for d in json.load(sys.stdin)["data"]))')
[ "$labels" = "positive negative" ] || fail "labels '$labels' (want 'positive negative'): $body"
log "labels: $labels"

uid=$("${podman[@]}" exec "$name" /bin/busybox id -u)
[ "$uid" = 10001 ] || fail "the server runs as uid $uid"
# HEALTHCHECK's and the preStop hook's commands, on this run's port.
"${podman[@]}" exec "$name" /bin/busybox wget -q -O /dev/null "$url/health" || fail "HEALTHCHECK's wget failed"
"${podman[@]}" exec "$name" /bin/busybox sleep 0 || fail "the preStop command failed"
# Captured first: under pipefail, `curl | grep -q` fails when grep exits before curl finishes writing.
metrics=$(curl -fsS "$url/metrics") || fail "/metrics failed"
grep -q '^verdict_queue_depth ' <<<"$metrics" || fail "/metrics has no verdict_queue_depth (the autoscaler's metric)"
rss=$("${podman[@]}" exec "$name" /bin/busybox grep -E '^Vm(RSS|HWM)' /proc/1/status | tr -s ' \t\n' ' ')
log "server memory: $rss"

"${podman[@]}" kill --signal TERM "$name" >/dev/null
started=$(date +%s)
code=$(timeout $((SHUTDOWN_DEADLINE_S + 5)) "${podman[@]}" wait "$name") || { logs; fail "no exit within $SHUTDOWN_DEADLINE_S s of SIGTERM"; }
took=$(($(date +%s) - started))
[ "$code" = 0 ] || { logs; fail "exit code $code after SIGTERM"; }
[ "$took" -le "$SHUTDOWN_DEADLINE_S" ] || fail "took $took s to exit after SIGTERM"
server_log=$("${podman[@]}" logs "$name" 2>&1)
grep -q "server stopped" <<<"$server_log" || { logs; fail "no 'server stopped' in the log"; }
log "SIGTERM: exit code 0 after $took s"
log "passed"
