//! The vocabulary of a generation job, shared by the API, the actors and storage: what a
//! client asks for, the context a job carries, and how it ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The kind of media a job produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Enum)]
#[serde(rename_all = "lowercase")]
#[oai(rename_all = "lowercase")]
pub enum MediaType {
    /// Still images, written as PNG.
    Image,
    /// Frame sequences, written as animated GIF.
    Video,
}

impl MediaType {
    /// The name stored in the `media_type` column.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaType::Image => "image",
            MediaType::Video => "video",
        }
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Enum)]
#[serde(rename_all = "lowercase")]
#[oai(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, waiting for a device.
    Queued,
    /// Running on a device.
    Running,
    /// Finished, and its row is committed.
    Succeeded,
    /// Ended with an error; its row is committed.
    Failed,
    /// Cancelled by a client; its row is committed.
    Cancelled,
}

impl JobStatus {
    /// The name stored in the `status` columns.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Reads a stored status name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == name)
    }

    /// Whether the job has ended (and so has its row).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A LoRA adapter applied to the model, with its strength.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct LoraSpec {
    /// The adapter's name.
    #[oai(validator(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$"))]
    pub name: String,
    /// Its strength, usually between 0 and 1.
    #[oai(default = "default_lora_weight")]
    #[serde(default = "default_lora_weight")]
    pub weight: f64,
}

fn default_lora_weight() -> f64 {
    1.0
}

/// What the model is asked to produce, after validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// Image or video.
    pub media_type: MediaType,
    /// The text the output is conditioned on.
    pub prompt: String,
    /// The model's name.
    pub model_name: String,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Images for an image job; 0 for a video job.
    pub images: u32,
    /// Frames for a video job; 0 for an image job.
    pub frames: u32,
    /// Frames per second of a video job.
    pub fps: u32,
    /// The sampler's name.
    pub scheduler: String,
    /// LoRA adapters.
    pub loras: Vec<LoraSpec>,
}

impl GenerationRequest {
    /// Images for an image job, frames for a video job.
    pub fn expected_outputs(&self) -> u32 {
        match self.media_type {
            MediaType::Image => self.images,
            MediaType::Video => self.frames,
        }
    }
}

/// A job with the context its measurement is joined with.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's id.
    pub id: Uuid,
    /// The user who submitted it (the token's subject).
    pub user_id: String,
    /// The persona it was submitted for, if any.
    pub persona_id: Option<String>,
    /// What to generate.
    pub request: GenerationRequest,
    /// When it was accepted, on the monotonic clock.
    pub submitted: Instant,
    /// When it was accepted, on the wall clock.
    pub submitted_at: DateTime<Utc>,
    /// Set when a client cancels the job; the device checks it between steps.
    pub cancel: CancelFlag,
}

/// A flag shared between the job registry and the device running the job.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// Asks the job to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the job was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
