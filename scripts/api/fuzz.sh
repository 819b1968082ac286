#!/usr/bin/env bash
# Property-based fuzzing of the live service with schemathesis (PyPI, pinned in
# requirements.txt, installed into scripts/api/.venv).
#
# Starts `seidra serve` on a free loopback port with a temporary data dir (building
# target/debug/seidra first if it is missing), mints an operator token, runs one small image
# job so that the telemetry endpoint has a row, then runs every schemathesis phase (examples,
# coverage, fuzzing, stateful) against the document the service serves at /openapi.json,
# with the token on every request and every check (`--checks all`): no 5xx, no undocumented
# status, no schema violation, no rejected valid data, no accepted invalid data, ...
# Nothing is excluded from generation. One answer is counted apart instead of as a failure: a
# schema-valid job refused with 400 because its outputs together need more memory than
# `max_job_memory_mib` (a documented rule across width, height and images or frames that the
# schema cannot state), when positive_data_acceptance is its only failed check; the report
# prints how many. `--continue-on-failure` keeps generating after a failure, so the count
# does not shrink when something fails.
#
# Settings (environment): FUZZ_MAX_EXAMPLES (per operation and phase, default 150),
# FUZZ_SEED (default 20241003; a fixed seed makes a run repeatable), FUZZ_MIN_CASES (the run
# fails below it, default 500), FUZZ_WORKERS (default 1), FUZZ_REPORT_DIR (keep the JUnit
# and NDJSON reports there; default: a temporary folder, removed).
#
# Prints each distinct failure (check, operation, status, request as curl, response) and
# the closing line `fuzz: N passed, N failed` (generated test cases); exits 1 when a case
# failed or got no response (connection reset, timeout), a 5xx was seen, schemathesis reported
# an error or exited non-zero for anything but the cases counted apart, or fewer than
# FUZZ_MIN_CASES cases were generated; 2 when it could not start. Installs on the first run, offline after that.
set -uo pipefail

[ -n "${FUZZ_REPORT_DIR:-}" ] && FUZZ_REPORT_DIR=$(realpath -m -- "$FUZZ_REPORT_DIR")
here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 2
# shellcheck source=scripts/api/lib.sh
. ./lib.sh

max_examples=${FUZZ_MAX_EXAMPLES:-150}
seed=${FUZZ_SEED:-20241003}
min_cases=${FUZZ_MIN_CASES:-500}
workers=${FUZZ_WORKERS:-1}

seidra_install_venv || { echo "fuzz: installing schemathesis failed" >&2; echo "fuzz: 0 passed, 1 failed"; exit 2; }

seidra_workdir seidra-fuzz
report_dir=${FUZZ_REPORT_DIR:-$work/report}
mkdir -p "$report_dir"

if ! seidra_start "$work/data" --devices cpu; then
  echo "fuzz: the service did not start" >&2
  echo "fuzz: 0 passed, 1 failed"
  exit 2
fi
token=$(seidra_token "$work/data") || { echo "fuzz: no token" >&2; echo "fuzz: 0 passed, 1 failed"; exit 2; }
echo "seidra serve on $SEIDRA_URL (pid $SEIDRA_PID)"
seidra_small_job "$token" > /dev/null || { echo "fuzz: the image job did not succeed" >&2; echo "fuzz: 0 passed, 1 failed"; exit 2; }

echo "schemathesis $(.venv/bin/pip show schemathesis 2> /dev/null | sed -n 's/^Version: //p'): --checks all --max-examples $max_examples --seed $seed --workers $workers"
start=$(date +%s)
# From the temporary folder: schemathesis and hypothesis keep caches in the working directory
# (.schemathesis/, .hypothesis/), and a crash cache would replay earlier failures first.
(cd "$work" && "$here/.venv/bin/schemathesis" run "$SEIDRA_URL/openapi.json" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$max_examples" \
  --continue-on-failure \
  --seed "$seed" \
  --workers "$workers" \
  --generation-database none \
  --request-timeout 30 \
  --no-color \
  --output-truncate true \
  --report junit,ndjson --report-dir "$report_dir" \
  > "$work/schemathesis.log" 2>&1)
st_status=$?
echo "schemathesis exited $st_status after $(($(date +%s) - start)) s; its summary:"
sed -n '/^=* SUMMARY =*$/,$p' "$work/schemathesis.log" | sed 's/^/  /'
if [ -n "${FUZZ_REPORT_DIR:-}" ]; then
  cp "$work/schemathesis.log" "$report_dir/schemathesis.log"
  echo "reports and the full log: $report_dir"
fi

ndjson=$(ls -t "$report_dir"/ndjson-*.ndjson 2> /dev/null | head -n 1)
if [ -z "$ndjson" ]; then
  tail -n 40 "$work/schemathesis.log"
  echo "fuzz: no report was written"
  echo "fuzz: 0 passed, 1 failed"
  exit 1
fi
.venv/bin/python fuzz_report.py "$ndjson" --min-cases "$min_cases" --schemathesis-status "$st_status"
