#!/usr/bin/env bash
# Clients generated from the committed OpenAPI document, used against a live service.
#
# Starts `seidra serve` on a free loopback port with a temporary data dir (building
# target/debug/seidra first if it is missing), mints an operator token for that data dir,
# runs one small image job to completion, then:
#   python client      openapi-python-client (PyPI, pinned in requirements.txt, in .venv):
#                      generation must keep every schema and endpoint; an authorised
#                      GET /api/system/telemetry/generation parsed into the generated models
#                      (>= 1 item, summary.total >= 1); the same call without a token -> 401;
#   typescript client  openapi-typescript + openapi-fetch (npm, pinned in package-lock.json,
#                      typescript 5): generation, a strict tsc type-check of client-check.ts
#                      against the generated types, then the same two calls.
# Stops the service on exit. Prints `clients: N passed, N failed`; exits 1 when a check
# failed, 2 when it could not start. Installs on the first run (or when a pin changes), and
# runs offline after that. SPEC=path checks another document instead of openapi/openapi.json.
set -uo pipefail

[ -n "${SPEC:-}" ] && SPEC=$(realpath -m -- "$SPEC")
here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 2
# shellcheck source=scripts/api/lib.sh
. ./lib.sh

spec=${SPEC:-$SEIDRA_ROOT/openapi/openapi.json}
build=$here/.build

install() {
  seidra_install_npm && seidra_install_venv || return 1
  command -v curl > /dev/null || { echo "curl is missing" >&2; return 1; }
}
install || { echo "check-clients: installing the tools failed" >&2; echo "clients: 0 passed, 1 failed"; exit 2; }

seidra_workdir seidra-clients

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; }

# Counts the `ok`/`FAIL` lines a check program printed (a crash counts as one failure).
tally() {
  local output=$1 status=$2 oks fails
  printf '%s\n' "$output"
  oks=$(printf '%s\n' "$output" | grep -c '^ok ' || true)
  fails=$(printf '%s\n' "$output" | grep -c '^FAIL ' || true)
  passed=$((passed + oks))
  failed=$((failed + fails))
  if [ "$status" -ne 0 ] && [ "$fails" -eq 0 ]; then
    fail "$3 exited $status without naming a failed check"
  fi
}

echo "== service"
if ! seidra_start "$work/data" --devices cpu; then
  echo "check-clients: the service did not start" >&2
  echo "clients: 0 passed, 1 failed"
  exit 2
fi
token=$(seidra_token "$work/data") || { echo "check-clients: no token" >&2; echo "clients: 0 passed, 1 failed"; exit 2; }
echo "seidra serve on $SEIDRA_URL (pid $SEIDRA_PID), data dir $work/data"
if job_id=$(seidra_small_job "$token"); then
  echo "image job $job_id succeeded"
else
  echo "check-clients: the image job did not succeed; service log:" >&2
  tail -n 30 "$SEIDRA_LOG" >&2
  echo "clients: 0 passed, 1 failed"
  exit 2
fi
echo "spec: $spec"

echo "== python client (openapi-python-client $(.venv/bin/pip show openapi-python-client 2> /dev/null | sed -n 's/^Version: //p'))"
rm -rf "$build/python"
mkdir -p "$build/python"
gen_log=$build/python/generate.log
PATH=$here/.venv/bin:$PATH .venv/bin/openapi-python-client generate --path "$spec" --meta none \
  --output-path "$build/python/seidra_client" --overwrite > "$gen_log" 2>&1
gen_status=$?
# What the generator dropped: schemas it could not process, endpoints it skipped, JSON
# responses it left out. A binary (image/png, image/gif) answer it cannot type is no fault.
dropped=$(grep -E 'Unable to process schema|Endpoint will not be generated|resulted in the removal of|^/components/schemas/|Cannot parse response' "$gen_log" \
  | grep -v 'Unsupported content_type image/' || true)
if [ "$gen_status" -ne 0 ] || [ ! -d "$build/python/seidra_client" ]; then
  cat "$gen_log"
  fail "python client: openapi-python-client generate exited $gen_status"
elif [ -n "$dropped" ]; then
  fail "python client: generation dropped parts of the document (full log: $gen_log):"
  grep -E -B1 -A3 'WARNING parsing|Unable to process schema' "$gen_log" | grep -v '^$' | sed 's/^/     /'
else
  pass "python client: generated every schema and endpoint"
fi
if [ -d "$build/python/seidra_client" ]; then
  output=$(.venv/bin/python client_check.py "$build/python" seidra_client "$SEIDRA_URL" "$token" 2>&1)
  tally "$output" $? "python client_check.py"
else
  fail "python client: calls not run (no client generated)"
  fail "python client: call without a token not run (no client generated)"
fi

echo "== typescript client (openapi-typescript $(node -p 'require("./node_modules/openapi-typescript/package.json").version'), openapi-fetch $(node -p 'require("./node_modules/openapi-fetch/package.json").version'), typescript $(node -p 'require("./node_modules/typescript/package.json").version'))"
rm -rf "$build/ts"
mkdir -p "$build/ts"
if ./node_modules/.bin/openapi-typescript "$spec" -o "$build/ts/schema.d.ts" > "$build/ts/generate.log" 2>&1; then
  pass "typescript client: openapi-typescript generated the types"
  if ./node_modules/.bin/tsc -p tsconfig.json > "$build/ts/tsc.log" 2>&1; then
    pass "typescript client: client-check.ts type-checks (strict) against the generated types"
    output=$(BASE_URL=$SEIDRA_URL TOKEN=$token node "$build/ts/out/client-check.js" 2>&1)
    tally "$output" $? "typescript client-check.js"
  else
    sed 's/^/     /' "$build/ts/tsc.log"
    fail "typescript client: client-check.ts does not type-check against the generated types"
    fail "typescript client: calls not run (no compiled client)"
    fail "typescript client: call without a token not run (no compiled client)"
  fi
else
  grep -v '^\s*at ' "$build/ts/generate.log" | head -n 14 | sed 's/^/     /'
  fail "typescript client: openapi-typescript could not read $spec"
  fail "typescript client: type-check not run (no generated types)"
  fail "typescript client: calls not run (no generated types)"
  fail "typescript client: call without a token not run (no generated types)"
fi

echo "clients: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
