#!/usr/bin/env node
// Stand-in for Grafana's Infinity backend parser, which cannot run here.
//
// For every Infinity query of the dashboard and of the Grafana alert rules, ask the SEIDRA
// API for its URL with the operator token, select the root the way Infinity 3.x does, read
// each declared column from each row, and check the values against the declared column type.
// Prints one line per query; exits 1 when any query fails, 2 when it cannot start.
//
//   BASE_URL=http://127.0.0.1:8080 TOKEN=$(seidra token --role operator --user grafana) \
//     node scripts/monitoring/check-infinity.mjs
//
// FIXTURE=path/to/answer.json answers every query from that file instead of HTTP (an offline
// dry run of the selectors against the contract's shape). REQUIRE_ROWS=1 turns a query that
// returns no rows (column types left unchecked) into a failure.
//
// How Infinity 3.x (parser "backend", jsonframer) reads an answer, and so what this mirrors:
// - the root selector is tried as a gjson path first and, only when that path finds nothing,
//   as JSONata; so a JSONata expression must not read as a gjson path: we require either a
//   plain dotted path (same meaning in both) or an expression wrapped in parentheses;
// - with columns declared, a scalar root (or a null one) gives an empty frame, and a null root
//   without columns is an error: a root such as `summary.avg_duration_seconds` breaks on an
//   idle host, where the figure is null;
// - each column selector is a gjson path read on each row: we require a plain dotted path,
//   whose meaning gjson and JSONata share, and read it with JSONata;
// - format "timeseries" turns a long frame into a wide one, which needs rows sorted by time.

import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

import jsonata from 'jsonata';
import YAML from 'yaml';

const INFINITY = 'yesoreyeram-infinity-datasource';
const repoFile = (path) => fileURLToPath(new URL(`../../${path}`, import.meta.url));
const DASHBOARD = process.env.DASHBOARD ?? repoFile('monitoring/grafana/ultimate-dashboard.json');
const ALERT_RULES =
  process.env.ALERT_RULES ?? repoFile('monitoring/grafana/provisioning/alerting/seidra-alerts.yaml');

const PLAIN_PATH = /^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$/;
// What Go's time.Parse(time.RFC3339, …) accepts, fractional seconds included.
const RFC3339 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/;

/** One Infinity query to run: where it comes from, its model, and the variables it may use. */
function queriesOf(dashboard, alertRules) {
  const variables = Object.fromEntries(
    (dashboard.templating?.list ?? []).map((v) => [v.name, String(v.current?.value ?? '')]),
  );
  const queries = [];
  const walk = (panels) => {
    for (const panel of panels ?? []) {
      walk(panel.panels);
      for (const target of panel.targets ?? []) {
        const type = target.datasource?.type ?? panel.datasource?.type;
        if (type === INFINITY) {
          queries.push({ where: `panel ${panel.id} «${panel.title}» ${target.refId}`, query: target, variables });
        }
      }
    }
  };
  walk(dashboard.panels);
  for (const group of alertRules.groups ?? []) {
    for (const rule of group.rules ?? []) {
      for (const data of rule.data ?? []) {
        if (data.datasourceUid !== '__expr__') {
          queries.push({ where: `alert «${rule.title}» ${data.refId}`, query: data.model ?? {}, variables: {} });
        }
      }
    }
  }
  return queries;
}

/** Replaces `$name`, `${name}` and `${name:format}` with the dashboard variable's current value. */
function interpolate(url, variables) {
  return url.replace(/\$\{(\w+)(?::[^}]*)?\}|\$(\w+)/g, (_, braced, bare) => {
    const name = braced ?? bare;
    if (!(name in variables)) throw new Error(`url uses $${name}, which no dashboard variable defines`);
    return encodeURIComponent(variables[name]);
  });
}

function checkStatic(query) {
  const problems = [];
  if (query.type !== 'json') problems.push(`type is ${JSON.stringify(query.type)}, not "json"`);
  if (query.source !== 'url') problems.push(`source is ${JSON.stringify(query.source)}, not "url"`);
  if (query.parser !== 'backend') problems.push(`parser is ${JSON.stringify(query.parser)}, not "backend"`);
  if (typeof query.url !== 'string' || !query.url.startsWith('/')) {
    problems.push(`url ${JSON.stringify(query.url)} is not relative to the datasource's base URL`);
  }
  if ((query.url_options?.method ?? 'GET') !== 'GET') problems.push('url_options.method is not GET');
  if (!Array.isArray(query.columns)) problems.push('columns is not a list');
  for (const column of query.columns ?? []) {
    if (!PLAIN_PATH.test(column.selector ?? '')) {
      problems.push(`column selector ${JSON.stringify(column.selector)} is not a plain path`);
    }
    if (!column.text) problems.push(`column ${column.selector} has no text`);
    if (!['string', 'number', 'timestamp'].includes(column.type)) {
      problems.push(`column ${column.selector} has type ${JSON.stringify(column.type)}`);
    }
  }
  if (query.format === 'timeseries' && (query.columns ?? []).filter((c) => c.type === 'timestamp').length !== 1) {
    problems.push('a timeseries query needs exactly one timestamp column');
  }
  return problems;
}

