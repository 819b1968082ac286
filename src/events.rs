//! What clients read: a committed measurement as the endpoint and the WebSocket channel
//! show it, and the envelope every channel message travels in.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};

use crate::storage::entities::generation_metrics;

/// The channel every event of this service is published on.
pub const SYSTEM_CHANNEL: &str = "system";

/// One committed row of `generation_metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct GenerationItem {
    /// Row id; also the cursor for paging further back.
    pub id: i64,
    /// The job measured.
    pub job_id: String,
    /// The user who submitted the job.
    pub user_id: String,
    /// The persona the job was for.
    #[oai(nullable)]
    pub persona_id: Option<String>,
    /// `image` or `video`.
    pub media_type: String,
    /// The model that ran.
    pub model_name: String,
    /// The prompt.
    pub prompt: String,
    /// Images (image job) or frames (video job) produced.
    pub outputs: i32,
    /// Inference time in seconds, device synchronised; time until failure for a failed job.
    pub duration_seconds: f64,
    /// `outputs / duration_seconds`; null when nothing was produced.
    #[oai(nullable)]
    pub throughput: Option<f64>,
    /// Allocator MiB in use at the end; null on a device without its own memory.
    #[oai(nullable)]
    pub vram_allocated_mb: Option<f64>,
    /// Allocator MiB reserved from the driver at the end.
    #[oai(nullable)]
    pub vram_reserved_mb: Option<f64>,
    /// Most allocator MiB in use during the job.
    #[oai(nullable)]
    pub vram_peak_mb: Option<f64>,
    /// Peak minus MiB in use at the job's start.
    #[oai(nullable)]
    pub vram_delta_mb: Option<f64>,
    /// Request parameters without a column, timings and device-level figures.
    pub extra: serde_json::Value,
    /// When the row was committed (UTC).
    #[serde(with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// The device that ran the job.
    pub device: String,
    /// Seconds between submission and the start of work on the device.
    pub queue_wait_seconds: f64,
    /// The host whose service ran the job.
    pub host: String,
}

impl From<generation_metrics::Model> for GenerationItem {
    fn from(row: generation_metrics::Model) -> Self {
        GenerationItem {
            id: row.id,
            job_id: row.job_id,
            user_id: row.user_id,
            persona_id: row.persona_id,
            media_type: row.media_type,
            model_name: row.model_name,
            prompt: row.prompt,
            outputs: row.outputs,
            duration_seconds: row.duration_seconds,
            throughput: row.throughput,
            vram_allocated_mb: row.vram_allocated_mb,
            vram_reserved_mb: row.vram_reserved_mb,
            vram_peak_mb: row.vram_peak_mb,
            vram_delta_mb: row.vram_delta_mb,
            extra: row.extra,
            created_at: row.created_at,
            status: row.status,
            device: row.device,
            queue_wait_seconds: row.queue_wait_seconds,
            host: row.host,
        }
    }
}

/// The type of a channel message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Enum)]
pub enum EventType {
    /// A committed measurement; `data` is a [`GenerationItem`].
    #[serde(rename = "telemetry.generation")]
    #[oai(rename = "telemetry.generation")]
    TelemetryGeneration,
    /// A job was accepted; `data` is a [`JobEvent`].
    #[serde(rename = "job.queued")]
    #[oai(rename = "job.queued")]
    JobQueued,
    /// Work on a job began on its device.
    #[serde(rename = "job.started")]
    #[oai(rename = "job.started")]
    JobStarted,
    /// Steps done on a running job, at most five times a second.
    #[serde(rename = "job.progress")]
    #[oai(rename = "job.progress")]
    JobProgress,
    /// A job succeeded; its `telemetry.generation` event came first.
    #[serde(rename = "job.finished")]
    #[oai(rename = "job.finished")]
    JobFinished,
    /// A job failed; its `telemetry.generation` event came first.
    #[serde(rename = "job.failed")]
    #[oai(rename = "job.failed")]
    JobFailed,
    /// A job was cancelled; its `telemetry.generation` event came first.
    #[serde(rename = "job.cancelled")]
    #[oai(rename = "job.cancelled")]
    JobCancelled,
}

