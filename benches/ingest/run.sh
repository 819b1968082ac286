#!/usr/bin/env bash
# Ingest rate of the TelemetryWriterActor against plain prepared inserts in one transaction,
# on the embedded SQLite file and on PostgreSQL.
#
#   benches/ingest/run.sh [sqlite|postgres|all]      (default: all)
#
# Environment: BENCH_ROWS (rows per method, default 100,000), BENCH_PRODUCERS (concurrent
# senders to the writer, default 512), BENCH_MAX_BATCH (the writer's largest transaction,
# default 256, the service's default), BENCH_PG_URL (default postgres://postgres@127.0.0.1:5432;
# a database seidra_ingest_<pid> is created there and dropped at the end).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
backends=${1:-all}
case $backends in
  all) backends="sqlite postgres" ;;
  sqlite | postgres) ;;
  *) echo "usage: $0 [sqlite|postgres|all]" >&2; exit 2 ;;
esac
pg_url=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
args=(--rows "${BENCH_ROWS:-100000}" --producers "${BENCH_PRODUCERS:-512}" --max-batch "${BENCH_MAX_BATCH:-256}")

cargo build --quiet --example writer-ingest
driver=$root/target/debug/examples/writer-ingest

pg_db=
cleanup() {
  if [ -n "$pg_db" ]; then
    psql "$pg_url/postgres" -qAtc "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" > /dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

for backend in $backends; do
  echo "== $backend"
  if [ "$backend" = postgres ]; then
    pg_db=seidra_ingest_$$
    psql "$pg_url/postgres" -qAtc "CREATE DATABASE $pg_db" > /dev/null
    "$driver" "${args[@]}" --database-url "$pg_url/$pg_db"
  else
    "$driver" "${args[@]}"
  fi
done
