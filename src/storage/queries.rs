//! The telemetry endpoint's queries: one WHERE clause built from the filter, used for the
//! page of items and for the summary over the whole filtered window.
//!
//! Percentiles are exact (nearest rank) and computed by the database with window functions,
//! so nothing but the answer leaves it.

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DbErr, EntityTrait, FromQueryResult, Statement, Value,
};
use serde::Serialize;

use crate::generation::{JobStatus, MediaType};
use crate::storage::entities::generation_metrics;
use crate::storage::timestamp_parameter;

/// Which rows of `generation_metrics` a request is about.
#[derive(Debug, Clone, Default)]
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
        self.values.push(value);
        let placeholder = match self.backend {
            DatabaseBackend::Postgres => format!("${}", self.values.len()),
            _ => "?".to_owned(),
        };
        self.conditions.push(format!("{lhs} {placeholder}"));
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

/// The newest rows that match `filter`, newest first; `before_id` continues a page.
pub async fn list_items<C: ConnectionTrait>(
    db: &C,
    filter: &TelemetryFilter,
    before_id: Option<i64>,
    limit: u64,
) -> Result<Vec<generation_metrics::Model>, DbErr> {
    let backend = db.get_database_backend();
    let mut clause = WhereClause::from_filter(backend, filter);
    if let Some(before_id) = before_id {
        clause.push("id <", Value::from(before_id));
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

/// Aggregates of a set of rows. Means of duration, throughput and memory count succeeded
/// generations only; they are `None` when no row qualifies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, FromQueryResult)]
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

/// Exact nearest-rank percentiles of the inference time of succeeded generations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
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

const SUCCEEDED: &str = "status = 'succeeded'";

fn aggregates() -> String {
    format!(
        "COUNT(*) AS total, \
         COALESCE(SUM(CASE WHEN status = 'succeeded' THEN 1 ELSE 0 END), 0) AS succeeded, \
         COALESCE(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), 0) AS failed, \
         COALESCE(SUM(CASE WHEN status = 'cancelled' THEN 1 ELSE 0 END), 0) AS cancelled, \
         AVG(CASE WHEN {SUCCEEDED} THEN duration_seconds END) AS avg_duration_seconds, \
         MIN(CASE WHEN {SUCCEEDED} THEN duration_seconds END) AS min_duration_seconds, \
         MAX(CASE WHEN {SUCCEEDED} THEN duration_seconds END) AS max_duration_seconds, \
         AVG(CASE WHEN {SUCCEEDED} THEN throughput END) AS avg_throughput, \
         AVG(CASE WHEN {SUCCEEDED} THEN vram_peak_mb END) AS avg_vram_peak_mb, \
         AVG(CASE WHEN {SUCCEEDED} THEN vram_allocated_mb END) AS avg_vram_allocated_mb, \
         AVG(CASE WHEN {SUCCEEDED} THEN vram_reserved_mb END) AS avg_vram_reserved_mb, \
         AVG(queue_wait_seconds) AS avg_queue_wait_seconds"
    )
}

#[derive(Debug, FromQueryResult)]
struct GroupRow {
    key: String,
    #[sea_orm(nested)]
    figures: Figures,
}

#[derive(Debug, FromQueryResult)]
struct RankRow {
    key: String,
    rank: i64,
    n: i64,
    duration_seconds: f64,
}

/// Summarises every row that matches `filter`.
// FIXME: every request recomputes the summary from the rows (seven statements, three of them
// sorting the window for exact percentiles). Over a 60-minute window that is milliseconds; with
// no window on a million rows it takes seconds (see benches/telemetry-endpoint). Pre-aggregated
// figures maintained by the writer (per minute, model, device and status, with a duration
// histogram) would bound it.
pub async fn summarize<C: ConnectionTrait>(
    db: &C,
    filter: &TelemetryFilter,
) -> Result<TelemetrySummary, DbErr> {
    let backend = db.get_database_backend();
    let clause = WhereClause::from_filter(backend, filter);
    let where_sql = clause.sql();

    let figures = Figures::find_by_statement(clause.statement(format!(
        "SELECT {} FROM generation_metrics {where_sql}",
        aggregates()
    )))
    .one(db)
    .await?
    .unwrap_or_default();

    let mut by_model = Vec::new();
    let mut by_device = Vec::new();
    for (column, groups) in [("model_name", &mut by_model), ("device", &mut by_device)] {
        let rows = GroupRow::find_by_statement(clause.statement(format!(
            "SELECT {column} AS key, {} FROM generation_metrics {where_sql} \
             GROUP BY {column} ORDER BY {column}",
            aggregates()
        )))
        .all(db)
        .await?;
        let ranks = percentiles_by(db, &clause, column).await?;
        *groups = rows
            .into_iter()
            .map(|row| GroupFigures {
                percentiles: ranks
                    .iter()
                    .find(|(key, _)| key == &row.key)
                    .map(|(_, p)| *p)
                    .unwrap_or_default(),
                key: row.key,
                figures: row.figures,
            })
            .collect();
    }
    let percentiles = percentiles_by(db, &clause, "'all'")
        .await?
        .into_iter()
        .next()
        .map(|(_, p)| p)
        .unwrap_or_default();

    Ok(TelemetrySummary {
        figures,
        percentiles,
        by_model,
        by_device,
    })
}

/// Nearest-rank p50, p95 and p99 of succeeded inference times, per value of `group`.
async fn percentiles_by<C: ConnectionTrait>(
    db: &C,
    clause: &WhereClause,
    group: &str,
) -> Result<Vec<(String, Percentiles)>, DbErr> {
    let where_sql = if clause.conditions.is_empty() {
        format!("WHERE {SUCCEEDED}")
    } else {
        format!("{} AND {SUCCEEDED}", clause.sql())
    };
    // Ranks wanted: ceil(p * n) for p = 0.5, 0.95, 0.99, in integer arithmetic.
    let sql = format!(
        "SELECT key, rank, n, duration_seconds FROM ( \
           SELECT {group} AS key, duration_seconds, \
             ROW_NUMBER() OVER (PARTITION BY {group} ORDER BY duration_seconds) AS rank, \
             COUNT(*) OVER (PARTITION BY {group}) AS n \
           FROM generation_metrics {} ) ranked \
         WHERE rank = (n + 1) / 2 OR rank = (95 * n + 99) / 100 OR rank = (99 * n + 99) / 100",
        where_sql
    );
    let rows = RankRow::find_by_statement(clause.statement(sql))
        .all(db)
        .await?;

    let mut out: Vec<(String, Percentiles)> = Vec::new();
    for row in rows {
        let index = match out.iter().position(|(key, _)| key == &row.key) {
            Some(index) => index,
            None => {
                out.push((row.key.clone(), Percentiles::default()));
                out.len() - 1
            }
        };
        let p = &mut out[index].1;
        if row.rank == (row.n + 1) / 2 {
            p.p50 = Some(row.duration_seconds);
        }
        if row.rank == (95 * row.n + 99) / 100 {
            p.p95 = Some(row.duration_seconds);
        }
        if row.rank == (99 * row.n + 99) / 100 {
            p.p99 = Some(row.duration_seconds);
        }
    }
    Ok(out)
}
