//! Pre-aggregated figures of `generation_metrics`: per hour and per day (UTC), and per media
//! type, model, device and status, the count, sums, extremes and a histogram of inference
//! times of the rows committed in that period (a *cell*).
//!
//! The telemetry writer adds each batch's rows to their cells in the transaction that commits
//! them; the retention purge drops the cells it empties and recounts the day it cuts through.
//! Anything else that changes `generation_metrics` (a `DELETE` by hand, a bulk load) is counted
//! by triggers, which marks the rollup as behind until [`rebuild`] recounts it from the rows;
//! meanwhile summaries are computed from the rows (see `queries::summarize`).
//!
//! Percentiles from cells come from the histogram: its buckets grow by 2 % and each stands for
//! the value whose relative distance to both of its bounds is the same, so an estimate is within
//! [`PERCENTILE_RELATIVE_ERROR`] (under 1 %) of the true nearest-rank value, for any inference
//! time from a microsecond to days, and clamped to the exact minimum and maximum. A cell of at
//! most [`EXACT_VALUES`] rows also keeps its values, so sparse periods stay exact.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, FromQueryResult, Statement,
    TransactionTrait, Value,
};

use crate::storage::entities::generation_metrics;
use crate::storage::{placeholder, timestamp_parameter};

/// Seconds in an hour cell.
pub const HOUR: i64 = 3_600;
/// Seconds in a day cell.
pub const DAY: i64 = 86_400;
/// The periods the rollup keeps, shortest first.
pub const SPANS: [i64; 2] = [HOUR, DAY];

/// Ratio between the bounds of a histogram bucket.
const GAMMA: f64 = 1.02;
/// Largest relative error of a percentile estimated from a histogram: (γ − 1) / (γ + 1).
pub const PERCENTILE_RELATIVE_ERROR: f64 = (GAMMA - 1.0) / (GAMMA + 1.0);
/// Inference times at or below this (seconds) go to the bucket of zero.
const SMALLEST: f64 = 1e-6;
/// The bucket of zero.
const ZERO_BUCKET: i32 = i32::MIN;
/// A cell with at most this many rows keeps their inference times.
pub const EXACT_VALUES: usize = 32;

const CELL_COLUMNS: [&str; 21] = [
    "span_seconds",
    "bucket_start",
    "media_type",
    "model_name",
    "device",
    "status",
    "row_count",
    "duration_sum",
    "duration_min",
    "duration_max",
    "duration_histogram",
    "duration_values",
    "throughput_sum",
    "throughput_count",
    "vram_peak_sum",
    "vram_peak_count",
    "vram_allocated_sum",
    "vram_allocated_count",
    "vram_reserved_sum",
    "vram_reserved_count",
    "queue_wait_sum",
];
/// The first columns, which identify a cell.
const KEY_COLUMNS: usize = 6;

/// The figures of one row that the rollup and the summary use.
#[derive(Debug, Clone, FromQueryResult)]
pub struct Measure {
    /// When the row was committed.
    pub created_at: DateTime<Utc>,
    /// `image` or `video`.
    pub media_type: String,
    /// The model.
    pub model_name: String,
    /// The device.
    pub device: String,
    /// How the job ended.
    pub status: String,
    /// Inference seconds.
    pub duration_seconds: f64,
    /// Outputs per second.
    pub throughput: Option<f64>,
    /// Peak MiB.
    pub vram_peak_mb: Option<f64>,
    /// MiB in use at the end.
    pub vram_allocated_mb: Option<f64>,
    /// MiB reserved at the end.
    pub vram_reserved_mb: Option<f64>,
    /// Seconds in the queue.
    pub queue_wait_seconds: f64,
}

/// The columns [`Measure`] reads, for a SELECT on `generation_metrics`.
pub const MEASURE_COLUMNS: &str = "created_at, media_type, model_name, device, status, \
    duration_seconds, throughput, vram_peak_mb, vram_allocated_mb, vram_reserved_mb, \
    queue_wait_seconds";

impl From<&generation_metrics::Model> for Measure {
    fn from(row: &generation_metrics::Model) -> Self {
        Measure {
            created_at: row.created_at,
            media_type: row.media_type.clone(),
            model_name: row.model_name.clone(),
            device: row.device.clone(),
            status: row.status.clone(),
            duration_seconds: row.duration_seconds,
            throughput: row.throughput,
            vram_peak_mb: row.vram_peak_mb,
            vram_allocated_mb: row.vram_allocated_mb,
            vram_reserved_mb: row.vram_reserved_mb,
            queue_wait_seconds: row.queue_wait_seconds,
        }
    }
}

