//! The telemetry endpoint's queries: one WHERE clause built from the filter, used for the
//! page of items and for the summary over the whole filtered window.
//!
//! The summary comes from the rollup (pre-aggregated figures per hour and per day) and the
//! rows of the window's first partial hour; see `storage::rollup` for what it keeps and how
//! close its percentiles are.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DbErr, EntityTrait, FromQueryResult, Statement, Value,
};
use serde::Serialize;

use crate::generation::{JobStatus, MediaType};
use crate::storage::entities::generation_metrics;
use crate::storage::rollup::{self, Cell, CellKey, CellRow, Measure};
use crate::storage::{placeholder, timestamp_parameter};

/// Which rows of `generation_metrics` a request is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TelemetryFilter {
    /// Only rows committed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only this media type.
    pub media_type: Option<MediaType>,
    /// Only this model.
    pub model_name: Option<String>,
    /// Only this user's jobs.
    pub user_id: Option<String>,
    /// Only this persona's jobs.
    pub persona_id: Option<String>,
    /// Only this device.
    pub device: Option<String>,
    /// Only rows with this status.
    pub status: Option<JobStatus>,
}

/// A WHERE clause and its parameters, in the placeholder style of one backend.
struct WhereClause {
    backend: DatabaseBackend,
    conditions: Vec<String>,
    values: Vec<Value>,
}

impl WhereClause {
    fn new(backend: DatabaseBackend) -> Self {
        WhereClause {
            backend,
            conditions: Vec::new(),
            values: Vec::new(),
        }
    }

    fn from_filter(backend: DatabaseBackend, filter: &TelemetryFilter) -> Self {
        let mut clause = WhereClause::new(backend);
        if let Some(since) = filter.since {
            clause.push("created_at >=", timestamp_parameter(backend, since));
        }
        let equalities = [
            (
                "media_type =",
                filter.media_type.map(|m| m.as_str().to_owned()),
            ),
            ("model_name =", filter.model_name.clone()),
            ("user_id =", filter.user_id.clone()),
            ("persona_id =", filter.persona_id.clone()),
            ("device =", filter.device.clone()),
            ("status =", filter.status.map(|s| s.as_str().to_owned())),
        ];
        for (condition, value) in equalities {
            if let Some(value) = value {
                clause.push(condition, Value::from(value));
            }
        }
        clause
    }

    /// Adds `<lhs> <placeholder>`.
    fn push(&mut self, lhs: &str, value: Value) {
        let placeholder = self.parameter(value);
        self.conditions.push(format!("{lhs} {placeholder}"));
    }

    /// Binds the next parameter; answers its placeholder.
    fn parameter(&mut self, value: Value) -> String {
        self.values.push(value);
        placeholder(self.backend, self.values.len())
    }

    fn sql(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        }
    }

    fn statement(&self, sql: String) -> Statement {
        Statement::from_sql_and_values(self.backend, sql, self.values.clone())
    }
}

/// Where a page of items starts: after the last item of the previous page, in the items'
/// order (`created_at` descending, then `id` descending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cursor {
    /// Rows that come after the row with this id: older, or as old with a smaller id. No row
    /// comes after an id that no row has.
    Id(i64),
    /// Rows committed strictly before this time.
    Time(DateTime<Utc>),
}

/// The newest rows that match `filter`, newest first; `before` continues a page.
pub async fn list_items<C: ConnectionTrait>(
    db: &C,
    filter: &TelemetryFilter,
    before: Option<Cursor>,
    limit: u64,
) -> Result<Vec<generation_metrics::Model>, DbErr> {
    let backend = db.get_database_backend();
    let mut clause = WhereClause::from_filter(backend, filter);
    match before {
        Some(Cursor::Id(id)) => {
            // Compared with the cursor row's own stored value, never a copy of it read back:
            // on SQLite a row written by hand may hold its time in another text shape. The
            // bound `created_at <=` lets the planner scan the index from the cursor on; ids
            // alone would not do, since hosts sharing a database commit them out of order.
            // `?` placeholders are positional on SQLite: each use binds the id again.
            let mut cursor_time = || {
                let id = clause.parameter(Value::from(id));
                format!("(SELECT created_at FROM generation_metrics WHERE id = {id})")
            };
            let (at_most, older) = (cursor_time(), cursor_time());
            let id = clause.parameter(Value::from(id));
            clause.conditions.push(format!(
                "created_at <= {at_most} AND (created_at < {older} OR id < {id})"
            ));
        }
        Some(Cursor::Time(at)) => {
            clause.push(
                "created_at <",
                timestamp_parameter(backend, ceil_to_step(backend, at)),
            );
        }
        None => {}
    }
    let sql = format!(
        "SELECT * FROM generation_metrics {} ORDER BY created_at DESC, id DESC LIMIT {limit}",
        clause.sql()
    );
    generation_metrics::Entity::find()
        .from_raw_sql(clause.statement(sql))
        .all(db)
        .await
}

