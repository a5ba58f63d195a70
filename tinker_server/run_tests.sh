#!/usr/bin/env bash
# `make test-tinker`: every opt-in Tinker test against SkyRL's Tinker-compatible API server
# (JAX on CPU) with the embedded SmolLM2-135M as its base model, all on 127.0.0.1.
#   1. set-up: SkyRL's own Python 3.12 venv (setup.sh, once, cached outside the project);
#   2. start the server (serve.py) and our shim in front of it (shim.py), on free ports;
#   3. run the tests with TINKER_BASE_URL/TINKER_API_KEY/TINKER_MODEL pointed at the shim;
#   4. stop both (and the server's engine) whatever happens, and print the times apart.
# Usage: tinker_server/run_tests.sh PROJECT_PYTHON [pytest args...]
set -euo pipefail
PY=$1; shift
HERE=$(cd "$(dirname "$0")" && pwd)
START=$(date +%s)

VENV=$("$HERE/setup.sh" | tail -1)
MODEL=$("$PY" -c 'from promptdistill.models import resolve_model; print(resolve_model("smollm2-135m"))')
WORK=$(mktemp -d "${TMPDIR:-/tmp}/promptdistill-tinker.XXXXXX")
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SERVER_PORT=$(free_port); SHIM_PORT=$(free_port)

SERVER_PID=; SHIM_PID=
stop() {
  # The server runs in its own session (setsid), so its engine goes with its process group.
  [ -n "$SHIM_PID" ] && kill "$SHIM_PID" 2>/dev/null || true
  if [ -n "$SERVER_PID" ]; then
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 -- "-$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap stop EXIT
trap 'exit 130' INT TERM

echo "test-tinker: SkyRL server on 127.0.0.1:$SERVER_PORT (log $WORK/server.log), shim on 127.0.0.1:$SHIM_PORT"
# Sized for a small CPU machine: SkyRL's defaults (32 LoRA slots, each with its gradients and
# Adam state, and no activation checkpointing) grew its engine past 19 GB and the OOM killer
# took it; 8 slots (slot 0 is the base model's: 7 training clients, the opt-in tests make 6)
# of rank <= 32 are enough for the tests.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} setsid "$VENV/bin/python" "$HERE/serve.py" --backend jax --base-model "$MODEL" \
  --backend-config '{"max_lora_adapters": 8, "max_lora_rank": 32, "gradient_checkpointing": true}' \
  --database-url "sqlite:///$WORK/tinker.db" --checkpoints-base "$WORK/checkpoints" \
  --port "$SERVER_PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
"$PY" "$HERE/shim.py" --port "$SHIM_PORT" --upstream "http://127.0.0.1:$SERVER_PORT" &
SHIM_PID=$!
for i in $(seq 300); do
  if curl -sf "http://127.0.0.1:$SHIM_PORT/api/v1/healthz" >/dev/null; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null || [ "$i" = 300 ]; then
    echo "test-tinker: the server did not come up; its log:" >&2; tail -40 "$WORK/server.log" >&2; exit 1
  fi
  sleep 1
done
READY=$(date +%s)
echo "test-tinker: set-up and server start $((READY - START)) s"

# The opt-in Tinker tests: every test file that skips itself without $TINKER_BASE_URL.
TESTS=$(grep -l TINKER_BASE_URL "$HERE"/../tests/test_*.py)
status=0
TINKER_BASE_URL="http://127.0.0.1:$SHIM_PORT" TINKER_API_KEY=tml-local-test TINKER_MODEL="$MODEL" \
  "$PY" -m pytest -q -rs $TESTS "$@" || status=$?
echo "test-tinker: tests $(( $(date +%s) - READY )) s, total $(( $(date +%s) - START )) s"
if [ "$status" != 0 ]; then echo "test-tinker: server log tail:" >&2; tail -40 "$WORK/server.log" >&2; fi
exit "$status"
