// The shape the SEIDRA dashboard must have, built on the types of npm @grafana/schema
// (Grafana 11.6) and narrowed where our dashboard promises more than Grafana requires:
// every panel has an id, a title and a grid position, reads the Infinity datasource through
// the `datasource` variable, and queries the SEIDRA API with the backend (JSONata) parser.
//
// check-dashboard.sh wraps ultimate-dashboard.json as
// `export const dashboard = <json> satisfies SeidraDashboard;` and type-checks it strictly.

import type { Dashboard, GridPos, Panel, VariableModel } from '@grafana/schema';
import type { Options as BarChartOptions, FieldConfig as BarChartFieldConfig } from '@grafana/schema/dist/esm/raw/composable/barchart/panelcfg/x/BarChartPanelCfg_types.gen';
import type { Options as StatOptions } from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type { Options as TableOptions, FieldConfig as TableFieldConfig } from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type { Options as TimeSeriesOptions, FieldConfig as TimeSeriesFieldConfig } from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/**
 * Grafana's schema declares its choices as TypeScript enums, which a JSON string can never
 * satisfy. This maps every string enum, however deep, to the union of its literal values
 * (`BigValueColorMode` becomes `"background" | "background_solid" | "none" | "value"`), so the
 * JSON is checked against the values the enum allows. Numeric enums accept number literals as is.
 */
export type Literal<T> = T extends string
  ? `${T}`
  : T extends ReadonlyArray<infer U>
    ? Array<Literal<U>>
    : T extends object
      ? { [K in keyof T]: Literal<T[K]> }
      : T;

/** Every panel and query names the datasource through the dashboard variable. */
export interface InfinityDatasourceRef {
  type: 'yesoreyeram-infinity-datasource';
  uid: '${datasource}';
}

/** A column of an Infinity query: `selector` is read from each row of the root selection. */
export interface InfinityColumn {
  selector: string;
  text: string;
  type: 'string' | 'number' | 'timestamp';
}

/** The one kind of query this dashboard makes: JSON from the SEIDRA API, parsed by JSONata. */
export interface InfinityTarget {
  refId: string;
  datasource: InfinityDatasourceRef;
  type: 'json';
  source: 'url';
  parser: 'backend';
  format: 'table' | 'timeseries';
  /** Relative: the datasource holds the base URL. */
  url: `/api/system/${string}`;
  url_options: { method: 'GET'; data?: string };
  root_selector: string;
  columns: [InfinityColumn, ...InfinityColumn[]];
  filters?: [];
  hide?: boolean;
}

type SeidraPanel<Type extends string, Options, FieldConfig = Record<string, unknown>> = Omit<
  Literal<Panel<Options, FieldConfig>>,
  'type' | 'id' | 'title' | 'gridPos' | 'datasource' | 'targets' | 'options'
> & {
  type: Type;
  id: number;
  title: string;
  gridPos: Literal<GridPos>;
  datasource: InfinityDatasourceRef;
  targets: [InfinityTarget, ...InfinityTarget[]];
  options: Literal<Options>;
};

export type StatPanel = SeidraPanel<'stat', StatOptions>;
export type TablePanel = SeidraPanel<'table', TableOptions, TableFieldConfig>;
export type TimeSeriesPanel = SeidraPanel<'timeseries', TimeSeriesOptions, TimeSeriesFieldConfig>;
export type BarChartPanel = SeidraPanel<'barchart', BarChartOptions, BarChartFieldConfig>;

/** The `datasource` variable: Infinity datasources only, SEIDRA_API unless the user picks another. */
export type DatasourceVariable = Literal<VariableModel> & {
  name: 'datasource';
  type: 'datasource';
  query: 'yesoreyeram-infinity-datasource';
  current: { selected?: boolean; text: string; value: 'SEIDRA_API' };
};

export type SeidraDashboard = Omit<Literal<Dashboard>, 'panels' | 'templating' | 'uid' | 'title' | 'refresh'> & {
  uid: string;
  title: string;
  refresh: string;
  panels: Array<StatPanel | TablePanel | TimeSeriesPanel | BarChartPanel>;
  templating: { list: [DatasourceVariable, ...Array<Literal<VariableModel>>] };
};
