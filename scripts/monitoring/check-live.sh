#!/usr/bin/env bash
# The monitoring checks against a live service: starts `seidra serve` on a free loopback port
# with a fresh data directory, runs a few small jobs (one fails on purpose) so every panel has
# data, then runs check-all.sh with BASE_URL and TOKEN set (Infinity queries evaluated on the
# live answers, `promtool check metrics` on /metrics).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../api/lib.sh
source "$root/scripts/api/lib.sh"

seidra_workdir seidra-monitoring
data=$work
seidra_build
seidra_start "$data" --devices cpu
token=$(seidra_token "$data")
for body in \
  '{"media_type":"image","prompt":"a","width":32,"height":32,"steps":2,"seed":1}' \
  '{"media_type":"video","prompt":"b","width":32,"height":32,"steps":2,"frames":3,"seed":2}' \
  '{"media_type":"image","prompt":"c","width":32,"height":32,"steps":2,"seed":3,"scheduler":"euler"}'; do
  curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' -d "$body" \
    "$SEIDRA_URL/api/jobs" > /dev/null
done
for _ in $(seq 1 600); do
  total=$(curl -sf -H "Authorization: Bearer $token" "$SEIDRA_URL/api/system/telemetry/generation" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["total"])')
  [ "$total" -ge 3 ] && break
  sleep 0.1
done
BASE_URL=$SEIDRA_URL TOKEN=$token "$here/check-all.sh"