/// A sum and the number of values in it; the mean is `None` without values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mean {
    sum: f64,
    count: i64,
}

impl Mean {
    fn add(&mut self, value: Option<f64>) {
        if let Some(value) = value {
            self.sum += value;
            self.count += 1;
        }
    }

    fn merge(&mut self, other: &Mean) {
        self.sum += other.sum;
        self.count += other.count;
    }

    /// The mean, or `None` without values.
    pub fn value(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Inference times: count, sum, extremes, histogram, and the values themselves while there are
/// at most `keep` of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Durations {
    count: i64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
    histogram: BTreeMap<i32, u64>,
    values: Option<Vec<f64>>,
    keep: usize,
}

impl Durations {
    /// No values yet; keeps them while there are at most `keep`.
    pub fn new(keep: usize) -> Self {
        Durations {
            count: 0,
            sum: 0.0,
            min: None,
            max: None,
            histogram: BTreeMap::new(),
            values: Some(Vec::new()),
            keep,
        }
    }

    fn add(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        self.min = Some(self.min.map_or(value, |min| min.min(value)));
        self.max = Some(self.max.map_or(value, |max| max.max(value)));
        *self.histogram.entry(bucket_of(value)).or_default() += 1;
        if let Some(values) = &mut self.values {
            values.push(value);
        }
        self.trim();
    }

    fn merge(&mut self, other: &Durations) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for (bucket, count) in &other.histogram {
            *self.histogram.entry(*bucket).or_default() += count;
        }
        match (&mut self.values, &other.values) {
            (Some(values), Some(more)) => values.extend_from_slice(more),
            _ => self.values = None,
        }
        self.trim();
    }

    fn trim(&mut self) {
        if self
            .values
            .as_ref()
            .is_some_and(|values| values.len() > self.keep)
        {
            self.values = None;
        }
    }

    /// How many values.
    pub fn count(&self) -> i64 {
        self.count
    }

    /// The mean, or `None` without values.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The smallest value.
    pub fn min(&self) -> Option<f64> {
        self.min
    }

    /// The largest value.
    pub fn max(&self) -> Option<f64> {
        self.max
    }

    /// Whether [`Durations::percentiles`] are exact rather than estimated from the histogram.
    pub fn exact(&self) -> bool {
        self.values.is_some()
    }

    /// Nearest-rank percentiles for each of `percents` (1 to 100): exact while the values are
    /// kept, otherwise within [`PERCENTILE_RELATIVE_ERROR`].
    pub fn percentiles<const N: usize>(&self, percents: [i64; N]) -> [Option<f64>; N] {
        let n = self.count;
        if n == 0 {
            return [None; N];
        }
        // Nearest rank: the ceil(p × n / 100)-th smallest value, counting from 1.
        let ranks = percents.map(|p| ((p * n + 99) / 100).max(1));
        if let Some(values) = &self.values {
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            return ranks.map(|rank| sorted.get(rank as usize - 1).copied());
        }
        ranks.map(|rank| {
            let mut seen = 0;
            let bucket = self.histogram.iter().find_map(|(bucket, count)| {
                seen += *count as i64;
                (seen >= rank).then_some(*bucket)
            })?;
            let estimate = representative(bucket);
            Some(estimate.clamp(self.min?, self.max?))
        })
    }
}

/// The histogram bucket of an inference time: bucket `i` holds (γ^(i−1), γ^i].
fn bucket_of(value: f64) -> i32 {
    if value > SMALLEST {
        (value.ln() / GAMMA.ln()).ceil() as i32
    } else {
        ZERO_BUCKET
    }
}

/// The value a bucket stands for, as close in relative terms to both of its bounds.
fn representative(bucket: i32) -> f64 {
    if bucket == ZERO_BUCKET {
        0.0
    } else {
        2.0 * GAMMA.powi(bucket) / (GAMMA + 1.0)
    }
}

