//! Storage of jobs and measurements with sea-orm: connecting to the embedded SQLite file or a
//! PostgreSQL server, the entities, and the queries the API runs.
//!
//! `generation_metrics` is append-only: rows are inserted by the telemetry writer and only
//! ever deleted by the retention purge.

pub mod entities;
pub mod notify;
pub mod queries;
pub mod retention;
pub mod rollup;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, DbErr, Value,
};

pub use queries::{TelemetryFilter, TelemetrySummary};

/// Opens the database named by `url`, or the embedded SQLite file in `data_dir` when there is
/// no URL. SQLite runs in WAL mode so that readers never wait for the writer.
pub async fn connect(url: Option<&str>, data_dir: &Path) -> Result<DatabaseConnection, DbErr> {
    match url {
        Some(url) if !url.starts_with("sqlite:") => {
            let mut options = ConnectOptions::new(url.to_owned());
            options
                .max_connections(16)
                .connect_timeout(Duration::from_secs(5))
                .acquire_timeout(Duration::from_secs(5))
                .sqlx_logging(false);
            Database::connect(options).await
        }
        Some(url) => connect_sqlite(url).await,
        None => {
            let path = data_dir.join("seidra.db");
            connect_sqlite(&format!("sqlite://{}?mode=rwc", path.display())).await
        }
    }
}

async fn connect_sqlite(url: &str) -> Result<DatabaseConnection, DbErr> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|error| DbErr::Custom(format!("invalid sqlite url: {error}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true)
        // sqlx hands rows over from its SQLite thread through a channel of this many; with the
        // default, 50, that thread waits for the reader every 50 rows of a summary's thousands
        // (a single built `minutes=60` answer over 1 M rows took 17 ms instead of 8 to 12).
        .row_buffer_size(4096);
    let pool = sea_orm::sqlx::pool::PoolOptions::<sea_orm::sqlx::Sqlite>::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(|error| DbErr::Conn(sea_orm::RuntimeErr::SqlxError(error.into())))?;
    Ok(DatabaseConnection::from(pool))
}

/// Applies every pending migration.
pub async fn migrate_up(db: &DatabaseConnection) -> Result<(), DbErr> {
    Migrator::up(db, None).await
}

/// Refreshes SQLite's table statistics where they are stale. Without them the planner scans
/// whole indexes for the endpoint's grouped summaries; PostgreSQL's autovacuum does this on
/// its own.
pub async fn optimize(db: &DatabaseConnection) -> Result<(), DbErr> {
    if db.get_database_backend() == DatabaseBackend::Sqlite {
        db.execute_unprepared("PRAGMA optimize=0x10002").await?;
    }
    Ok(())
}

/// A point in time as a query parameter that compares correctly with `created_at`: on SQLite
/// the same text shape the column holds, on PostgreSQL a `timestamptz`.
pub fn timestamp_parameter(backend: DatabaseBackend, at: DateTime<Utc>) -> Value {
    match backend {
        DatabaseBackend::Postgres => Value::from(at),
        _ => Value::from(at.format(SQLITE_TIMESTAMP_FORMAT).to_string()),
    }
}

/// The `index`-th (from 1) parameter placeholder of a statement.
pub(crate) fn placeholder(backend: DatabaseBackend, index: usize) -> String {
    match backend {
        DatabaseBackend::Postgres => format!("${index}"),
        _ => "?".to_owned(),
    }
}

/// The shape of `created_at` on SQLite, the one `datetime()` and `strftime('%f')` give.
pub const SQLITE_TIMESTAMP_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.3f";
