//! Schema migrations for the SEIDRA service, applied by `seidra migrate` and at start-up.
//!
//! The first migration creates the base tables (users, personas, generation jobs); the
//! second, dated 2024-10-03, creates `generation_metrics`, one row per measured generation.
//! Both run unchanged on the embedded SQLite database and on PostgreSQL.

pub use sea_orm_migration::prelude::*;

mod m20241001_000001_base_tables;
mod m20241003_000002_generation_metrics;

/// The ordered list of migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20241001_000001_base_tables::Migration),
            Box::new(m20241003_000002_generation_metrics::Migration),
        ]
    }
}