/// The figures of a set of rows of one status.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Inference times (and the row count).
    pub durations: Durations,
    /// Throughput.
    pub throughput: Mean,
    /// Peak VRAM.
    pub vram_peak: Mean,
    /// VRAM in use at the end.
    pub vram_allocated: Mean,
    /// VRAM reserved at the end.
    pub vram_reserved: Mean,
    /// Sum of queue waits, over every row.
    pub queue_wait_sum: f64,
}

impl Cell {
    /// No rows; keeps up to `keep` inference times exactly.
    pub fn new(keep: usize) -> Self {
        Cell {
            durations: Durations::new(keep),
            throughput: Mean::default(),
            vram_peak: Mean::default(),
            vram_allocated: Mean::default(),
            vram_reserved: Mean::default(),
            queue_wait_sum: 0.0,
        }
    }

    /// Counts one row.
    pub fn add(&mut self, row: &Measure) {
        self.durations.add(row.duration_seconds);
        self.throughput.add(row.throughput);
        self.vram_peak.add(row.vram_peak_mb);
        self.vram_allocated.add(row.vram_allocated_mb);
        self.vram_reserved.add(row.vram_reserved_mb);
        self.queue_wait_sum += row.queue_wait_seconds;
    }

    /// Counts the rows of another cell.
    pub fn merge(&mut self, other: &Cell) {
        self.durations.merge(&other.durations);
        self.throughput.merge(&other.throughput);
        self.vram_peak.merge(&other.vram_peak);
        self.vram_allocated.merge(&other.vram_allocated);
        self.vram_reserved.merge(&other.vram_reserved);
        self.queue_wait_sum += other.queue_wait_sum;
    }

    /// Rows counted.
    pub fn rows(&self) -> i64 {
        self.durations.count
    }
}

/// Which cell a row belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    /// Seconds in the period: [`HOUR`] or [`DAY`].
    pub span: i64,
    /// Start of the period, seconds since the Unix epoch (UTC).
    pub bucket_start: i64,
    /// `image` or `video`.
    pub media_type: String,
    /// The model.
    pub model_name: String,
    /// The device.
    pub device: String,
    /// How the jobs ended.
    pub status: String,
}

impl CellKey {
    fn of(row: &Measure, span: i64) -> Self {
        CellKey {
            span,
            bucket_start: row.created_at.timestamp().div_euclid(span) * span,
            media_type: row.media_type.clone(),
            model_name: row.model_name.clone(),
            device: row.device.clone(),
            status: row.status.clone(),
        }
    }
}

/// The cells of a set of rows, for every span.
pub fn cells_of<'a>(rows: impl IntoIterator<Item = &'a Measure>) -> HashMap<CellKey, Cell> {
    let mut cells: HashMap<CellKey, Cell> = HashMap::new();
    for row in rows {
        for span in SPANS {
            cells
                .entry(CellKey::of(row, span))
                .or_insert_with(|| Cell::new(EXACT_VALUES))
                .add(row);
        }
    }
    cells
}

/// A cell as stored.
#[derive(Debug, FromQueryResult)]
pub struct CellRow {
    span_seconds: i32,
    bucket_start: i64,
    media_type: String,
    model_name: String,
    device: String,
    status: String,
    row_count: i64,
    duration_sum: f64,
    duration_min: Option<f64>,
    duration_max: Option<f64>,
    duration_histogram: Vec<u8>,
    duration_values: Option<Vec<u8>>,
    throughput_sum: f64,
    throughput_count: i64,
    vram_peak_sum: f64,
    vram_peak_count: i64,
    vram_allocated_sum: f64,
    vram_allocated_count: i64,
    vram_reserved_sum: f64,
    vram_reserved_count: i64,
    queue_wait_sum: f64,
}

impl CellRow {
    /// The key and the figures.
    pub fn into_cell(self) -> (CellKey, Cell) {
        let histogram = self
            .duration_histogram
            .chunks_exact(12)
            .map(|entry| {
                let (bucket, count) = entry.split_at(4);
                (
                    i32::from_le_bytes(bucket.try_into().unwrap_or_default()),
                    u64::from_le_bytes(count.try_into().unwrap_or_default()),
                )
            })
            .collect();
        let values = self.duration_values.map(|bytes| {
            bytes
                .chunks_exact(8)
                .map(|value| f64::from_le_bytes(value.try_into().unwrap_or_default()))
                .collect()
        });
        let mean = |sum, count| Mean { sum, count };
        (
            CellKey {
                span: i64::from(self.span_seconds),
                bucket_start: self.bucket_start,
                media_type: self.media_type,
                model_name: self.model_name,
                device: self.device,
                status: self.status,
            },
            Cell {
                durations: Durations {
                    count: self.row_count,
                    sum: self.duration_sum,
                    min: self.duration_min,
                    max: self.duration_max,
                    histogram,
                    values,
                    keep: EXACT_VALUES,
                },
                throughput: mean(self.throughput_sum, self.throughput_count),
                vram_peak: mean(self.vram_peak_sum, self.vram_peak_count),
                vram_allocated: mean(self.vram_allocated_sum, self.vram_allocated_count),
                vram_reserved: mean(self.vram_reserved_sum, self.vram_reserved_count),
                queue_wait_sum: self.queue_wait_sum,
            },
        )
    }
}

