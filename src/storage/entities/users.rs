//! The users who submit jobs, known by their token's subject.

use sea_orm::entity::prelude::*;

/// A user, registered the first time one of their tokens submits a job.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    /// The token's subject.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// When the user was first seen.
    pub created_at: DateTimeUtc,
}

/// Users own jobs and personas; queries join by id where needed.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
