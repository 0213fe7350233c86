#!/usr/bin/env bash
# Soak test: builds the release binary, starts `verdict serve` on the bundled
# default model on a loopback port, runs scripts/soak.py against it (mixed good
# and hostile traffic; see that file for the knobs, e.g. SOAK_SECONDS), then
# stops the server with SIGTERM and reports how long shutdown took.
#   SOAK_PORT         port to use (default 18123)
#   SOAK_SERVER_ARGS  extra `verdict serve` flags
set -euo pipefail
REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$REPO"
PORT=${SOAK_PORT:-18123}

MODEL=$(scripts/setup-default-model.sh)
nice cargo build --release -p verdict >&2
LOG=$(mktemp -t verdict-soak.XXXXXX.log)
# shellcheck disable=SC2086
target/release/verdict serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" ${SOAK_SERVER_ARGS:-} >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "soak: the server exited; its log:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 1
done

status=0
SOAK_URL="http://127.0.0.1:$PORT" SOAK_PID=$SERVER python3 scripts/soak.py || status=$?

started=$(date +%s%N)
kill -TERM "$SERVER"
wait "$SERVER" || true
trap - EXIT
echo "  shutdown after SIGTERM: $(( ($(date +%s%N) - started) / 1000000 )) ms"
echo "  server log: $LOG"
exit "$status"
