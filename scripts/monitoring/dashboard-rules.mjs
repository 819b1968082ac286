#!/usr/bin/env node
// What the procedure asks of the dashboard beyond its types: the two named panels with their
// queries and refresh, unique ids, and a layout that fits Grafana's 24-column grid.
//
//   node dashboard-rules.mjs [DASHBOARD.json]

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const path = process.argv[2] ?? fileURLToPath(new URL('../../monitoring/grafana/ultimate-dashboard.json', import.meta.url));
const dashboard = JSON.parse(readFileSync(path, 'utf8'));
const problems = [];
const expect = (condition, message) => condition || problems.push(message);

const panels = dashboard.panels ?? [];
const byTitle = (title) => panels.find((p) => p.title === title);
const columns = (panel) => (panel?.targets?.[0]?.columns ?? []).map((c) => `${c.selector}:${c.type}:${c.text}`);

const stat = byTitle("Temps moyen d'inférence (60 min)");
expect(stat?.type === 'stat', "no Stat panel « Temps moyen d'inférence (60 min) »");
if (stat) {
  const target = stat.targets[0];
  expect(target.url === '/api/system/telemetry/generation?minutes=60', `stat url is ${target.url}`);
  expect(target.root_selector === 'summary', `stat root selector is ${target.root_selector}`);
  expect(columns(stat)[0]?.startsWith('avg_duration_seconds:number:'), 'stat does not read summary.avg_duration_seconds as a number');
  expect(stat.fieldConfig?.defaults?.unit === 's', 'stat unit is not seconds');
  expect(stat.interval === '1m', 'stat interval is not 1m');
}

const table = byTitle('Dernières générations');
expect(table?.type === 'table', 'no Table panel « Dernières générations »');
if (table) {
  const want = [
    'created_at:timestamp:time', 'media_type:string:type', 'model_name:string:model',
    'duration_seconds:number:duration', 'throughput:number:throughput', 'vram_peak_mb:number:peak VRAM',
  ];
  expect(JSON.stringify(columns(table)) === JSON.stringify(want), `table columns are ${columns(table).join(', ')}`);
  expect(table.targets[0].root_selector === 'items', 'table does not list items');
}
expect(dashboard.refresh === '30s', `dashboard refresh is ${dashboard.refresh}, the table needs 30s`);

const ids = panels.map((p) => p.id);
expect(new Set(ids).size === ids.length, `panel ids repeat: ${ids.join(', ')}`);
for (const panel of panels) {
  const refIds = (panel.targets ?? []).map((t) => t.refId);
  expect(new Set(refIds).size === refIds.length, `panel ${panel.id} repeats a refId`);
  const g = panel.gridPos;
  if (g) expect(g.x >= 0 && g.w > 0 && g.h > 0 && g.x + g.w <= 24, `panel ${panel.id} does not fit the 24-column grid`);
}
for (const [i, a] of panels.entries()) {
  for (const b of panels.slice(i + 1)) {
    const [p, q] = [a.gridPos, b.gridPos];
    if (p && q && p.x < q.x + q.w && q.x < p.x + p.w && p.y < q.y + q.h && q.y < p.y + p.h) {
      problems.push(`panels ${a.id} and ${b.id} overlap`);
    }
  }
}

for (const problem of problems) console.log(`FAIL ${problem}`);
console.log(problems.length === 0 ? `ok   ${panels.length} panels follow the procedure's rules` : `${problems.length} rule(s) broken`);
process.exitCode = problems.length === 0 ? 0 : 1;