/// The values of [`CELL_COLUMNS`] for a cell, in order.
fn cell_values(key: &CellKey, cell: &Cell) -> Vec<Value> {
    let durations = &cell.durations;
    let histogram: Vec<u8> = durations
        .histogram
        .iter()
        .flat_map(|(bucket, count)| bucket.to_le_bytes().into_iter().chain(count.to_le_bytes()))
        .collect();
    let values: Option<Vec<u8>> = durations.values.as_ref().map(|values| {
        values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect()
    });
    vec![
        Value::from(key.span as i32),
        Value::from(key.bucket_start),
        Value::from(key.media_type.as_str()),
        Value::from(key.model_name.as_str()),
        Value::from(key.device.as_str()),
        Value::from(key.status.as_str()),
        Value::from(durations.count),
        Value::from(durations.sum),
        Value::from(durations.min),
        Value::from(durations.max),
        Value::from(histogram),
        Value::from(values),
        Value::from(cell.throughput.sum),
        Value::from(cell.throughput.count),
        Value::from(cell.vram_peak.sum),
        Value::from(cell.vram_peak.count),
        Value::from(cell.vram_allocated.sum),
        Value::from(cell.vram_allocated.count),
        Value::from(cell.vram_reserved.sum),
        Value::from(cell.vram_reserved.count),
        Value::from(cell.queue_wait_sum),
    ]
}

/// Adds `rows`, just inserted in the transaction `db`, to their cells, and records that the
/// rollup accounts for them.
pub async fn add_rows<C: ConnectionTrait>(
    db: &C,
    rows: &[generation_metrics::Model],
) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    let measures: Vec<Measure> = rows.iter().map(Measure::from).collect();
    let mut cells: Vec<_> = cells_of(&measures).into_iter().collect();
    // The same order in every transaction, so that two hosts never wait on each other's cells.
    cells.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, cell) in cells {
        add_cell(db, key, cell).await?;
    }
    account(db, rows.len() as i64).await
}

/// Merges `cell` into its stored cell, creating it when there is none.
async fn add_cell<C: ConnectionTrait>(db: &C, key: CellKey, mut cell: Cell) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    for _ in 0..2 {
        if let Some(stored) = read_cell_for_update(db, &key).await? {
            cell.merge(&stored);
            // The figures first, then the key: SQLite binds `?` in the order they appear.
            let set: Vec<String> = CELL_COLUMNS[KEY_COLUMNS..]
                .iter()
                .enumerate()
                .map(|(i, column)| format!("{column} = {}", placeholder(backend, i + 1)))
                .collect();
            let sql = format!(
                "UPDATE generation_metrics_rollup SET {} WHERE {}",
                set.join(", "),
                key_condition(backend, CELL_COLUMNS.len() - KEY_COLUMNS)
            );
            let mut values = cell_values(&key, &cell);
            values.rotate_left(KEY_COLUMNS);
            db.execute_raw(Statement::from_sql_and_values(backend, sql, values))
                .await?;
            return Ok(());
        }
        let placeholders: Vec<String> = (1..=CELL_COLUMNS.len())
            .map(|i| placeholder(backend, i))
            .collect();
        let sql = format!(
            "INSERT INTO generation_metrics_rollup ({}) VALUES ({}) ON CONFLICT DO NOTHING",
            CELL_COLUMNS.join(", "),
            placeholders.join(", ")
        );
        let inserted = db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                cell_values(&key, &cell),
            ))
            .await?;
        if inserted.rows_affected() == 1 {
            return Ok(());
        }
        // Another host created the cell since it was read: merge into theirs.
    }
    Err(DbErr::Custom(format!(
        "rollup cell {key:?} could neither be read nor created"
    )))
}

