#!/usr/bin/env bash
# Stand-in for loading the dashboard into Grafana (which cannot run here):
#  1. type-check monitoring/grafana/ultimate-dashboard.json, wrapped as a TypeScript const,
#     in strict mode against npm @grafana/schema 11.6 (dashboard-schema.ts);
#  2. check what the procedure asks beyond types (dashboard-rules.mjs);
#  3. damage a copy on purpose (a panel type of 42, a panel without gridPos) and make sure
#     the type-check rejects it: a check that lets it through proves nothing.
# Needs `npm ci` in scripts/monitoring. Usage: check-dashboard.sh [DASHBOARD.json]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dashboard=$(realpath "${1:-$here/../../monitoring/grafana/ultimate-dashboard.json}")
tsc="$here/node_modules/.bin/tsc"
[ -x "$tsc" ] || { echo "check-dashboard: run 'npm ci' in $here first" >&2; exit 2; }

build=$(mktemp -d "${TMPDIR:-/tmp}/seidra-dashboard.XXXXXX")
trap 'rm -rf "$build"' EXIT

node "$here/wrap-dashboard.mjs" "$dashboard" "$build/good"
if "$tsc" -p "$build/good/tsconfig.json" > "$build/good.log" 2>&1; then
  echo "ok   dashboard type-checks against @grafana/schema $(node -p "require('$here/node_modules/@grafana/schema/package.json').version")"
else
  cut -c1-400 "$build/good.log"
  echo "FAIL dashboard does not type-check ($(grep -c 'error TS' "$build/good.log") error(s))"
  exit 1
fi

node "$here/dashboard-rules.mjs" "$dashboard"

node "$here/wrap-dashboard.mjs" "$dashboard" "$build/broken" --break
if "$tsc" -p "$build/broken/tsconfig.json" > "$build/broken.log" 2>&1; then
  echo "FAIL a copy with a panel type of 42 and a missing gridPos passed the type-check"
  exit 1
fi
for want in "Type 'number' is not assignable" "Property 'gridPos' is missing"; do
  if ! grep -q "$want" "$build/broken.log"; then
    cut -c1-400 "$build/broken.log"
    echo "FAIL the damaged copy failed, but not with: $want"
    exit 1
  fi
done
echo "ok   damaged copy rejected ($(grep -c 'error TS' "$build/broken.log") error(s): type 42, missing gridPos)"
