//! Retention: deleting rows of `generation_metrics` older than a window, in small batches so
//! that writers and readers are never held up for long.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait};

use crate::storage::{placeholder, rollup, timestamp_parameter};

/// Rows deleted per statement.
pub const PURGE_BATCH: u64 = 5_000;

/// Pause between batches, so that other statements get the database in between.
const PAUSE_BETWEEN_BATCHES: Duration = Duration::from_millis(5);

/// Rows committed before `cutoff`.
pub async fn count_older_than(
    db: &DatabaseConnection,
    cutoff: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let sql = format!(
        "SELECT COUNT(*) AS n FROM generation_metrics WHERE created_at < {}",
        placeholder(backend, 1)
    );
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [timestamp_parameter(backend, cutoff)],
        ))
        .await?;
    Ok(row
        .map(|row| row.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0) as u64)
}

/// Deletes every row committed before `cutoff`, `batch` rows at a time; answers how many.
pub async fn purge_older_than(
    db: &DatabaseConnection,
    cutoff: DateTime<Utc>,
    batch: u64,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let sql = format!(
        "DELETE FROM generation_metrics WHERE id IN \
         (SELECT id FROM generation_metrics WHERE created_at < {} ORDER BY id LIMIT {batch})",
        placeholder(backend, 1)
    );
    let mut removed = 0;
    loop {
        // The rollup accounts for the rows at once; their periods' cells are dropped or
        // recounted at the end, so until then summaries still include what this run removes.
        let transaction = db.begin().await?;
        let result = transaction
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql.clone(),
                [timestamp_parameter(backend, cutoff)],
            ))
            .await?;
        rollup::account(&transaction, result.rows_affected() as i64).await?;
        transaction.commit().await?;
        removed += result.rows_affected();
        if result.rows_affected() < batch {
            break;
        }
        tokio::time::sleep(PAUSE_BETWEEN_BATCHES).await;
    }
    rollup::forget_before(db, cutoff).await?;
    Ok(removed)
}

/// Keeps the table in shape now and then every `period` until `stop` changes: purges rows
/// older than `retention` (when set), rebuilds the rollup if something else changed the table,
/// and refreshes SQLite's statistics. Each step logs what it did.
pub async fn run_schedule(
    db: DatabaseConnection,
    retention: Option<Duration>,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        if let Some(retention) = retention {
            let cutoff = Utc::now() - retention;
            match purge_older_than(&db, cutoff, PURGE_BATCH).await {
                Ok(removed) => tracing::info!(removed, cutoff = %cutoff, "retention purge"),
                Err(error) => {
                    tracing::warn!(error = %error, "retention purge failed; retrying next period")
                }
            }
        }
        rollup::catch_up(&db).await;
        if let Err(error) = crate::storage::optimize(&db).await {
            tracing::warn!(error = %error, "refreshing table statistics failed");
        }
    }
}
