# shellcheck shell=bash
# Shared by scripts/api/*.sh and benches/telemetry-endpoint/run.sh: build the binary once,
# start the service on a free loopback port, mint tokens, stop it on exit.
# Source it; it defines functions and variables only.
#
#   seidra_start DATA_DIR [extra serve flags...]   sets SEIDRA_PID, SEIDRA_PORT, SEIDRA_URL
#   seidra_stop                                    stops the service it started (also on EXIT)
#   seidra_token DATA_DIR [extra flags...]         prints an operator JWT for that data dir

SEIDRA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SEIDRA_BIN=${SEIDRA_BIN:-$SEIDRA_ROOT/target/debug/seidra}
SEIDRA_PID=
SEIDRA_PORT=
SEIDRA_URL=
SEIDRA_LOG=

SEIDRA_API_DIR=$SEIDRA_ROOT/scripts/api

# Installs scripts/api/.venv from requirements.txt (again only when the pins change).
seidra_install_venv() {
  (
    cd "$SEIDRA_API_DIR" || exit 1
    if ! cmp -s requirements.txt .venv/.seidra-installed-requirements 2> /dev/null; then
      rm -rf .venv
      python3 -m venv .venv && .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt \
        && cp requirements.txt .venv/.seidra-installed-requirements || exit 1
    fi
  )
}

# Installs scripts/api/node_modules from package-lock.json (again only when it changes).
seidra_install_npm() {
  (
    cd "$SEIDRA_API_DIR" || exit 1
    if ! cmp -s package-lock.json node_modules/.seidra-installed-lock 2> /dev/null; then
      npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.seidra-installed-lock || exit 1
    fi
  )
}

# Builds target/debug/seidra when it is missing (debug profile, dependencies optimised).
seidra_build() {
  if [ ! -x "$SEIDRA_BIN" ]; then
    echo "building $SEIDRA_BIN (cargo build)" >&2
    (cd "$SEIDRA_ROOT" && cargo build --quiet --bin seidra) || return 1
  fi
}

seidra_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Starts `seidra serve` on 127.0.0.1 and waits until /openapi.json answers (60 s at most).
seidra_start() {
  local data_dir=$1; shift
  seidra_build || return 1
  mkdir -p "$data_dir" || return 1
  SEIDRA_LOG=${SEIDRA_LOG_FILE:-$data_dir/serve.log}
  local attempt
  for attempt in 1 2 3; do
    SEIDRA_PORT=$(seidra_free_port)
    SEIDRA_URL=http://127.0.0.1:$SEIDRA_PORT
    "$SEIDRA_BIN" serve --host 127.0.0.1 --port "$SEIDRA_PORT" --data-dir "$data_dir" "$@" \
      > "$SEIDRA_LOG" 2>&1 &
    SEIDRA_PID=$!
    local waited=0
    while [ "$waited" -lt 600 ]; do
      if ! kill -0 "$SEIDRA_PID" 2> /dev/null; then
        wait "$SEIDRA_PID" 2> /dev/null
        SEIDRA_PID=
        break
      fi
      if curl -sf -o /dev/null "$SEIDRA_URL/openapi.json"; then
        return 0
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
    if [ -n "$SEIDRA_PID" ]; then
      echo "seidra serve did not answer on $SEIDRA_URL within 60 s" >&2
      seidra_stop
      break
    fi
    echo "seidra serve exited at start (attempt $attempt); log:" >&2
    tail -n 20 "$SEIDRA_LOG" >&2
  done
  return 1
}

# Stops the service with SIGTERM (then SIGKILL after 10 s). Safe to call twice.
seidra_stop() {
  [ -n "${SEIDRA_PID:-}" ] || return 0
  if kill -0 "$SEIDRA_PID" 2> /dev/null; then
    kill -TERM "$SEIDRA_PID" 2> /dev/null
    local waited=0
    while kill -0 "$SEIDRA_PID" 2> /dev/null && [ "$waited" -lt 100 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    kill -0 "$SEIDRA_PID" 2> /dev/null && kill -KILL "$SEIDRA_PID" 2> /dev/null
  fi
  wait "$SEIDRA_PID" 2> /dev/null
  SEIDRA_PID=
}

seidra_token() {
  local data_dir=$1; shift
  "$SEIDRA_BIN" token --role operator --user "${SEIDRA_TOKEN_USER:-api-checks}" --data-dir "$data_dir" "$@" 2> /dev/null
}

# Submits one small image job with TOKEN and waits (120 s at most) until it has finished.
# Prints the job id; returns non-zero unless the job succeeded.
seidra_small_job() {
  local token=$1
  local accepted job_id status waited=0
  accepted=$(curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"media_type":"image","prompt":"x","width":32,"height":32,"steps":2,"seed":1}' \
    "$SEIDRA_URL/api/jobs") || { echo "POST /api/jobs failed" >&2; return 1; }
  job_id=$(printf '%s' "$accepted" | python3 -c 'import json, sys; print(json.load(sys.stdin)["job_id"])') || return 1
  while [ "$waited" -lt 1200 ]; do
    status=$(curl -sf -H "Authorization: Bearer $token" "$SEIDRA_URL/api/jobs/$job_id" \
      | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])') || status=unknown
    case $status in
      succeeded) echo "$job_id"; return 0 ;;
      failed | cancelled) echo "job $job_id ended $status" >&2; return 1 ;;
    esac
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "job $job_id not finished after 120 s (status $status)" >&2
  return 1
}

# Makes a temporary work folder in $work named after PREFIX, removed (with the service it
# started) when the script exits.
seidra_workdir() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  trap 'seidra_stop; rm -rf "$work"' EXIT
  trap 'exit 130' INT TERM
}