/// `span_seconds = $n+1 AND … AND status = $n+6`, for the parameters after the first `n`.
fn key_condition(backend: DatabaseBackend, n: usize) -> String {
    CELL_COLUMNS[..KEY_COLUMNS]
        .iter()
        .enumerate()
        .map(|(i, column)| format!("{column} = {}", placeholder(backend, n + i + 1)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

async fn read_cell_for_update<C: ConnectionTrait>(
    db: &C,
    key: &CellKey,
) -> Result<Option<Cell>, DbErr> {
    let backend = db.get_database_backend();
    let lock = match backend {
        DatabaseBackend::Postgres => " FOR UPDATE",
        _ => "",
    };
    let sql = format!(
        "SELECT * FROM generation_metrics_rollup WHERE {}{lock}",
        key_condition(backend, 0)
    );
    let mut values = cell_values(key, &Cell::new(0));
    values.truncate(KEY_COLUMNS);
    Ok(
        CellRow::find_by_statement(Statement::from_sql_and_values(backend, sql, values))
            .one(db)
            .await?
            .map(|row| row.into_cell().1),
    )
}

/// Records that the rollup accounts for `changes` more changes to `generation_metrics`.
pub async fn account<C: ConnectionTrait>(db: &C, changes: i64) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "UPDATE generation_metrics_rollup_state SET rolled_changes = rolled_changes + {} \
             WHERE id = 1",
            placeholder(backend, 1)
        ),
        [Value::from(changes)],
    ))
    .await?;
    Ok(())
}

/// Whether the rollup accounts for every change to `generation_metrics`.
pub async fn is_current<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    Ok(changes(db)
        .await?
        .is_some_and(|changes| changes.rows == changes.rolled))
}

/// The changes to `generation_metrics` that its triggers counted, whoever made them, and
/// those the rollup accounts for. While both stay the same, so do the table and the rollup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// `row_changes`.
    pub rows: i64,
    /// `rolled_changes`.
    pub rolled: i64,
}

/// The counters of `generation_metrics_rollup_state`, when its row exists.
pub async fn changes<C: ConnectionTrait>(db: &C) -> Result<Option<Changes>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT row_changes, rolled_changes FROM generation_metrics_rollup_state WHERE id = 1",
        ))
        .await?;
    row.map(|row| {
        Ok(Changes {
            rows: row.try_get::<i64>("", "row_changes")?,
            rolled: row.try_get::<i64>("", "rolled_changes")?,
        })
    })
    .transpose()
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Rows read.
    pub rows: u64,
    /// Cells written.
    pub cells: u64,
}

/// Rebuilds the rollup when it does not account for every change to the table, logging what
/// it did; an error is logged and the rollup stays behind (summaries then read the rows).
pub async fn catch_up(db: &DatabaseConnection) {
    match is_current(db).await {
        Ok(true) => return,
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(error = %error, "reading the rollup's state failed");
            return;
        }
    }
    let started = std::time::Instant::now();
    match rebuild(db).await {
        Ok(done) => tracing::info!(
            rows = done.rows,
            cells = done.cells,
            seconds = started.elapsed().as_secs_f64(),
            "rollup rebuilt from the rows"
        ),
        Err(error) => tracing::warn!(error = %error, "rebuilding the rollup failed"),
    }
}

/// Rows read per statement while rebuilding.
const REBUILD_PAGE: u64 = 20_000;

/// Recounts every cell from the rows, holding off writers meanwhile (on SQLite the write lock,
/// on PostgreSQL a SHARE lock on `generation_metrics`), and marks the rollup current.
pub async fn rebuild(db: &DatabaseConnection) -> Result<Rebuilt, DbErr> {
    rebuild_range(db, None).await
}