/// `at` rounded up to the finest step `created_at` has on the backend (a millisecond on
/// SQLite, a microsecond on PostgreSQL): a row is strictly older than `at` exactly when it is
/// strictly older than that, and the bound parameter drops what is finer. On SQLite it is
/// also held within year 9999: the column is text, and a five-digit year would sort first.
fn ceil_to_step(backend: DatabaseBackend, at: DateTime<Utc>) -> DateTime<Utc> {
    let step_nanos: u32 = match backend {
        DatabaseBackend::Postgres => 1_000,
        _ => 1_000_000,
    };
    let finer = at.timestamp_subsec_nanos() % step_nanos;
    let ceiled = if finer == 0 {
        at
    } else {
        at + chrono::TimeDelta::nanoseconds(i64::from(step_nanos - finer))
    };
    match backend {
        DatabaseBackend::Postgres => ceiled,
        _ => ceiled.min(LATEST_SQLITE_TIME),
    }
}

/// The latest time the SQLite column's text shape holds.
const LATEST_SQLITE_TIME: DateTime<Utc> = match DateTime::from_timestamp_millis(253_402_300_799_999)
{
    Some(at) => at,
    None => DateTime::<Utc>::MAX_UTC,
};

/// The commit time of the oldest row that matches `filter`, if any.
pub async fn oldest<C: ConnectionTrait>(
    db: &C,
    filter: &TelemetryFilter,
) -> Result<Option<DateTime<Utc>>, DbErr> {
    #[derive(FromQueryResult)]
    struct Oldest {
        created_at: DateTime<Utc>,
    }
    let clause = WhereClause::from_filter(db.get_database_backend(), filter);
    let sql = format!(
        "SELECT created_at FROM generation_metrics {} ORDER BY created_at LIMIT 1",
        clause.sql()
    );
    Ok(Oldest::find_by_statement(clause.statement(sql))
        .one(db)
        .await?
        .map(|row| row.created_at))
}

/// The latest start a window that starts at `since` can move to while its summary keeps the
/// same rows and the same split into rows and rollup cells: the first matching row's time
/// (`oldest`, when it has one), and never past the next whole hour.
pub fn same_summary_until(since: DateTime<Utc>, oldest: Option<DateTime<Utc>>) -> DateTime<Utc> {
    let next_hour = DateTime::from_timestamp(ceil_to(since, rollup::HOUR), 0).unwrap_or(since);
    oldest.map_or(next_hour, |oldest| oldest.min(next_hour))
}

/// Aggregates of a set of rows. Means of duration, throughput and memory count succeeded
/// generations only; they are `None` when no row qualifies.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Rows in the set.
    pub total: i64,
    /// Rows with status succeeded.
    pub succeeded: i64,
    /// Rows with status failed.
    pub failed: i64,
    /// Rows with status cancelled.
    pub cancelled: i64,
    /// Mean inference time of succeeded generations.
    pub avg_duration_seconds: Option<f64>,
    /// Shortest inference time of a succeeded generation.
    pub min_duration_seconds: Option<f64>,
    /// Longest inference time of a succeeded generation.
    pub max_duration_seconds: Option<f64>,
    /// Mean throughput of succeeded generations.
    pub avg_throughput: Option<f64>,
    /// Mean peak VRAM of succeeded generations, in MiB.
    pub avg_vram_peak_mb: Option<f64>,
    /// Mean VRAM in use at the end of succeeded generations, in MiB.
    pub avg_vram_allocated_mb: Option<f64>,
    /// Mean VRAM reserved at the end of succeeded generations, in MiB.
    pub avg_vram_reserved_mb: Option<f64>,
    /// Mean queue wait of every row in the set.
    pub avg_queue_wait_seconds: Option<f64>,
}

/// Nearest-rank percentiles of the inference time of succeeded generations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Exact, or estimated within `rollup::PERCENTILE_RELATIVE_ERROR`.
    pub exact: bool,
}

/// Figures for one group of a breakdown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupFigures {
    /// The model's or device's name.
    pub key: String,
    /// Aggregates of the group.
    pub figures: Figures,
    /// Percentiles of the group.
    pub percentiles: Percentiles,
}

