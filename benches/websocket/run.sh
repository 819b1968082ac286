#!/usr/bin/env bash
# Load test of the WebSocket channel `system`.
#
#   benches/websocket/run.sh
#
#   1. a fresh PostgreSQL database (seidra_bench_ws_<pid> on BENCH_PG_URL, dropped at the end)
#      and `target/debug/seidra serve` on it, on a free loopback port, with a temporary data
#      dir and SEIDRA_CLIENT_QUEUE=BENCH_CLIENT_QUEUE (4096);
#   2. one real small image job, whose row is copied in SQL to BENCH_ROWS rows (default: as
#      many as both phases announce, since the service publishes each row once);
#   3. fanout: BENCH_CLIENTS (1000) clients connected, then BENCH_RATE (100) messages per
#      second for BENCH_SECONDS (60): latency from `emitted_at` to receipt (p50/p90/p99/max),
#      messages delivered per second, seq gaps, clients closed, the service's CPU (from
#      /proc/<pid>/stat) and RSS (VmRSS sampled every second, VmHWM);
#   4. max-rate: one client, BENCH_MAX_RATES messages per second (100,...,50000), each for
#      BENCH_STEP_SECONDS (5), until it misses a message, is closed or falls short of the rate.
#
# The service publishes one `telemetry.generation` message for every row another instance
# announces on PostgreSQL (`NOTIFY seidra_generation`): the driver (load.rs, built as the
# example `websocket-load`) announces the copied rows as such an instance does, which is the
# only way to make an unmodified service publish this fast (a real job gives a handful of
# messages a second on the CPU).
#
# Needs: target/debug/seidra (built with `cargo build` when missing), the example (built
# here), curl, python3, psql (installed with apt-get when missing), a PostgreSQL server with
# trust auth. Runs about 2 minutes. Raw outputs under BENCH_OUT (default
# benches/websocket/results/<UTC time>, ignored by git).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=scripts/api/lib.sh
. "$root/scripts/api/lib.sh"

clients=${BENCH_CLIENTS:-1000}
rate=${BENCH_RATE:-100}
seconds=${BENCH_SECONDS:-60}
queue=${BENCH_CLIENT_QUEUE:-4096}
max_rates=${BENCH_MAX_RATES:-100,500,1000,2000,5000,10000,20000,30000,50000}
step_seconds=${BENCH_STEP_SECONDS:-5}
rows=${BENCH_ROWS:-$((rate * seconds + ($(tr ',' '+' <<< "$max_rates")) * step_seconds))}
pg_url=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
out=${BENCH_OUT:-$here/results/$(date -u +%Y%m%dT%H%M%SZ)}
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

pg_db=seidra_bench_ws_$$
data_dir=
cleanup() {
  seidra_stop
  [ -n "$data_dir" ] && rm -rf "$data_dir"
  psql "$pg_url/postgres" -qAtc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" > /dev/null 2>&1
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install() {
  local need=()
  command -v curl > /dev/null || need+=(curl)
  command -v psql > /dev/null || need+=(postgresql-client)
  [ "${#need[@]}" -eq 0 ] && return 0
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
}
install || { echo "bench: installing curl/psql failed" >&2; exit 2; }
seidra_build || exit 2
# The path cargo reports: another build sharing target/ may replace target/debug/examples/.
driver=$(cd "$root" && cargo build --quiet --example websocket-load --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "websocket-load":
        print(message["executable"])') || exit 2
[ -x "$driver" ] || { echo "bench: no websocket-load executable" >&2; exit 2; }
mkdir -p "$out" || exit 2

# Each client is a socket in the driver and one in the service.
ulimit -n $((4 * clients + 1024)) 2> /dev/null || ulimit -n "$(ulimit -Hn)"

psql "$pg_url/postgres" -qAtc "CREATE DATABASE $pg_db" > /dev/null || exit 2
data_dir=$(mktemp -d)
export SEIDRA_DATABASE_URL=$pg_url/$pg_db SEIDRA_CLIENT_QUEUE=$queue
SEIDRA_LOG_FILE=$out/serve.log seidra_start "$data_dir" || exit 2
token=$(seidra_token "$data_dir") || exit 2
job=$(seidra_small_job "$token") || exit 2
metric=$(curl -sf -H "Authorization: Bearer $token" "$SEIDRA_URL/api/jobs/$job" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["metrics"]["id"])') || exit 2
columns=$(psql "$pg_url/$pg_db" -qAtc "SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position)
  FROM information_schema.columns WHERE table_name = 'generation_metrics' AND column_name <> 'id'") || exit 2
# The same figures under a job id of their own each: job_id is unique.
copies=$(psql "$pg_url/$pg_db" -qAtc "SELECT string_agg(CASE column_name WHEN 'job_id' THEN 'job_id || ''-'' || n'
  ELSE quote_ident(column_name) END, ', ' ORDER BY ordinal_position)
  FROM information_schema.columns WHERE table_name = 'generation_metrics' AND column_name <> 'id'") || exit 2
psql "$pg_url/$pg_db" -qAtc "INSERT INTO generation_metrics ($columns)
  SELECT $copies FROM generation_metrics, generate_series(2, $rows) AS n WHERE id = $metric" > /dev/null || exit 2

run_driver() {
  BENCH_TOKEN=$token "$driver" --url "ws://127.0.0.1:$SEIDRA_PORT/api/system/ws" \
    --database-url "$pg_url/$pg_db" --service-pid "$SEIDRA_PID" --clock-ticks "$(getconf CLK_TCK)" "$@"
}

echo "== fanout: $clients clients, $rate messages/s for $seconds s (client queue $queue, $(nproc) cores)"
run_driver fanout --clients "$clients" --rate "$rate" --seconds "$seconds" \
  2> >(tee "$out/fanout.log" >&2) | tee "$out/fanout.json" || exit 1
echo "== max-rate: one client, $max_rates messages/s, $step_seconds s each"
run_driver --skip-rows $((rate * seconds)) max-rate --rates "$max_rates" --step-seconds "$step_seconds" \
  2> >(tee "$out/max-rate.log" >&2) | tee "$out/max-rate.json" || exit 1
echo "raw outputs in $out"
