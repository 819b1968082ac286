//! Schema migrations for the SEIDRA service, applied by `seidra migrate` and at start-up.
//!
//! The first migration creates the base tables (users, personas, generation jobs); the
//! second, dated 2024-10-03, creates `generation_metrics`, one row per measured generation;
//! the third adds its pre-aggregated figures (`generation_metrics_rollup`) and makes `job_id`
//! unique. All run on the embedded SQLite database and on PostgreSQL.

pub use sea_orm_migration::prelude::*;

mod m20241001_000001_base_tables;
mod m20241003_000002_generation_metrics;
mod m20261203_000003_generation_metrics_rollup;

/// The ordered list of migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20241001_000001_base_tables::Migration),
            Box::new(m20241003_000002_generation_metrics::Migration),
            Box::new(m20261203_000003_generation_metrics_rollup::Migration),
        ]
    }
}
