#!/usr/bin/env bash
# Every monitoring check, installing what it needs first (npm registry, PyPI, Debian):
#   check-dashboard.sh     dashboard JSON type-checked against @grafana/schema (+ damaged copy)
#   check-provisioning.sh  Grafana provisioning YAML against schemas/ (+ damaged copies)
#   check-prometheus.sh    promtool check/test rules, check config; /metrics when live
#   check-infinity.mjs     dry run on the contract fixtures; the live service when BASE_URL
#                          and TOKEN are set (TOKEN=$(seidra token --role operator --user grafana))
# Exits non-zero when any check fails. Runs offline once installed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 2

install() {
  if ! cmp -s package-lock.json node_modules/.seidra-installed-lock 2> /dev/null; then
    npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.seidra-installed-lock || return 1
  fi
  if ! cmp -s requirements.txt .venv/.seidra-installed-requirements 2> /dev/null; then
    rm -rf .venv
    python3 -m venv .venv && .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt \
      && cp requirements.txt .venv/.seidra-installed-requirements || return 1
  fi
  if ! command -v promtool > /dev/null; then
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus > /dev/null \
      || return 1
  fi
}
install || { echo "check-all: installing the tools failed" >&2; exit 2; }

passed=0
failed=0
check() {
  local name=$1; shift
  echo "== $name"
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "!! $name failed"; fi
}

check "dashboard" ./check-dashboard.sh
check "provisioning" ./check-provisioning.sh
check "prometheus" ./check-prometheus.sh
for fixture in fixtures/telemetry-generation.busy.json fixtures/telemetry-generation.idle.json; do
  check "infinity dry run on $fixture" env -u BASE_URL -u TOKEN FIXTURE="$fixture" node check-infinity.mjs
done
if [ -n "${BASE_URL:-}" ] && [ -n "${TOKEN:-}" ]; then
  check "infinity on ${BASE_URL}" env -u FIXTURE node check-infinity.mjs
else
  echo "== infinity on a live service: skipped (set BASE_URL and TOKEN)"
fi

echo "monitoring: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
