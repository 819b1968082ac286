//! Personas a user generates for, registered the first time a job names one.

use sea_orm::entity::prelude::*;

/// A persona of a user.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "personas")]
pub struct Model {
    /// The persona's id, chosen by the client.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The user it belongs to.
    pub user_id: String,
    /// When it was first seen.
    pub created_at: DateTimeUtc,
}

/// Personas belong to users; the relation is enforced by the schema.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
