#!/usr/bin/env bash
# Load test of GET /api/system/telemetry/generation on a month of measurements.
#
#   benches/telemetry-endpoint/run.sh [sqlite|postgres|all]     (default: all)
#
# For each backend:
#   1. a fresh database: SQLite in a temporary data dir, or a new PostgreSQL database
#      (seidra_bench_<pid>, dropped at the end) on BENCH_PG_URL; `seidra migrate up`;
#   2. BENCH_ROWS generation_metrics rows (default 1,000,000) over BENCH_DAYS days
#      (default 30) from load.py (seeded: the same rows on both backends); on PostgreSQL
#      through psql \copy, then VACUUM ANALYZE (what autovacuum does after a bulk insert);
#   3. the service on that database, one warm-up and BENCH_SINGLE timed requests per
#      scenario with curl; on SQLite with sqlx's statement log on, which gives the time of
#      each SQL statement inside the service;
#   4. the statements the service ran for each scenario (read from that log), with their
#      plans (EXPLAIN QUERY PLAN through apsw, the service's SQLite version; EXPLAIN (ANALYZE,
#      BUFFERS) of the prepared statement in psql) and BENCH_RUNS timed runs of each;
#   5. per scenario and answer mode (BENCH_ANSWERS, default "kept built"), a fresh service,
#      one warm-up request, then wrk: BENCH_CONNECTIONS (32) connections, BENCH_THREADS (2)
#      threads, BENCH_DURATION (20s), --latency, --timeout BENCH_TIMEOUT (60s, so slow
#      answers count as latency, not as errors). `kept`: the service's default, answers sent
#      again while nothing they depend on changed (nothing commits during the bench);
#      `built`: SEIDRA_TELEMETRY_CACHE_SIZE=0, every request builds its answer.
# Scenarios: ?minutes=60, ?minutes=1440&media_type=video, and no window (no parameter).
# Targets (the issue): p99 < 10 ms for ?minutes=60, p99 < 50 ms without a window.
#
# Prints a closing table per backend and keeps every raw output under BENCH_OUT (default
# benches/telemetry-endpoint/results/<UTC time>). Needs: target/debug/seidra (built with
# `cargo build` when missing), python3, curl, wrk and psql (installed with apt-get when
# missing), a PostgreSQL server for the postgres backend (trust auth), apsw from PyPI
# (requirements.txt, into .venv). Takes about 5 minutes per backend on 2 cores.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=scripts/api/lib.sh
. "$root/scripts/api/lib.sh"

backends=${1:-all}
case $backends in
  all) backends="sqlite postgres" ;;
  sqlite | postgres) ;;
  *) echo "usage: $0 [sqlite|postgres|all]" >&2; exit 2 ;;
esac
rows=${BENCH_ROWS:-1000000}
days=${BENCH_DAYS:-30}
duration=${BENCH_DURATION:-20s}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-2}
wrk_timeout=${BENCH_TIMEOUT:-60s}
runs=${BENCH_RUNS:-3}
single=${BENCH_SINGLE:-3}
pg_url=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
out=${BENCH_OUT:-$here/results/$(date -u +%Y%m%dT%H%M%SZ)}
endpoint=/api/system/telemetry/generation
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
# The rows span exactly BENCH_DAYS up to now; the service's default 30-day retention purge
# would delete the oldest few at start. Keep them all (BENCH_RETENTION_DAYS=30 to purge).
export SEIDRA_RETENTION_DAYS=${BENCH_RETENTION_DAYS:-0}
scenarios=("minutes=60" "minutes=1440&media_type=video" "")
answer_modes=${BENCH_ANSWERS:-kept built}

install() {
  local need=()
  command -v wrk > /dev/null || need+=(wrk)
  command -v curl > /dev/null || need+=(curl)
  [[ " $backends " == *" postgres "* ]] && ! command -v psql > /dev/null && need+=(postgresql-client)
  if [ "${#need[@]}" -gt 0 ]; then
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null \
      || return 1
  fi
  (
    cd "$here" || exit 1
    if ! cmp -s requirements.txt .venv/.seidra-installed-requirements 2> /dev/null; then
      rm -rf .venv
      python3 -m venv .venv && .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt \
        && cp requirements.txt .venv/.seidra-installed-requirements || exit 1
    fi
  )
}
install || { echo "bench: installing wrk/psql/apsw failed" >&2; exit 2; }
seidra_build || { echo "bench: cargo build failed" >&2; exit 2; }
mkdir -p "$out"