async function fetchAnswer(url) {
  if (process.env.FIXTURE) {
    return { status: 'fixture', body: JSON.parse(await readFile(process.env.FIXTURE, 'utf8')) };
  }
  const response = await fetch(process.env.BASE_URL.replace(/\/+$/, '') + url, {
    headers: { Authorization: `Bearer ${process.env.TOKEN}`, Accept: 'application/json' },
    signal: AbortSignal.timeout(15_000),
  });
  const text = await response.text();
  if (response.status !== 200) {
    throw new Error(`GET ${url} answered ${response.status}: ${text.slice(0, 200)}`);
  }
  try {
    return { status: 200, body: JSON.parse(text) };
  } catch {
    throw new Error(`GET ${url} answered 200 with a body that is not JSON: ${text.slice(0, 200)}`);
  }
}

async function selectRoot(answer, selector) {
  if (!selector) return answer;
  if (PLAIN_PATH.test(selector)) {
    let value = answer;
    for (const key of selector.split('.')) {
      if (Array.isArray(value) || value === null || typeof value !== 'object' || !(key in value)) {
        throw new Error(`root selector ${selector} finds nothing at "${key}" in the answer`);
      }
      value = value[key];
    }
    return value;
  }
  if (!selector.trimStart().startsWith('(')) {
    throw new Error(
      'root selector is neither a plain path nor a JSONata expression in parentheses: ' +
        'Infinity tries it as a gjson path first, which may capture it',
    );
  }
  return jsonata(selector).evaluate(answer);
}

/** The rows Infinity's framer would build from the selected root, or an error it would hit. */
function rowsOf(root, columns) {
  if (columns.length === 0) {
    if (root === undefined || root === null) throw new Error('root is null and no columns: Infinity fails the query');
    return Array.isArray(root) ? root : [root];
  }
  if (root === undefined || root === null) return [];
  if (Array.isArray(root)) {
    const odd = root.find((row) => row === null || typeof row !== 'object' || Array.isArray(row));
    if (odd !== undefined) throw new Error(`root holds a non-object row (${JSON.stringify(odd)})`);
    return root;
  }
  if (typeof root === 'object') return [root];
  throw new Error(`root is the scalar ${JSON.stringify(root)}: with columns declared Infinity builds an empty frame`);
}

function typeProblem(value, type) {
  if (value === undefined) return 'is missing';
  switch (type) {
    case 'timestamp':
      return typeof value === 'string' && RFC3339.test(value) && !Number.isNaN(Date.parse(value))
        ? null
        : `is ${JSON.stringify(value)}, not an RFC3339 timestamp`;
    case 'number':
      return value === null || (typeof value === 'number' && Number.isFinite(value))
        ? null
        : `is ${JSON.stringify(value)}, not a number or null`;
    case 'string':
      return typeof value === 'string' ? null : `is ${JSON.stringify(value)}, not a string`;
    default:
      return `has an unknown column type ${type}`;
  }
}

async function checkQuery({ query, variables }) {
  const problems = checkStatic(query);
  if (problems.length > 0) throw new Error(problems.join('; '));

  const url = interpolate(query.url, variables);
  const { status, body } = await fetchAnswer(url);
  const root = await selectRoot(body, query.root_selector);
  const rows = rowsOf(root, query.columns);

  for (const column of query.columns) {
    const reader = jsonata(column.selector);
    const values = [];
    for (const [index, row] of rows.entries()) {
      const value = await reader.evaluate(row);
      const problem = typeProblem(value, column.type);
      if (problem) throw new Error(`row ${index}: column ${column.selector} (${column.type}) ${problem}`);
      values.push(value);
    }
    if (query.format === 'timeseries' && column.type === 'timestamp') {
      const times = values.map(Date.parse);
      const late = times.findIndex((t, i) => i > 0 && t < times[i - 1]);
      if (late > 0) throw new Error(`rows are not in ascending time order at row ${late}: Infinity cannot make series`);
    }
  }
  return `GET ${url} → ${status}, ${rows.length} row(s) × ${query.columns.length} column(s)`;
}

async function main() {
  if (!process.env.FIXTURE && !(process.env.BASE_URL && process.env.TOKEN)) {
    console.error('check-infinity: set BASE_URL and TOKEN (or FIXTURE=answer.json for a dry run)');
    return 2;
  }
  const dashboard = JSON.parse(await readFile(DASHBOARD, 'utf8'));
  const alertRules = YAML.parse(await readFile(ALERT_RULES, 'utf8'));
  const queries = queriesOf(dashboard, alertRules);
  if (queries.length === 0) {
    console.error('check-infinity: found no Infinity query');
    return 1;
  }

  let failed = 0;
  let empty = 0;
  for (const entry of queries) {
    try {
      const summary = await checkQuery(entry);
      const noRows = summary.includes(' 0 row(s)');
      if (noRows) empty += 1;
      const strict = noRows && process.env.REQUIRE_ROWS === '1';
      if (strict) failed += 1;
      console.log(`${strict ? 'FAIL' : 'ok  '} ${entry.where}: ${summary}${noRows ? ' (column types not exercised)' : ''}`);
    } catch (error) {
      failed += 1;
      console.log(`FAIL ${entry.where}: ${error.message}`);
    }
  }
  console.log(`${queries.length - failed} passed, ${failed} failed`);
  if (empty > 0 && process.env.REQUIRE_ROWS !== '1') {
    console.log(`note: ${empty} query(ies) returned no rows; run generations first to check their column types`);
  }
  return failed > 0 ? 1 : 0;
}

process.exitCode = await main();
