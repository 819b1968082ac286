//! A submitted generation job and where it stands.

use sea_orm::entity::prelude::*;

/// A job as stored at submission and updated when it ends.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "generation_jobs")]
pub struct Model {
    /// The job's id (a UUID).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The user who submitted it.
    pub user_id: String,
    /// The persona it was submitted for.
    pub persona_id: Option<String>,
    /// `image` or `video`.
    pub media_type: String,
    /// The model asked for.
    pub model_name: String,
    /// The prompt.
    #[sea_orm(column_type = "Text")]
    pub prompt: String,
    /// The whole validated request.
    pub parameters: Json,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// The host that accepted it.
    pub host: String,
    /// When it was accepted.
    pub submitted_at: DateTimeUtc,
    /// When its row was committed.
    pub finished_at: Option<DateTimeUtc>,
}

/// Jobs belong to users; the relation is enforced by the schema.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