/// The `data` of a job lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct JobEvent {
    /// The job.
    pub job_id: String,
    /// Its user.
    pub user_id: String,
    /// `image` or `video`.
    pub media_type: String,
    /// The model.
    pub model_name: String,
    /// The device, once the job has started.
    #[oai(nullable)]
    pub device: Option<String>,
    /// Denoising steps done (progress events).
    #[oai(nullable)]
    pub step: Option<u32>,
    /// Denoising steps in all (progress events).
    #[oai(nullable)]
    pub steps: Option<u32>,
    /// Frames finished, for a video job (progress events). Frames are denoised together, so
    /// this is 0 until the last step and then every frame.
    #[oai(nullable)]
    pub frames_done: Option<u32>,
    /// Frames in all, for a video job.
    #[oai(nullable)]
    pub frames: Option<u32>,
    /// The committed row's id (finished, failed and cancelled events).
    #[oai(nullable)]
    pub metric_id: Option<i64>,
    /// The error, for a failed job.
    #[oai(nullable)]
    pub error: Option<String>,
}

/// What a channel message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A committed row.
    Generation(GenerationItem),
    /// A job lifecycle change.
    Job(JobEvent),
}

/// A numbered channel message, serialised once for every client.
#[derive(Debug)]
pub struct ChannelEvent {
    /// The message's type.
    pub event_type: EventType,
    /// Position on the channel.
    pub seq: u64,
    /// When it was emitted.
    pub emitted_at: DateTime<Utc>,
    /// What it carries.
    pub payload: Payload,
    /// The message as sent on the wire.
    pub json: String,
}

impl ChannelEvent {
    /// Numbers and serialises a message.
    pub fn new(event_type: EventType, seq: u64, payload: Payload) -> Self {
        let emitted_at = Utc::now();
        let data = match &payload {
            Payload::Generation(item) => serde_json::to_value(item),
            Payload::Job(job) => serde_json::to_value(job),
        }
        .unwrap_or_default();
        let json = serde_json::json!({
            "type": event_type,
            "channel": SYSTEM_CHANNEL,
            "seq": seq,
            "emitted_at": emitted_at.to_rfc3339(),
            "data": data,
        })
        .to_string();
        ChannelEvent {
            event_type,
            seq,
            emitted_at,
            payload,
            json,
        }
    }

    /// The message as the REST `recent` buffer shows it, for a committed row.
    pub fn envelope(&self) -> Option<EventEnvelope> {
        match &self.payload {
            Payload::Generation(item) => Some(EventEnvelope {
                event_type: self.event_type,
                channel: SYSTEM_CHANNEL.to_owned(),
                seq: self.seq,
                emitted_at: self.emitted_at,
                data: item.clone(),
            }),
            Payload::Job(_) => None,
        }
    }
}

/// A `telemetry.generation` message as the endpoint's `recent` shows it: `type` says what
/// `data` holds (a committed row), `channel` is `system`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Object)]
pub struct EventEnvelope {
    // Described in the struct's documentation: a field comment would make the document wrap
    // the reference in `allOf`, which generated clients reject.
    #[serde(rename = "type")]
    #[oai(rename = "type")]
    pub event_type: EventType,
    /// The channel, `system`.
    pub channel: String,
    /// Position on the channel, without gaps within a run of the service; each run numbers
    /// from the microseconds between the Unix epoch and its start.
    pub seq: u64,
    /// When the service emitted the message.
    #[serde(with = "rfc3339")]
    pub emitted_at: DateTime<Utc>,
    // Described in the struct's documentation.
    pub data: GenerationItem,
}

/// Times on the channel written exactly as the REST answers write them (`+00:00`), so that
/// an event's `data` equals the endpoint's item byte for byte.
mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&at.to_rfc3339())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|at| at.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}
