//! Pre-aggregated figures of `generation_metrics`, and one row per job.
//!
//! `generation_metrics_rollup` holds, per hour and per day (UTC) and per media type, model,
//! device and status, the count, sums, extremes and a duration histogram of the rows committed
//! in that period. The telemetry writer keeps it up to date in the transaction that commits the
//! rows; the endpoint summarises long windows from it instead of from every row.
//!
//! Rows inserted, updated or deleted by anything else (a purge by hand, a bulk load) would leave
//! it behind, so triggers count every change to `generation_metrics` in
//! `generation_metrics_rollup_state.row_changes`, and whatever keeps the rollup adds the changes
//! it has accounted for to `rolled_changes`. The two differ exactly when the rollup cannot be
//! trusted; the service then summarises from the rows and rebuilds the rollup.
//!
//! A unique index on `job_id` makes a second row for a job impossible, whatever a retried
//! commit does.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum GenerationMetrics {
    Table,
    JobId,
}

#[derive(DeriveIden)]
enum GenerationMetricsRollup {
    Table,
    SpanSeconds,
    BucketStart,
    MediaType,
    ModelName,
    Device,
    Status,
    RowCount,
    DurationSum,
    DurationMin,
    DurationMax,
    DurationHistogram,
    DurationValues,
    ThroughputSum,
    ThroughputCount,
    VramPeakSum,
    VramPeakCount,
    VramAllocatedSum,
    VramAllocatedCount,
    VramReservedSum,
    VramReservedCount,
    QueueWaitSum,
}

#[derive(DeriveIden)]
enum GenerationMetricsRollupState {
    Table,
    Id,
    RowChanges,
    RolledChanges,
}

const SQLITE_TRIGGERS: [&str; 3] = [
    "CREATE TRIGGER generation_metrics_count_insert AFTER INSERT ON generation_metrics \
     BEGIN UPDATE generation_metrics_rollup_state SET row_changes = row_changes + 1 WHERE id = 1; END",
    "CREATE TRIGGER generation_metrics_count_update AFTER UPDATE ON generation_metrics \
     BEGIN UPDATE generation_metrics_rollup_state SET row_changes = row_changes + 1 WHERE id = 1; END",
    "CREATE TRIGGER generation_metrics_count_delete AFTER DELETE ON generation_metrics \
     BEGIN UPDATE generation_metrics_rollup_state SET row_changes = row_changes + 1 WHERE id = 1; END",
];

// Statement-level triggers: one update of the state row per statement, whatever its size.
const POSTGRES_TRIGGERS: [&str; 4] = [
    "CREATE FUNCTION generation_metrics_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$ \
     BEGIN \
       UPDATE generation_metrics_rollup_state \
         SET row_changes = row_changes + (SELECT count(*) FROM changed_rows) WHERE id = 1; \
       RETURN NULL; \
     END $$",
    "CREATE TRIGGER generation_metrics_count_insert AFTER INSERT ON generation_metrics \
     REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT \
     EXECUTE FUNCTION generation_metrics_count_changes()",
    "CREATE TRIGGER generation_metrics_count_update AFTER UPDATE ON generation_metrics \
     REFERENCING NEW TABLE AS changed_rows FOR EACH STATEMENT \
     EXECUTE FUNCTION generation_metrics_count_changes()",
    "CREATE TRIGGER generation_metrics_count_delete AFTER DELETE ON generation_metrics \
     REFERENCING OLD TABLE AS changed_rows FOR EACH STATEMENT \
     EXECUTE FUNCTION generation_metrics_count_changes()",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use GenerationMetricsRollup as R;
        use GenerationMetricsRollupState as S;

        manager
            .drop_index(
                Index::drop()
                    .name("idx_generation_metrics_job_id")
                    .table(GenerationMetrics::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_generation_metrics_job_id")
                    .table(GenerationMetrics::Table)
                    .col(GenerationMetrics::JobId)
                    .unique()
                    .to_owned(),
            )
            .await?;

        let text = |name: R| ColumnDef::new(name).string().not_null().to_owned();
        let sum = |name: R| ColumnDef::new(name).double().not_null().to_owned();
        let count = |name: R| ColumnDef::new(name).big_integer().not_null().to_owned();
        manager
            .create_table(
                Table::create()
                    .table(R::Table)
                    .col(ColumnDef::new(R::SpanSeconds).integer().not_null())
                    .col(ColumnDef::new(R::BucketStart).big_integer().not_null())
                    .col(text(R::MediaType))
                    .col(text(R::ModelName))
                    .col(text(R::Device))
                    .col(text(R::Status))
                    .col(count(R::RowCount))
                    .col(sum(R::DurationSum))
                    .col(ColumnDef::new(R::DurationMin).double().null())
                    .col(ColumnDef::new(R::DurationMax).double().null())
                    .col(ColumnDef::new(R::DurationHistogram).blob().not_null())
                    .col(ColumnDef::new(R::DurationValues).blob().null())
                    .col(sum(R::ThroughputSum))
                    .col(count(R::ThroughputCount))
                    .col(sum(R::VramPeakSum))
                    .col(count(R::VramPeakCount))
                    .col(sum(R::VramAllocatedSum))
                    .col(count(R::VramAllocatedCount))
                    .col(sum(R::VramReservedSum))
                    .col(count(R::VramReservedCount))
                    .col(sum(R::QueueWaitSum))
                    .primary_key(
                        Index::create()
                            .col(R::SpanSeconds)
                            .col(R::BucketStart)
                            .col(R::MediaType)
                            .col(R::ModelName)
                            .col(R::Device)
                            .col(R::Status),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(S::Table)
                    .col(ColumnDef::new(S::Id).integer().not_null().primary_key())
                    .col(ColumnDef::new(S::RowChanges).big_integer().not_null())
                    .col(ColumnDef::new(S::RolledChanges).big_integer().not_null())
                    .to_owned(),
            )
            .await?;
        // Behind from the start: the service builds the rollup from the existing rows.
        manager
            .exec_stmt(
                Query::insert()
                    .into_table(S::Table)
                    .columns([S::Id, S::RowChanges, S::RolledChanges])
                    .values_panic([1.into(), 0.into(), (-1).into()])
                    .to_owned(),
            )
            .await?;

        let db = manager.get_connection();
        let triggers: &[&str] = match manager.get_database_backend() {
            DatabaseBackend::Postgres => &POSTGRES_TRIGGERS,
            _ => &SQLITE_TRIGGERS,
        };
        for sql in triggers {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for name in [
            "generation_metrics_count_insert",
            "generation_metrics_count_update",
            "generation_metrics_count_delete",
        ] {
            let sql = match manager.get_database_backend() {
                DatabaseBackend::Postgres => {
                    format!("DROP TRIGGER IF EXISTS {name} ON generation_metrics")
                }
                _ => format!("DROP TRIGGER IF EXISTS {name}"),
            };
            db.execute_unprepared(&sql).await?;
        }
        if manager.get_database_backend() == DatabaseBackend::Postgres {
            db.execute_unprepared("DROP FUNCTION IF EXISTS generation_metrics_count_changes()")
                .await?;
        }
        for table in [
            GenerationMetricsRollupState::Table.into_iden(),
            GenerationMetricsRollup::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        manager
            .drop_index(
                Index::drop()
                    .name("uq_generation_metrics_job_id")
                    .table(GenerationMetrics::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_generation_metrics_job_id")
                    .table(GenerationMetrics::Table)
                    .col(GenerationMetrics::JobId)
                    .to_owned(),
            )
            .await
    }
}