/// The summary of the whole filtered window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetrySummary {
    /// Aggregates of every matching row.
    pub figures: Figures,
    /// Percentiles of every matching row.
    pub percentiles: Percentiles,
    /// The same, by model.
    pub by_model: Vec<GroupFigures>,
    /// The same, by device.
    pub by_device: Vec<GroupFigures>,
}

/// Rows or cells of one group, counted by status.
#[derive(Debug, Clone)]
struct Group {
    total: i64,
    failed: i64,
    cancelled: i64,
    queue_wait_sum: f64,
    succeeded: Cell,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            total: 0,
            failed: 0,
            cancelled: 0,
            queue_wait_sum: 0.0,
            // A summary keeps every inference time it reads from rows: percentiles stay exact
            // unless a cell that kept only its histogram is merged in.
            succeeded: Cell::new(usize::MAX),
        }
    }
}

impl Group {
    fn add(&mut self, status: &str, cell: &Cell) {
        self.total += cell.rows();
        self.queue_wait_sum += cell.queue_wait_sum;
        match status {
            "succeeded" => self.succeeded.merge(cell),
            "failed" => self.failed += cell.rows(),
            "cancelled" => self.cancelled += cell.rows(),
            _ => {}
        }
    }

    fn add_row(&mut self, row: &Measure) {
        self.total += 1;
        self.queue_wait_sum += row.queue_wait_seconds;
        match row.status.as_str() {
            "succeeded" => self.succeeded.add(row),
            "failed" => self.failed += 1,
            "cancelled" => self.cancelled += 1,
            _ => {}
        }
    }

    fn figures(&self) -> (Figures, Percentiles) {
        let done = &self.succeeded;
        let [p50, p95, p99] = done.durations.percentiles([50, 95, 99]);
        (
            Figures {
                total: self.total,
                succeeded: done.rows(),
                failed: self.failed,
                cancelled: self.cancelled,
                avg_duration_seconds: done.durations.mean(),
                min_duration_seconds: done.durations.min(),
                max_duration_seconds: done.durations.max(),
                avg_throughput: done.throughput.value(),
                avg_vram_peak_mb: done.vram_peak.value(),
                avg_vram_allocated_mb: done.vram_allocated.value(),
                avg_vram_reserved_mb: done.vram_reserved.value(),
                avg_queue_wait_seconds: (self.total > 0)
                    .then(|| self.queue_wait_sum / self.total as f64),
            },
            Percentiles {
                p50,
                p95,
                p99,
                exact: done.durations.exact(),
            },
        )
    }
}

/// The whole set, and the same by model and by device.
#[derive(Debug, Default)]
struct Breakdown {
    all: Group,
    by_model: BTreeMap<String, Group>,
    by_device: BTreeMap<String, Group>,
}

impl Breakdown {
    fn groups(&mut self, model: &str, device: &str) -> [&mut Group; 3] {
        let by_model = self.by_model.entry(model.to_owned()).or_default();
        let by_device = self.by_device.entry(device.to_owned()).or_default();
        [&mut self.all, by_model, by_device]
    }

    fn add_row(&mut self, row: &Measure) {
        for group in self.groups(&row.model_name, &row.device) {
            group.add_row(row);
        }
    }

    fn add_cell(&mut self, key: &CellKey, cell: &Cell) {
        for group in self.groups(&key.model_name, &key.device) {
            group.add(&key.status, cell);
        }
    }

    fn summary(self) -> TelemetrySummary {
        let (figures, percentiles) = self.all.figures();
        let list = |groups: BTreeMap<String, Group>| -> Vec<GroupFigures> {
            groups
                .into_iter()
                .map(|(key, group)| {
                    let (figures, percentiles) = group.figures();
                    GroupFigures {
                        key,
                        figures,
                        percentiles,
                    }
                })
                .collect()
        };
        TelemetrySummary {
            figures,
            percentiles,
            by_model: list(self.by_model),
            by_device: list(self.by_device),
        }
    }
}

