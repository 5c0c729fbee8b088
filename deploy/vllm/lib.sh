# shellcheck shell=bash
# Sourced by deploy/vllm/*/serve.sh: start `vllm serve`, wait until /health answers, then stay
# in the foreground until vLLM exits (Ctrl-C or SIGTERM stops it: vLLM gets SIGTERM).
#
# Environment:
#   MODEL_DIR          LeanQuant checkpoint folder (each serve.sh sets a default)
#   HOST, PORT         where vLLM listens (0.0.0.0, 8000)
#   VLLM               the vllm command (vllm)
#   HEALTH_TIMEOUT_S   give up when /health has not answered after this long (3600)
#   HEALTH_POLL_S      seconds between /health checks (10)
#   DRY_RUN=1          print the vllm command line and exit (tests/test_deploy.py uses it)

leanquant_healthy() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 5 "$1"
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" \
      >/dev/null 2>&1
  fi
}

leanquant_serve_and_wait() {
  local host=${HOST:-0.0.0.0} port=${PORT:-8000}
  local -a cmd=("${VLLM:-vllm}" serve "$MODEL_DIR" "$@" --host "$host" --port "$port")
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  if [[ ! -f "$MODEL_DIR/config.json" ]]; then
    echo "serve.sh: $MODEL_DIR/config.json not found: set MODEL_DIR to the checkpoint folder" >&2
    return 2
  fi
  echo "serve.sh: ${cmd[*]}" >&2
  "${cmd[@]}" &
  local pid=$! rc=0
  # SIGTERM, not SIGINT: a background job of a script starts with SIGINT ignored.
  # shellcheck disable=SC2064  # expand $pid now
  trap "kill -TERM $pid 2>/dev/null" INT TERM
  local url="http://127.0.0.1:$port/health" timeout=${HEALTH_TIMEOUT_S:-3600}
  local deadline=$((SECONDS + timeout))
  until leanquant_healthy "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" || rc=$?
      echo "serve.sh: vllm exited (status $rc) before $url answered" >&2
      return $((rc ? rc : 1))
    fi
    if ((SECONDS >= deadline)); then
      echo "serve.sh: $url did not answer within ${timeout}s: stopping vllm" >&2
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" || true
      return 1
    fi
    sleep "${HEALTH_POLL_S:-10}"
  done
  echo "serve.sh: ready: http://$host:$port/v1 (health: $url)" >&2
  while kill -0 "$pid" 2>/dev/null; do
    rc=0
    wait "$pid" || rc=$?  # a signal interrupts wait: loop until vllm has exited
  done
  return "$rc"
}