work=$(mktemp -d "${TMPDIR:-/tmp}/seidra-bench.XXXXXX")
pg_db=
cleanup() {
  seidra_stop
  if [ -n "$pg_db" ]; then
    psql "$pg_url/postgres" -qAtc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" > /dev/null 2>&1
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(date -u +%H:%M:%S)] $*"; }
label() { [ -n "$1" ] && echo "?$1" || echo "(no window)"; }
uri_of() { [ -n "$1" ] && echo "$endpoint?$1" || echo "$endpoint"; }
# The window start the service binds for `minutes` (same clock), in each backend's shape.
since_of() {
  local minutes
  minutes=$(sed -n 's/.*minutes=\([0-9]*\).*/\1/p' <<< "$1")
  [ -n "$minutes" ] || { echo ""; return; }
  python3 -c "import datetime as d, sys; t = d.datetime.now(d.timezone.utc) - d.timedelta(minutes=int(sys.argv[1]));
print(t.strftime('%Y-%m-%d %H:%M:%S.') + f'{t.microsecond // 1000:03d}' + ('+00' if sys.argv[2] == 'postgres' else ''))" "$minutes" "$2"
}
# Percentage of the machine's CPU busy over $1 seconds (all processes): taken while our
# service is idle, it tells how much other work (builds, tests) shares the 2 cores.
cpu_busy_pct() {
  local a b
  a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  sleep "$1"
  b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2];
    printf "%.0f", (d > 0 ? 100 * (y[1] - x[1]) / d : 0) }'
}
media_of() { sed -n 's/.*media_type=\([a-z]*\).*/\1/p' <<< "$1"; }
# wrk prints latencies as 812.00us, 12.34ms or 1.20s: milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN { if (v ~ /us$/) printf "%.2f", v / 1000; else if (v ~ /ms$/) printf "%.2f", v + 0;
    else if (v ~ /m$/) printf "%.0f", v * 60000; else if (v ~ /s$/) printf "%.1f", v * 1000; else printf "-" }'
}

# The statements the service runs per scenario, read from its sqlx log on an empty SQLite
# database (the SQL text does not depend on the data); used for PostgreSQL too.
capture_statements() {
  local dir=$work/capture
  mkdir -p "$dir"
  "$SEIDRA_BIN" migrate up --data-dir "$dir" > /dev/null 2>&1
  SEIDRA_LOG_FILE=$dir/serve.log RUST_LOG=info,sqlx::query=debug \
    seidra_start "$dir" --devices cpu --log-format json || return 1
  local token scenario uris=()
  token=$(seidra_token "$dir")
  for scenario in "${scenarios[@]}"; do
    curl -sf -o /dev/null -H "Authorization: Bearer $token" "$SEIDRA_URL$(uri_of "$scenario")" || return 1
    uris+=("$(uri_of "$scenario")")
  done
  seidra_stop
  python3 "$here/statements.py" extract "$dir/serve.log" "${uris[@]}" > "$out/statements.json"
}

# Starts the service on the current backend. Extra environment comes from the caller.
start_service() {
  local data_dir=$1; shift
  if [ "$backend" = postgres ]; then
    seidra_start "$data_dir" --devices cpu --database-url "$pg_url/$pg_db" "$@"
  else
    seidra_start "$data_dir" --devices cpu "$@"
  fi
}