/// Summarises every row that matches `filter`.
///
/// Windows are read from the rollup where its cells can answer: whole days, then whole hours,
/// then the rows of the window's first partial hour. A filter on user or persona (not kept in
/// the rollup), or a rollup that does not account for every change to the table, reads the
/// rows instead.
pub async fn summarize<C: ConnectionTrait>(
    db: &C,
    filter: &TelemetryFilter,
) -> Result<TelemetrySummary, DbErr> {
    let backend = db.get_database_backend();
    let mut breakdown = Breakdown::default();
    let by_rows = filter.user_id.is_some() || filter.persona_id.is_some();
    if by_rows || !rollup::is_current(db).await? {
        let clause = WhereClause::from_filter(backend, filter);
        add_rows(db, &mut breakdown, clause).await?;
        return Ok(breakdown.summary());
    }

    // Cells hold [bucket_start, bucket_start + span). The window [since, now] splits into the
    // rows of [since, first hour), the hour cells of [first hour, first day), and the day cells
    // from the first day on (the last ones still filling).
    let (first_hour, first_day) = match filter.since {
        Some(since) => {
            let first_hour = ceil_to(since, rollup::HOUR);
            let mut clause = WhereClause::from_filter(backend, filter);
            let edge = DateTime::from_timestamp(first_hour, 0).unwrap_or(since);
            clause.push("created_at <", timestamp_parameter(backend, edge));
            add_rows(db, &mut breakdown, clause).await?;
            (first_hour, ceil_to(since, rollup::DAY))
        }
        None => (i64::MIN, i64::MIN),
    };
    let mut clause = WhereClause::from_filter(
        backend,
        &TelemetryFilter {
            since: None,
            ..filter.clone()
        },
    );
    let condition = format!(
        "((span_seconds = {} AND bucket_start >= {} AND bucket_start < {}) \
          OR (span_seconds = {} AND bucket_start >= {}))",
        clause.parameter(Value::from(rollup::HOUR as i32)),
        clause.parameter(Value::from(first_hour)),
        clause.parameter(Value::from(first_day)),
        clause.parameter(Value::from(rollup::DAY as i32)),
        clause.parameter(Value::from(first_day)),
    );
    clause.conditions.push(condition);
    let sql = format!("SELECT * FROM generation_metrics_rollup {}", clause.sql());
    for row in CellRow::find_by_statement(clause.statement(sql))
        .all(db)
        .await?
    {
        let (key, cell) = row.into_cell();
        breakdown.add_cell(&key, &cell);
    }
    Ok(breakdown.summary())
}

/// Adds every row that matches `clause`.
async fn add_rows<C: ConnectionTrait>(
    db: &C,
    breakdown: &mut Breakdown,
    clause: WhereClause,
) -> Result<(), DbErr> {
    let sql = format!(
        "SELECT {} FROM generation_metrics {}",
        rollup::MEASURE_COLUMNS,
        clause.sql()
    );
    for row in Measure::find_by_statement(clause.statement(sql))
        .all(db)
        .await?
    {
        breakdown.add_row(&row);
    }
    Ok(())
}

/// The first multiple of `span` seconds since the epoch at or after `at`.
fn ceil_to(at: DateTime<Utc>, span: i64) -> i64 {
    let seconds = at.timestamp();
    let floor = seconds.div_euclid(span) * span;
    if floor == seconds && at.timestamp_subsec_nanos() == 0 {
        floor
    } else {
        floor + span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn a_time_cursor_rounds_up_to_the_column_step() {
        let exact = at("2026-12-04T16:00:00.001Z");
        assert_eq!(ceil_to_step(DatabaseBackend::Sqlite, exact), exact);
        assert_eq!(
            ceil_to_step(DatabaseBackend::Sqlite, at("2026-12-04T16:00:00.0000001Z")),
            exact
        );
        assert_eq!(
            ceil_to_step(
                DatabaseBackend::Postgres,
                at("2026-12-04T16:00:00.0000001Z")
            ),
            at("2026-12-04T16:00:00.000001Z")
        );
        assert_eq!(
            ceil_to_step(DatabaseBackend::Postgres, at("2026-12-04T16:00:59.999999Z")),
            at("2026-12-04T16:00:59.999999Z")
        );
        let late = at("9999-12-31T23:59:59.9999-01:00");
        assert_eq!(
            ceil_to_step(DatabaseBackend::Sqlite, late),
            at("9999-12-31T23:59:59.999Z")
        );
        assert_eq!(ceil_to_step(DatabaseBackend::Postgres, late), late);
    }

    #[test]
    fn a_summary_holds_until_the_first_row_or_the_next_whole_hour() {
        let since = at("2026-12-04T10:20:30.5Z");
        assert_eq!(same_summary_until(since, None), at("2026-12-04T11:00:00Z"));
        assert_eq!(
            same_summary_until(since, Some(at("2026-12-04T10:40:00Z"))),
            at("2026-12-04T10:40:00Z")
        );
        assert_eq!(
            same_summary_until(since, Some(at("2026-12-04T11:30:00Z"))),
            at("2026-12-04T11:00:00Z")
        );
        let on_the_hour = at("2026-12-04T10:00:00Z");
        assert_eq!(same_summary_until(on_the_hour, None), on_the_hour);
    }
}
