//! `generation_metrics`: one append-only row per measured generation, and the indexes the
//! telemetry endpoint filters and sorts on.
//!
//! `created_at` is set by the database when the row is committed. On SQLite it is stored as
//! text in the shape `datetime('now')` returns (`YYYY-MM-DD HH:MM:SS.SSS`, UTC), so the
//! procedure's own SQL compares correctly; on PostgreSQL it is a `timestamptz`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::m20241001_000001_base_tables::timestamp_column;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum GenerationMetrics {
    Table,
    Id,
    JobId,
    UserId,
    PersonaId,
    MediaType,
    ModelName,
    Prompt,
    Outputs,
    DurationSeconds,
    Throughput,
    VramAllocatedMb,
    VramReservedMb,
    VramPeakMb,
    VramDeltaMb,
    Extra,
    CreatedAt,
    Status,
    Device,
    QueueWaitSeconds,
    Host,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use GenerationMetrics as M;

        let backend = manager.get_database_backend();
        manager
            .create_table(
                Table::create()
                    .table(M::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(M::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(M::JobId).string().not_null())
                    .col(ColumnDef::new(M::UserId).string().not_null())
                    .col(ColumnDef::new(M::PersonaId).string().null())
                    .col(ColumnDef::new(M::MediaType).string().not_null())
                    .col(ColumnDef::new(M::ModelName).string().not_null())
                    .col(ColumnDef::new(M::Prompt).text().not_null())
                    .col(ColumnDef::new(M::Outputs).integer().not_null())
                    .col(ColumnDef::new(M::DurationSeconds).double().not_null())
                    .col(ColumnDef::new(M::Throughput).double().null())
                    .col(ColumnDef::new(M::VramAllocatedMb).double().null())
                    .col(ColumnDef::new(M::VramReservedMb).double().null())
                    .col(ColumnDef::new(M::VramPeakMb).double().null())
                    .col(ColumnDef::new(M::VramDeltaMb).double().null())
                    .col(ColumnDef::new(M::Extra).json().not_null())
                    .col(now_default(backend, M::CreatedAt))
                    .col(ColumnDef::new(M::Status).string().not_null())
                    .col(ColumnDef::new(M::Device).string().not_null())
                    .col(ColumnDef::new(M::QueueWaitSeconds).double().not_null())
                    .col(ColumnDef::new(M::Host).string().not_null())
                    .to_owned(),
            )
            .await?;

        // Every filter of the endpoint is an equality on one column plus a time window, and
        // every answer is sorted newest first: one (column, created_at) index per filter.
        let indexes: [(&str, Option<M>); 7] = [
            ("idx_generation_metrics_created_at", None),
            ("idx_generation_metrics_media_type", Some(M::MediaType)),
            ("idx_generation_metrics_model_name", Some(M::ModelName)),
            ("idx_generation_metrics_status", Some(M::Status)),
            ("idx_generation_metrics_device", Some(M::Device)),
            ("idx_generation_metrics_user_id", Some(M::UserId)),
            ("idx_generation_metrics_persona_id", Some(M::PersonaId)),
        ];
        for (name, column) in indexes {
            let mut index = Index::create();
            index.name(name).table(M::Table);
            if let Some(column) = column {
                index.col(column);
            }
            index.col(M::CreatedAt);
            manager.create_index(index.to_owned()).await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_generation_metrics_job_id")
                    .table(M::Table)
                    .col(M::JobId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(GenerationMetrics::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

/// A non-null UTC timestamp column that the database fills with the time of the insert.
pub(crate) fn now_default<T: IntoIden>(backend: DatabaseBackend, name: T) -> ColumnDef {
    let mut column = timestamp_column(backend, name);
    column.not_null();
    match backend {
        DatabaseBackend::Postgres => column.default(Expr::current_timestamp()),
        _ => column.default(Expr::cust("(strftime('%Y-%m-%d %H:%M:%f', 'now'))")),
    };
    column
}
