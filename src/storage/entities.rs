//! sea-orm entities of the tables the migrations create.

pub mod generation_jobs;
pub mod generation_metrics;
pub mod personas;
pub mod users;