/// Recounts the cells of the days in `days` (seconds since the epoch, aligned on days), or of
/// every day, from the rows of those days.
async fn rebuild_range(
    db: &DatabaseConnection,
    days: Option<(i64, i64)>,
) -> Result<Rebuilt, DbErr> {
    let transaction = db.begin().await?;
    let backend = transaction.get_database_backend();
    if backend == DatabaseBackend::Postgres {
        transaction
            .execute_unprepared("LOCK TABLE generation_metrics IN SHARE MODE")
            .await?;
    }
    // A write first: on SQLite it takes the write lock for the whole transaction.
    account(&transaction, 0).await?;

    let mut cells: HashMap<CellKey, Cell> = HashMap::new();
    let mut rows = 0;
    let mut count = |page: &[sea_orm::QueryResult]| -> Result<(), DbErr> {
        for row in page {
            let measure = Measure::from_query_result(row, "")?;
            for span in SPANS {
                cells
                    .entry(CellKey::of(&measure, span))
                    .or_insert_with(|| Cell::new(EXACT_VALUES))
                    .add(&measure);
            }
        }
        rows += page.len() as u64;
        Ok(())
    };
    if let Some((from, to)) = days {
        // A day of rows, through the created_at index.
        let sql = format!(
            "SELECT {MEASURE_COLUMNS} FROM generation_metrics \
             WHERE created_at >= {} AND created_at < {}",
            placeholder(backend, 1),
            placeholder(backend, 2)
        );
        let bounds = [from, to].map(|at| {
            timestamp_parameter(backend, DateTime::from_timestamp(at, 0).unwrap_or_default())
        });
        let page = transaction
            .query_all_raw(Statement::from_sql_and_values(backend, sql, bounds))
            .await?;
        count(&page)?;
    } else {
        // Every row, in pages along the primary key.
        let mut after = i64::MIN;
        loop {
            let sql = format!(
                "SELECT id, {MEASURE_COLUMNS} FROM generation_metrics WHERE id > {} \
                 ORDER BY id LIMIT {REBUILD_PAGE}",
                placeholder(backend, 1)
            );
            let page = transaction
                .query_all_raw(Statement::from_sql_and_values(
                    backend,
                    sql,
                    [Value::from(after)],
                ))
                .await?;
            if let Some(last) = page.last() {
                after = last.try_get::<i64>("", "id")?;
            }
            count(&page)?;
            if (page.len() as u64) < REBUILD_PAGE {
                break;
            }
        }
    }

    let mut delete = "DELETE FROM generation_metrics_rollup".to_owned();
    let mut delete_values = Vec::new();
    if let Some((from, to)) = days {
        delete.push_str(&format!(
            " WHERE bucket_start >= {} AND bucket_start < {}",
            placeholder(backend, 1),
            placeholder(backend, 2)
        ));
        delete_values = vec![Value::from(from), Value::from(to)];
    }
    transaction
        .execute_raw(Statement::from_sql_and_values(
            backend,
            delete,
            delete_values,
        ))
        .await?;
    let written = cells.len() as u64;
    let cells: Vec<_> = cells.into_iter().collect();
    // SQLite allows 32,766 parameters per statement.
    for chunk in cells.chunks(1_000) {
        let mut values = Vec::with_capacity(chunk.len() * CELL_COLUMNS.len());
        let mut tuples = Vec::with_capacity(chunk.len());
        for (key, cell) in chunk {
            let first = values.len();
            values.extend(cell_values(key, cell));
            let placeholders: Vec<String> = (first + 1..=values.len())
                .map(|i| placeholder(backend, i))
                .collect();
            tuples.push(format!("({})", placeholders.join(", ")));
        }
        let sql = format!(
            "INSERT INTO generation_metrics_rollup ({}) VALUES {}",
            CELL_COLUMNS.join(", "),
            tuples.join(", ")
        );
        transaction
            .execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
    }
    if days.is_none() {
        transaction
            .execute_unprepared(
                "UPDATE generation_metrics_rollup_state SET rolled_changes = row_changes \
                 WHERE id = 1",
            )
            .await?;
    }
    transaction.commit().await?;
    Ok(Rebuilt {
        rows,
        cells: written,
    })
}

/// After rows older than `cutoff` were purged: drops the cells of periods that ended before it
/// and recounts the day it falls in.
pub async fn forget_before(db: &DatabaseConnection, cutoff: DateTime<Utc>) -> Result<(), DbErr> {
    let day = cutoff.timestamp().div_euclid(DAY) * DAY;
    let backend = db.get_database_backend();
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "DELETE FROM generation_metrics_rollup WHERE bucket_start < {}",
            placeholder(backend, 1)
        ),
        [Value::from(day)],
    ))
    .await?;
    rebuild_range(db, Some((day, day + DAY))).await?;
    Ok(())
}
