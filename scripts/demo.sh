#!/usr/bin/env bash
# End to end on a fresh machine: a vLLM environment with this plugin, a tiny random
# checkpoint in the layout of cyankiwi/gemma-4-26B-A4B-it-AWQ-4bit (compressed-tensors
# W4A16, int4 group 32 symmetric, fused 3D experts), vLLM's OpenAI-compatible server on
# 127.0.0.1, one /v1/chat/completions request, then the server stopped by its PID.
#
#   usage: scripts/demo.sh
#   env:   VLLM_VERSION (0.32.0), ENV_DIR (.venvs/vllm-$VLLM_VERSION),
#          KEEP_WORKDIR=1 keeps the checkpoint and the server log
#
# Exits 0 only if the answer came back and the server left no process behind. The model
# is random, so the answer is gibberish: the point is that vLLM loads and serves it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
ENV_DIR=${ENV_DIR:-$ROOT/.venvs/vllm-$VLLM_VERSION}
MODEL_NAME=gemma4-quant-demo
READY_TIMEOUT=${READY_TIMEOUT:-900}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}  # GiB of KV cache on CPU

WORK=$(mktemp -d)
SERVER_PID=""

log() { printf '[demo] %s\n' "$*" >&2; }

# Members of the server's session: it runs under setsid, so its engine core and
# workers share its session id (= its PID) and can be checked for afterwards.
session_members() {
  ps -e -o pid=,sid=,stat= | awk -v sid="$1" '$2 == sid && $3 !~ /^Z/ {print $1}'
}

# Stop the server by its PID: SIGTERM (vLLM shuts its engine down), SIGKILL if it is
# still there after 60 s; then make sure nothing of its session is left.
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  local pid=$SERVER_PID left i
  SERVER_PID=""
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping the server (PID $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 120; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "server did not exit on SIGTERM; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  for ((i = 0; i < 60; i++)); do
    left=$(session_members "$pid")
    [ -z "$left" ] && break
    sleep 0.5
  done
  if [ -n "$left" ]; then
    log "processes of the server's session still running: $left; ending them"
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    return 1
  fi
  log "server stopped; no process of it left"
}

cleanup() {
  local status=$?
  stop_server || status=1
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "vLLM $VLLM_VERSION environment in $ENV_DIR (built once, reused after)"
bash "$ROOT/.ci/make-env.sh" "$VLLM_VERSION" "$ENV_DIR"
PY=$ENV_DIR/bin/python

log "tiny checkpoint, cyankiwi layout (ct-fused-w4a16)"
"$PY" -m gemma4_quant build "$WORK/checkpoint" --layout ct-fused-w4a16 >&2
"$PY" -m gemma4_quant patches >&2 || true

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "starting vLLM's OpenAI server on 127.0.0.1:$PORT (log: $WORK/server.log)"
setsid "$PY" -m vllm.entrypoints.openai.api_server \
  --model "$WORK/checkpoint" --served-model-name "$MODEL_NAME" \
  --host 127.0.0.1 --port "$PORT" --max-model-len 512 --enforce-eager \
  >"$WORK/server.log" 2>&1 </dev/null &
SERVER_PID=$!

# Wait for /health; give up if the server dies or takes too long.
if ! "$PY" - "$PORT" "$SERVER_PID" "$READY_TIMEOUT" <<'EOF'; then
import os, sys, time, urllib.request
port, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("server exited before it was ready")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"server not ready after {timeout:.0f} s")
EOF
  log "server failed; the errors in its log (the root cause is usually the first):"
  grep -oE "[A-Za-z]*(Error|Exception): .*" "$WORK/server.log" | awk '!seen[$0]++' | head -n 8 >&2 || true
  log "last lines of its log:"
  tail -n 20 "$WORK/server.log" >&2
  exit 1
fi
log "server ready; fallback report from its log:"
grep -E "gemma4_quant: .*Dequantizing" "$WORK/server.log" | sed 's/^/  /' >&2 || true

log "POST /v1/chat/completions"
"$PY" - "$PORT" "$MODEL_NAME" <<'EOF'
import json, sys, urllib.request
port, model = sys.argv[1], sys.argv[2]
request = {
    "model": model,
    "messages": [{"role": "user", "content": "What is a mixture of experts?"}],
    "max_tokens": 32,
    "temperature": 0.0,
}
req = urllib.request.Request(
    f"http://127.0.0.1:{port}/v1/chat/completions",
    data=json.dumps(request).encode(),
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(req, timeout=300) as resp:
    body = json.load(resp)
answer = body["choices"][0]["message"]["content"]
if not answer:
    sys.exit("empty answer")
print(f"answer ({body['usage']['completion_tokens']} tokens): {answer!r}")
EOF
