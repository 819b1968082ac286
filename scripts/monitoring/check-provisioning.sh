#!/usr/bin/env bash
# Stand-in for Grafana reading its provisioning files (Grafana cannot run here): validates
# the datasource, dashboard-provider and alert-rule YAML under monitoring/grafana/provisioning
# with check-jsonschema against the schemas in scripts/monitoring/schemas, checks
# monitoring/docker-compose.yml against the Compose specification and its mounts, then
# makes sure each schema rejects damaged copies of its file.
# Needs check-jsonschema (requirements.txt; check-all.sh installs it in .venv).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
provisioning=$(realpath "$here/../../monitoring/grafana/provisioning")
checker="$here/.venv/bin/check-jsonschema"
[ -x "$checker" ] || checker=$(command -v check-jsonschema) || {
  echo "check-provisioning: install check-jsonschema (pip install -r $here/requirements.txt)" >&2
  exit 2
}

files=(
  "grafana-datasources:datasources/seidra.yaml"
  "grafana-dashboard-providers:dashboards/seidra.yaml"
  "grafana-alert-rules:alerting/seidra-alerts.yaml"
)
for entry in "${files[@]}"; do
  schema="$here/schemas/${entry%%:*}.schema.json"
  file="$provisioning/${entry#*:}"
  if out=$("$checker" --schemafile "$schema" "$file" 2>&1); then
    echo "ok   ${entry#*:} follows ${entry%%:*}.schema.json"
  else
    echo "$out"
    echo "FAIL ${entry#*:} does not follow ${entry%%:*}.schema.json"
    exit 1
  fi
done

# The compose file that mounts all this: valid against the Compose specification (schema
# bundled with check-jsonschema), every bind-mounted file present, and the dashboard mounted
# where the dashboard provider looks.
monitoring=$(realpath "$here/../../monitoring")
if out=$("$checker" --builtin-schema vendor.compose-spec "$monitoring/docker-compose.yml" 2>&1); then
  echo "ok   docker-compose.yml follows the Compose specification"
else
  echo "$out"
  echo "FAIL docker-compose.yml does not follow the Compose specification"
  exit 1
fi
while read -r source; do
  [ -e "$monitoring/$source" ] || { echo "FAIL docker-compose.yml mounts $source, which does not exist"; exit 1; }
done < <(sed -nE 's#^ +- \./([^:]+):.*#\1#p' "$monitoring/docker-compose.yml")
dashboards_path=$(sed -nE 's#^ +path: (.+)$#\1#p' "$provisioning/dashboards/seidra.yaml")
grep -q "ultimate-dashboard.json:$dashboards_path/ultimate-dashboard.json" "$monitoring/docker-compose.yml" \
  || { echo "FAIL docker-compose.yml does not mount the dashboard in $dashboards_path"; exit 1; }
echo "ok   docker-compose.yml mounts files that exist, the dashboard where the provider reads"

# Each damage is one line of sed on a copy; the schema must refuse every one of them.
broken=$(mktemp -d "${TMPDIR:-/tmp}/seidra-provisioning.XXXXXX")
trap 'rm -rf "$broken"' EXIT
damages=(
  "grafana-alert-rules|alerting/seidra-alerts.yaml|s/noDataState: OK/noDataState: Ok/|noDataState spelt Ok"
  "grafana-alert-rules|alerting/seidra-alerts.yaml|s/execErrState: Error/execErrState: Failing/|unknown execErrState"
  "grafana-alert-rules|alerting/seidra-alerts.yaml|s/^        for: 5m/        for: five minutes/|for that is not a duration"
  "grafana-alert-rules|alerting/seidra-alerts.yaml|s/parser: backend/parser: simple/|frontend parser in an alert"
  "grafana-datasources|datasources/seidra.yaml|s/bearerToken: \\\${SEIDRA_GRAFANA_TOKEN}/bearerToken: eyJhbGciOi.literal/|literal token"
  "grafana-datasources|datasources/seidra.yaml|/allowedHosts:/,+1d|no allowedHosts"
  "grafana-datasources|datasources/seidra.yaml|s/^    uid: SEIDRA_API/    uidd: SEIDRA_API/|misspelt uid"
  "grafana-dashboard-providers|dashboards/seidra.yaml|s/type: file/type: files/|unknown provider type"
)
for damage in "${damages[@]}"; do
  IFS='|' read -r schema file script what <<< "$damage"
  copy="$broken/$(basename "$file")"
  sed -e "$script" "$provisioning/$file" > "$copy"
  if cmp -s "$copy" "$provisioning/$file"; then
    echo "FAIL the damage '$what' changed nothing in $file"
    exit 1
  fi
  if "$checker" --schemafile "$here/schemas/$schema.schema.json" "$copy" > /dev/null 2>&1; then
    echo "FAIL $schema.schema.json accepts $file with $what"
    exit 1
  fi
  echo "ok   $schema.schema.json rejects $what"
done
