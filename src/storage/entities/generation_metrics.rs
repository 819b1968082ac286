//! One row per measured generation; see DESIGN's measurement semantics for each figure.

use sea_orm::entity::prelude::*;

/// A committed measurement.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "generation_metrics")]
pub struct Model {
    /// Row id, increasing with commit order.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The job measured.
    pub job_id: String,
    /// The user who submitted the job.
    pub user_id: String,
    /// The persona the job was for.
    pub persona_id: Option<String>,
    /// `image` or `video`.
    pub media_type: String,
    /// The model that ran.
    pub model_name: String,
    /// The prompt.
    #[sea_orm(column_type = "Text")]
    pub prompt: String,
    /// Images or frames produced.
    pub outputs: i32,
    /// Inference time in seconds (time until failure for a failed job).
    pub duration_seconds: f64,
    /// Outputs per second of inference; NULL when the job produced nothing.
    pub throughput: Option<f64>,
    /// Allocator bytes in use at the end, in MiB; NULL without device memory.
    pub vram_allocated_mb: Option<f64>,
    /// Allocator bytes reserved at the end, in MiB.
    pub vram_reserved_mb: Option<f64>,
    /// Peak allocator bytes in use during the job, in MiB.
    pub vram_peak_mb: Option<f64>,
    /// Peak minus bytes in use at the start, in MiB.
    pub vram_delta_mb: Option<f64>,
    /// Request parameters and figures that have no column.
    pub extra: Json,
    /// When the row was committed, UTC.
    pub created_at: DateTimeUtc,
    /// `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// The device that ran the job, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Seconds between submission and the start of work on the device.
    pub queue_wait_seconds: f64,
    /// The host whose service ran the job.
    pub host: String,
}

/// No relations are declared: rows outlive the jobs they measure.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
