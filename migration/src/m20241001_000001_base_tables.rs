//! Base tables: the users who submit jobs, their personas, and the generation jobs.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DatabaseBackend;

use crate::m20241003_000002_generation_metrics::now_default;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Personas {
    Table,
    Id,
    UserId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum GenerationJobs {
    Table,
    Id,
    UserId,
    PersonaId,
    MediaType,
    ModelName,
    Prompt,
    Parameters,
    Status,
    Host,
    SubmittedAt,
    FinishedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .if_not_exists()
                    .col(ColumnDef::new(Users::Id).string().not_null().primary_key())
                    .col(now_default(backend, Users::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Personas::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Personas::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Personas::UserId).string().not_null())
                    .col(now_default(backend, Personas::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Personas::Table, Personas::UserId)
                            .to(Users::Table, Users::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(GenerationJobs::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(GenerationJobs::Id)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(GenerationJobs::UserId).string().not_null())
                    .col(ColumnDef::new(GenerationJobs::PersonaId).string().null())
                    .col(
                        ColumnDef::new(GenerationJobs::MediaType)
                            .string()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(GenerationJobs::ModelName)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(GenerationJobs::Prompt).text().not_null())
                    .col(ColumnDef::new(GenerationJobs::Parameters).json().not_null())
                    .col(ColumnDef::new(GenerationJobs::Status).string().not_null())
                    .col(ColumnDef::new(GenerationJobs::Host).string().not_null())
                    .col(now_default(backend, GenerationJobs::SubmittedAt))
                    .col(timestamp_column(backend, GenerationJobs::FinishedAt).null())
                    .foreign_key(
                        ForeignKey::create()
                            .from(GenerationJobs::Table, GenerationJobs::UserId)
                            .to(Users::Table, Users::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_generation_jobs_status")
                    .table(GenerationJobs::Table)
                    .col(GenerationJobs::Status)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            GenerationJobs::Table.into_iden(),
            Personas::Table.into_iden(),
            Users::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

/// A UTC timestamp column without a default (see [`now_default`] for the storage format).
pub(crate) fn timestamp_column<T: IntoIden>(backend: DatabaseBackend, name: T) -> ColumnDef {
    let mut column = ColumnDef::new(name);
    match backend {
        DatabaseBackend::Postgres => column.timestamp_with_time_zone(),
        _ => column.string(),
    };
    column
}