bench_backend() {
  backend=$1
  local data=$work/$backend results=$out/$backend
  mkdir -p "$data" "$results"
  echo
  echo "=================== $backend ==================="

  # 1-2. A fresh database, migrated, filled.
  local started=$SECONDS
  if [ "$backend" = postgres ]; then
    pg_db=seidra_bench_$$
    psql "$pg_url/postgres" -qAtc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" > /dev/null \
      && psql "$pg_url/postgres" -qAtc "CREATE DATABASE $pg_db" > /dev/null || return 1
    log "database $pg_url/$pg_db; migrate up"
    "$SEIDRA_BIN" migrate up --database-url "$pg_url/$pg_db" --data-dir "$data" > "$results/migrate.log" 2>&1 \
      || { cat "$results/migrate.log"; return 1; }
    log "loading $rows rows over $days days (psql \\copy)"
    python3 "$here/load.py" postgres-csv --rows "$rows" --days "$days" \
      | psql "$pg_url/$pg_db" -qc "\\copy generation_metrics ($(python3 "$here/load.py" columns)) FROM STDIN WITH (FORMAT csv)" \
      || return 1
    log "VACUUM ANALYZE"
    psql "$pg_url/$pg_db" -qc "VACUUM ANALYZE generation_metrics" || return 1
    psql "$pg_url/$pg_db" -Atc "SELECT 'PostgreSQL ' || current_setting('server_version') || ', table ' || pg_size_pretty(pg_table_size('generation_metrics')) || ', indexes ' || pg_size_pretty(pg_indexes_size('generation_metrics')) || ', work_mem ' || current_setting('work_mem') || ', shared_buffers ' || current_setting('shared_buffers')"
  else
    log "SQLite database $data/seidra.db; migrate up"
    "$SEIDRA_BIN" migrate up --data-dir "$data" > "$results/migrate.log" 2>&1 || { cat "$results/migrate.log"; return 1; }
    log "loading $rows rows over $days days (python sqlite3)"
    python3 "$here/load.py" sqlite "$data/seidra.db" --rows "$rows" --days "$days" || return 1
    if [ "${BENCH_SQLITE_ANALYZE:-0}" = 1 ]; then
      log "ANALYZE (BENCH_SQLITE_ANALYZE=1; the service itself never runs it)"
      sqlite3 "$data/seidra.db" "ANALYZE" || return 1
    fi
    echo "SQLite file: $(du -h "$data/seidra.db" | cut -f1)"
  fi
  log "database ready in $((SECONDS - started)) s"

  # 3. Single requests (and, on SQLite, the time of each statement inside the service).
  local token scenario uri
  SEIDRA_TELEMETRY_CACHE_SIZE=0 SEIDRA_LOG_FILE=$results/serve-single.log RUST_LOG=info,sqlx::query=debug \
    start_service "$data" --log-format json || return 1
  token=$(seidra_token "$data")
  echo "-- single requests, each answer built (curl, one warm-up then $single timed, seconds)" | tee "$results/single.txt"
  for scenario in "${scenarios[@]}"; do
    uri=$(uri_of "$scenario")
    curl -sf -H "Authorization: Bearer $token" "$SEIDRA_URL$uri" \
      | python3 "$here/statements.py" answer \
      | tee -a "$results/single.txt" || { echo "   request failed: $uri"; return 1; }
    local times=()
    for _ in $(seq "$single"); do
      times+=("$(curl -sf -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $token" "$SEIDRA_URL$uri")")
    done
    local bytes
    bytes=$(curl -sf -o /dev/null -w '%{size_download}' -H "Authorization: Bearer $token" "$SEIDRA_URL$uri")
    echo "   $(label "$scenario"): ${times[*]} s; answer $bytes bytes" | tee -a "$results/single.txt"
  done
  seidra_stop
  if [ "$backend" = sqlite ]; then
    python3 "$here/statements.py" extract "$results/serve-single.log" \
      "$(uri_of "${scenarios[0]}")" "$(uri_of "${scenarios[1]}")" "$(uri_of "${scenarios[2]}")" > "$results/service-statements.json"
    for scenario in "${scenarios[@]}"; do
      echo "-- time of each statement inside the service (sqlx log), $(label "$scenario")"
      python3 "$here/statements.py" service-times "$results/service-statements.json" "$(uri_of "$scenario")"
    done | tee "$results/service-times.txt"
  fi

  # 4. Plans and per-statement timings.
  for scenario in "${scenarios[@]}"; do
    local since media
    since=$(since_of "$scenario" "$backend")
    media=$(media_of "$scenario")
    echo
    # shellcheck disable=SC2016 # the quotes are literal, $since expands
    echo "-- statements of $(label "$scenario") on $backend${since:+ (created_at >= '$since')}"
    if [ "$backend" = postgres ]; then
      python3 "$here/statements.py" postgres-script "$out/statements.json" "$(uri_of "$scenario")" "$since" "$media" --runs "$runs" \
        > "$results/plans-$(label "$scenario" | tr -c 'a-z0-9\n' '_').sql"
      psql "$pg_url/$pg_db" -X -q -f "$results/plans-$(label "$scenario" | tr -c 'a-z0-9\n' '_').sql" 2>&1 \
        | tee "$work/psql.out"
      python3 "$here/statements.py" psql-times < "$work/psql.out"
    else
      python3 "$here/statements.py" sqlite-script "$out/statements.json" "$(uri_of "$scenario")" "$since" "$media" --runs "$runs" \
        > "$results/plans-$(label "$scenario" | tr -c 'a-z0-9\n' '_').sqlite3.sql"
      "$here/.venv/bin/python" "$here/statements.py" sqlite-run "$out/statements.json" "$(uri_of "$scenario")" "$since" "$media" \
        "$data/seidra.db" --runs "$runs"
    fi
  done 2>&1 | tee "$results/plans.txt"

  # 5. wrk, one fresh service per scenario and answer mode: `kept` (the default: answers are
  # sent again while the table, the recent buffer and the window's rows stay the same, which
  # they do here as nothing commits) and `built` (SEIDRA_TELEMETRY_CACHE_SIZE=0: every
  # request builds its answer, as when rows commit between any two requests).
  local summary=$results/summary.txt
  printf '%-40s %10s %10s %10s %10s %9s %8s %8s\n' "scenario ($backend)" "req/s" "p50 ms" "p99 ms" "max ms" "requests" "errors" "bg cpu%" > "$summary"
  for scenario in "${scenarios[@]}"; do
    for mode in $answer_modes; do
      local cache_size=64
      [ "$mode" = built ] && cache_size=0
      SEIDRA_TELEMETRY_CACHE_SIZE=$cache_size SEIDRA_LOG_FILE=$results/serve-wrk.log RUST_LOG=warn \
        start_service "$data" || return 1
      token=$(seidra_token "$data")
      uri=$(uri_of "$scenario")
      curl -sf -o /dev/null -H "Authorization: Bearer $token" "$SEIDRA_URL$uri" || return 1
      local wrk_out
      wrk_out=$results/wrk-$(label "$scenario" | tr -c 'a-z0-9\n' '_')-$mode.txt
      # A fresh service may still be refreshing SQLite's statistics (`PRAGMA optimize` at
      # start): wait, up to a minute, for the machine to settle, so that wrk measures answers.
      local background tries=0
      background=$(cpu_busy_pct 3)
      while [ "$background" -ge 10 ] && [ "$tries" -lt 20 ]; do
        background=$(cpu_busy_pct 3)
        tries=$((tries + 1))
      done
      echo
      log "machine CPU busy before the run (service idle): $background % (load average $(cut -d' ' -f1-3 /proc/loadavg))"
      log "wrk -t$threads -c$connections -d$duration --latency --timeout $wrk_timeout $(label "$scenario"), answers $mode"
      wrk -t"$threads" -c"$connections" -d"$duration" --latency --timeout "$wrk_timeout" \
        -H "Authorization: Bearer $token" "$SEIDRA_URL$uri" | tee "$wrk_out"
      seidra_stop
      local rps p50 p99 max requests errors
      rps=$(awk '/^Requests\/sec:/ { print $2 }' "$wrk_out")
      p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$wrk_out")")
      p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$wrk_out")")
      max=$(to_ms "$(awk '$1 == "Latency" && NF >= 4 { print $4 }' "$wrk_out")")
      requests=$(awk '/requests in/ { print $1 }' "$wrk_out")
      errors=$(awk '/Socket errors:/ { gsub(",", ""); e += $4 + $6 + $8 + $10 } /Non-2xx/ { e += $NF } END { print e + 0 }' "$wrk_out")
      printf '%-40s %10s %10s %10s %10s %9s %8s %8s\n' "$(label "$scenario") $mode" "${rps:--}" "$p50" "$p99" "$max" "${requests:-0}" "${errors:-0}" "$background" >> "$summary"
    done
  done
  echo
  cat "$summary"
}

log "results under $out"
capture_statements || { echo "bench: capturing the service's statements failed" >&2; exit 1; }
status=0
for backend in $backends; do
  if ! bench_backend "$backend"; then
    echo "bench: $backend failed" >&2
    status=1
  fi
  seidra_stop
  if [ "$backend" = postgres ] && [ -n "$pg_db" ]; then
    psql "$pg_url/postgres" -qAtc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" > /dev/null && pg_db=
  fi
done

echo
echo "=================== summary ($rows rows over $days days; wrk -t$threads -c$connections -d$duration) ==================="
echo "targets: p99 < 10 ms for ?minutes=60, p99 < 50 ms with no window"
echo "errors: socket errors and timeouts plus non-2xx answers; bg cpu%: the machine's CPU busy in the 3 s before the run, service idle (other work on the 2 cores)"
for backend in $backends; do
  [ -f "$out/$backend/summary.txt" ] && cat "$out/$backend/summary.txt"
done
echo "raw outputs: $out"
exit "$status"
