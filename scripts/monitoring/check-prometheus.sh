#!/usr/bin/env bash
# Checks the Prometheus side with promtool (Debian package `prometheus`):
#  - the alert rules parse (promtool check rules) and behave as their tests say
#    (promtool test rules: silent at 3 minutes of slow generations, firing at 10, silent
#    when idle or when nothing is exported);
#  - prometheus.yml parses, with its token file stood in for by an empty one;
#  - with BASE_URL and TOKEN set, what the running service exposes on /metrics passes
#    promtool check metrics.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
prom=$(realpath "$here/../../monitoring/prometheus")
command -v promtool > /dev/null || { echo "check-prometheus: promtool missing (apt-get install prometheus)" >&2; exit 2; }

run() {
  local what=$1; shift
  if out=$("$@" 2>&1); then
    echo "ok   $what"
  else
    echo "$out"
    echo "FAIL $what"
    exit 1
  fi
}

run "promtool check rules seidra-alerts.yml" promtool check rules "$prom/seidra-alerts.yml"
(cd "$prom" && run "promtool test rules seidra-alerts.test.yml" promtool test rules seidra-alerts.test.yml)

scratch=$(mktemp -d "${TMPDIR:-/tmp}/seidra-prometheus.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cp "$prom/seidra-alerts.yml" "$scratch/"
: > "$scratch/seidra.token"
sed "s#credentials_file: /run/secrets/seidra_token#credentials_file: $scratch/seidra.token#" \
  "$prom/prometheus.yml" > "$scratch/prometheus.yml"
grep -q "credentials_file: $scratch/seidra.token" "$scratch/prometheus.yml" \
  || { echo "FAIL prometheus.yml no longer reads /run/secrets/seidra_token"; exit 1; }
run "promtool check config prometheus.yml" promtool check config "$scratch/prometheus.yml"

if [ -n "${BASE_URL:-}" ] && [ -n "${TOKEN:-}" ]; then
  curl -fsS --max-time 15 -H "Authorization: Bearer $TOKEN" "${BASE_URL%/}/metrics" > "$scratch/metrics.txt" \
    || { echo "FAIL GET ${BASE_URL%/}/metrics"; exit 1; }
  run "promtool check metrics on ${BASE_URL%/}/metrics" promtool check metrics < "$scratch/metrics.txt"
  # A labelled metric shows only once it has a child: a service that has run no generation
  # may export none of these yet, so a missing one is reported, not failed.
  missing=()
  for name in seidra_generation_duration_seconds seidra_generation_queue_wait_seconds seidra_generation_outputs \
              seidra_generations seidra_gpu_vram_peak_mib seidra_gpu_vram_allocated_mib seidra_gpu_vram_reserved_mib; do
    grep -Eq "^(# TYPE )?${name}(_total|_bucket|_count|_sum)?[ {]" "$scratch/metrics.txt" || missing+=("$name")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "ok   /metrics shows the seven seidra_* metrics the dashboards and alerts use"
  else
    echo "note /metrics does not show (yet): ${missing[*]}"
  fi
else
  echo "skip /metrics checks (set BASE_URL and TOKEN to run them against the service)"
fi
