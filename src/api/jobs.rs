//! Generation jobs: submit, read, cancel, and download their files.

use std::time::Instant;

use chrono::Utc;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, ResponseContent, Union};
use ractor::rpc::CallResult;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

use crate::actors::JobContextMessage;
use crate::actors::job_context::CancelOutcome;
use crate::api::auth::BearerAuth;
use crate::api::errors::ErrorBody;
use crate::api::{ApiTags, AppState};
use crate::events::GenerationItem;
use crate::generation::{CancelFlag, GenerationRequest, Job, JobStatus, LoraSpec, MediaType};
use crate::model::diffusion::BUILTIN_MODEL;
use crate::model::encode::content_type;
use crate::model::network::DenoiserConfig;
use crate::storage::entities::{generation_jobs, generation_metrics};

/// The model to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
pub enum ModelName {
    /// The built-in burn model.
    #[oai(rename = "seidra-tiny-diffusion")]
    SeidraTinyDiffusion,
}

/// What every job takes. Sizes are in pixels; unset fields take the documented defaults.
#[derive(Debug, Clone, Object)]
pub struct CommonJobFields {
    /// The text to condition on.
    #[oai(validator(min_length = 1, max_length = 2000, pattern = "^[^\\x00]*$"))]
    pub prompt: String,
    /// The persona the job is for.
    #[oai(validator(min_length = 1, max_length = 128, pattern = "^[^\\x00]*$"))]
    pub persona_id: Option<String>,
    // The model; default and only choice `seidra-tiny-diffusion` (a field comment would wrap
    // the enum's reference in `allOf`, which generated clients reject).
    pub model: Option<ModelName>,
    /// Width, a multiple of 8 from 16 to 512; default 64.
    #[oai(validator(minimum(value = "16"), maximum(value = "512"), multiple_of = "8"))]
    pub width: Option<u32>,
    /// Height, a multiple of 8 from 16 to 512; default 64.
    #[oai(validator(minimum(value = "16"), maximum(value = "512"), multiple_of = "8"))]
    pub height: Option<u32>,
    /// Denoising steps, 1 to 200; default 12.
    #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
    pub steps: Option<u32>,
    /// Seed of the initial noise, 0 to 2^53 − 1 (exact in JavaScript); random when unset (the
    /// row records it).
    #[oai(validator(minimum(value = "0"), maximum(value = "9007199254740991")))]
    pub seed: Option<u64>,
    /// The sampler; default `ddim`.
    #[oai(validator(min_length = 1, max_length = 64, pattern = "^[^\\x00]*$"))]
    pub scheduler: Option<String>,
    /// LoRA adapters to apply.
    #[oai(validator(max_items = 8))]
    pub loras: Option<Vec<LoraSpec>>,
}

/// An image job.
#[derive(Debug, Clone, Object)]
pub struct ImageJobBody {
    // Prompt, sizes, steps and the other fields every job takes.
    #[oai(flatten)]
    pub common: CommonJobFields,
    /// Images to produce, 1 to 16; default 1.
    #[oai(validator(minimum(value = "1"), maximum(value = "16")))]
    pub images: Option<u32>,
}

/// A video job.
#[derive(Debug, Clone, Object)]
pub struct VideoJobBody {
    // Prompt, sizes, steps and the other fields every job takes.
    #[oai(flatten)]
    pub common: CommonJobFields,
    /// Frames to produce, 2 to 120; default 8.
    #[oai(validator(minimum(value = "2"), maximum(value = "120")))]
    pub frames: Option<u32>,
    /// Frames per second, 1 to 60; default 8.
    #[oai(validator(minimum(value = "1"), maximum(value = "60")))]
    pub fps: Option<u32>,
}

/// A generation request: an image job or a video job, told apart by `media_type`.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "media_type")]
pub enum SubmitJobBody {
    /// `"media_type": "image"`.
    #[oai(mapping = "image")]
    Image(ImageJobBody),
    /// `"media_type": "video"`.
    #[oai(mapping = "video")]
    Video(VideoJobBody),
}

impl SubmitJobBody {
    /// The persona the job is for.
    pub fn persona_id(&self) -> Option<String> {
        self.common().persona_id.clone()
    }

    fn common(&self) -> &CommonJobFields {
        match self {
            SubmitJobBody::Image(body) => &body.common,
            SubmitJobBody::Video(body) => &body.common,
        }
    }

    /// The request with every default filled in.
    pub fn into_request(self) -> GenerationRequest {
        let (media_type, common, images, frames, fps) = match self {
            SubmitJobBody::Image(body) => (
                MediaType::Image,
                body.common,
                body.images.unwrap_or(1),
                0,
                0,
            ),
            SubmitJobBody::Video(body) => (
                MediaType::Video,
                body.common,
                0,
                body.frames.unwrap_or(8),
                body.fps.unwrap_or(8),
            ),
        };
        GenerationRequest {
            media_type,
            prompt: common.prompt,
            model_name: BUILTIN_MODEL.to_owned(),
            width: common.width.unwrap_or(64),
            height: common.height.unwrap_or(64),
            steps: common.steps.unwrap_or(12),
            seed: common.seed.unwrap_or_else(|| rand::random::<u64>() >> 11),
            images,
            frames,
            fps,
            scheduler: common.scheduler.unwrap_or_else(|| "ddim".to_owned()),
            loras: common.loras.unwrap_or_default(),
        }
    }
}

/// An accepted job.
#[derive(Debug, Clone, Object)]
pub struct JobAccepted {
    /// The job's id.
    pub job_id: Uuid,
    // `queued` (`cancelled` when answering a cancellation).
    pub status: JobStatus,
    /// Where to read the job.
    pub url: String,
}

/// A job's progress while it runs.
#[derive(Debug, Clone, Object)]
pub struct JobProgress {
    /// Steps done.
    pub done: u32,
    /// Steps in all.
    pub total: u32,
}

/// A file a job produced.
#[derive(Debug, Clone, Object)]
pub struct JobFile {
    /// The file's name.
    pub name: String,
    /// Where to download it (with the same token).
    pub url: String,
}

/// A job and, once it has ended, its measurement.
#[derive(Debug, Clone, Object)]
pub struct JobResponse {
    /// The job's id.
    pub job_id: Uuid,
    // Where it stands; `succeeded`, `failed` and `cancelled` come only after its row is
    // committed. (A field comment would wrap the reference in `allOf`.)
    pub status: JobStatus,
    // `image` or `video`.
    pub media_type: MediaType,
    /// The model.
    pub model_name: String,
    /// The prompt.
    pub prompt: String,
    /// The device running or that ran it.
    #[oai(nullable)]
    pub device: Option<String>,
    // Steps done, while it runs.
    #[oai(nullable)]
    pub progress: Option<JobProgress>,
    // Its committed row, once it has ended.
    #[oai(nullable)]
    pub metrics: Option<GenerationItem>,
    /// Its files.
    pub files: Vec<JobFile>,
}

#[derive(ApiResponse)]
enum SubmitResponse {
    /// The job is queued.
    #[oai(status = 202)]
    Accepted(Json<JobAccepted>),
    /// The request is invalid, or its outputs together need more memory than a job may take
    /// (`max_job_memory_mib`, a rule across `width`, `height` and `images` or `frames` that
    /// the schema cannot state); the message names the fields.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The body is larger than 64 KiB.
    #[oai(status = 413)]
    #[allow(dead_code)] // answered before the route; listed for the document
    PayloadTooLarge(Json<ErrorBody>),
    /// The body is not sent as JSON (`Content-Type` is not `application/json`).
    #[oai(status = 415)]
    #[allow(dead_code)] // answered by body parsing; listed for the document
    UnsupportedMediaType(Json<ErrorBody>),
    /// No valid token.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by the bearer scheme's checker; listed for the document
    Unauthorized(Json<ErrorBody>),
    /// The job could not be stored, too many jobs are waiting, or the service is stopping.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
#[allow(clippy::large_enum_variant)] // built once per request
enum GetJobResponse {
    /// The job id is not a UUID.
    #[oai(status = 400)]
    #[allow(dead_code)] // answered by path parsing; listed for the document
    BadRequest(Json<ErrorBody>),
    /// The job.
    #[oai(status = 200)]
    Ok(Json<JobResponse>),
    /// No valid token.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by the bearer scheme's checker; listed for the document
    Unauthorized(Json<ErrorBody>),
    /// No such job for this user.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The database could not be read.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
enum CancelResponse {
    /// The job id is not a UUID.
    #[oai(status = 400)]
    #[allow(dead_code)] // answered by path parsing; listed for the document
    BadRequest(Json<ErrorBody>),
    /// The job will stop and leave a cancelled row.
    #[oai(status = 202)]
    Accepted(Json<JobAccepted>),
    /// No valid token.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by the bearer scheme's checker; listed for the document
    Unauthorized(Json<ErrorBody>),
    /// No such running or queued job for this user.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The job has already ended.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
}

/// A job's output file.
#[derive(ResponseContent)]
enum OutputFile {
    /// An image of an image job.
    #[oai(content_type = "image/png")]
    Png(Binary<Vec<u8>>),
    /// The animation of a video job.
    #[oai(content_type = "image/gif")]
    Gif(Binary<Vec<u8>>),
}

#[derive(ApiResponse)]
enum FileResponse {
    /// The job id is not a UUID (a file name that is not one of the job's files gets 404).
    #[oai(status = 400)]
    #[allow(dead_code)] // answered by path parsing; listed for the document
    BadRequest(Json<ErrorBody>),
    /// The file: a PNG image or a GIF animation.
    #[oai(status = 200)]
    Ok(OutputFile),
    /// No valid token.
    #[oai(status = 401)]
    #[allow(dead_code)] // answered by the bearer scheme's checker; listed for the document
    Unauthorized(Json<ErrorBody>),
    /// No such file for this user.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
}

/// Job routes.
pub struct JobsApi;

#[OpenApi(prefix_path = "/api/jobs", tag = "ApiTags::Jobs")]
impl JobsApi {
    /// Submit a generation job.
    #[oai(path = "/", method = "post")]
    async fn submit(
        &self,
        auth: BearerAuth,
        state: Data<&AppState>,
        body: Json<SubmitJobBody>,
    ) -> SubmitResponse {
        let persona_id = body.0.persona_id();
        let request = body.0.into_request();
        let needed = DenoiserConfig::new().attention_bytes(
            request.expected_outputs(),
            request.width,
            request.height,
        );
        let limit = state.max_job_memory_mib.saturating_mul(1 << 20);
        if needed > limit {
            let outputs = match request.media_type {
                MediaType::Image => "images",
                MediaType::Video => "frames",
            };
            return SubmitResponse::BadRequest(ErrorBody::new(
                "bad_request",
                format!(
                    "width, height, {outputs}: this job needs about {} MiB for the model's \
                     attention alone, more than this service allows a job \
                     (max_job_memory_mib = {}); ask for fewer or smaller outputs",
                    needed.div_ceil(1 << 20),
                    state.max_job_memory_mib
                ),
            ));
        }
        let job = Job {
            id: Uuid::new_v4(),
            user_id: auth.0.sub.clone(),
            persona_id,
            request,
            submitted: Instant::now(),
            submitted_at: Utc::now(),
            cancel: CancelFlag::default(),
        };
        let job_id = job.id;
        match state
            .runtime
            .job_context
            .call(|reply| JobContextMessage::SubmitJob(job, reply), None)
            .await
        {
            Ok(CallResult::Success(Ok(()))) => SubmitResponse::Accepted(Json(JobAccepted {
                job_id,
                status: JobStatus::Queued,
                url: format!("/api/jobs/{job_id}"),
            })),
            Ok(CallResult::Success(Err(error))) => {
                tracing::warn!(error = %error, "job refused");
                SubmitResponse::Unavailable(ErrorBody::new("unavailable", error.to_string()))
            }
            _ => SubmitResponse::Unavailable(ErrorBody::new(
                "unavailable",
                "the job registry is not running",
            )),
        }
    }

    /// Read a job: its status, progress, measurement and files.
    #[oai(path = "/:job_id", method = "get")]
    async fn get(
        &self,
        auth: BearerAuth,
        state: Data<&AppState>,
        job_id: Path<Uuid>,
    ) -> GetJobResponse {
        match find_job(&state, &auth, job_id.0).await {
            Ok(Some(job)) => GetJobResponse::Ok(Json(job)),
            Ok(None) => GetJobResponse::NotFound(not_found(job_id.0)),
            Err(error) => {
                GetJobResponse::Unavailable(ErrorBody::new("unavailable", error.to_string()))
            }
        }
    }

    /// Cancel a queued or running job; it leaves a row with status `cancelled`.
    #[oai(path = "/:job_id/cancel", method = "post")]
    async fn cancel(
        &self,
        auth: BearerAuth,
        state: Data<&AppState>,
        job_id: Path<Uuid>,
    ) -> CancelResponse {
        let job_id = job_id.0;
        match find_job(&state, &auth, job_id).await {
            Ok(Some(_)) => {}
            _ => return CancelResponse::NotFound(not_found(job_id)),
        }
        let outcome = state
            .runtime
            .job_context
            .call(|reply| JobContextMessage::CancelJob(job_id, reply), None)
            .await;
        match outcome {
            Ok(CallResult::Success(CancelOutcome::Cancelling)) => {
                CancelResponse::Accepted(Json(JobAccepted {
                    job_id,
                    status: JobStatus::Cancelled,
                    url: format!("/api/jobs/{job_id}"),
                }))
            }
            Ok(CallResult::Success(CancelOutcome::AlreadyFinished(status))) => {
                CancelResponse::Conflict(ErrorBody::new(
                    "conflict",
                    format!("job {job_id} has already ended: {}", status.as_str()),
                ))
            }
            _ => CancelResponse::NotFound(not_found(job_id)),
        }
    }

    /// Download a file a job produced.
    #[oai(path = "/:job_id/files/:name", method = "get")]
    async fn file(
        &self,
        auth: BearerAuth,
        state: Data<&AppState>,
        job_id: Path<Uuid>,
        name: Path<String>,
    ) -> FileResponse {
        let name = name.0;
        let safe = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && !name.starts_with('.');
        // Only a file the job lists: a job cancelled after its files were written lists none.
        let listed = matches!(
            find_job(&state, &auth, job_id.0).await,
            Ok(Some(job)) if job.files.iter().any(|file| file.name == name)
        );
        let path = state.output_dir.join(job_id.0.to_string()).join(&name);
        match (safe && listed).then_some(()) {
            Some(()) => match tokio::fs::read(&path).await {
                Ok(bytes) if content_type(&name) == "image/gif" => {
                    FileResponse::Ok(OutputFile::Gif(Binary(bytes)))
                }
                Ok(bytes) => FileResponse::Ok(OutputFile::Png(Binary(bytes))),
                Err(_) => FileResponse::NotFound(ErrorBody::new(
                    "not_found",
                    format!("name: job {} has no file `{name}`", job_id.0),
                )),
            },
            None => FileResponse::NotFound(ErrorBody::new(
                "not_found",
                format!("name: job {} has no file `{name}`", job_id.0),
            )),
        }
    }
}

fn not_found(job_id: Uuid) -> Json<ErrorBody> {
    ErrorBody::new(
        "not_found",
        format!("job_id: no job {job_id} for this token"),
    )
}

/// A job the token may see: from the registry, or from the database for older jobs.
async fn find_job(
    state: &AppState,
    auth: &BearerAuth,
    job_id: Uuid,
) -> Result<Option<JobResponse>, sea_orm::DbErr> {
    let visible = |user: &str| auth.0.is_operator() || user == auth.0.sub;
    let view = state
        .runtime
        .job_context
        .call(|reply| JobContextMessage::GetJob(job_id, reply), None)
        .await;
    if let Ok(CallResult::Success(Some(view))) = view {
        if !visible(&view.job.user_id) {
            return Ok(None);
        }
        return Ok(Some(JobResponse {
            job_id,
            status: view.status,
            media_type: view.job.request.media_type,
            model_name: view.job.request.model_name.clone(),
            prompt: view.job.request.prompt.clone(),
            device: view.device,
            progress: view
                .progress
                .map(|(done, total)| JobProgress { done, total }),
            metrics: view.metrics,
            files: files(job_id, view.files),
        }));
    }

    let Some(job) = generation_jobs::Entity::find_by_id(job_id.to_string())
        .one(&state.db)
        .await?
    else {
        return Ok(None);
    };
    if !visible(&job.user_id) {
        return Ok(None);
    }
    let metrics = generation_metrics::Entity::find()
        .filter(generation_metrics::Column::JobId.eq(job_id.to_string()))
        .one(&state.db)
        .await?
        .map(GenerationItem::from);
    let status = match &metrics {
        Some(row) => JobStatus::parse(&row.status).unwrap_or(JobStatus::Failed),
        // Accepted by an earlier run of the service that stopped before the job ended.
        None => JobStatus::parse(&job.status).unwrap_or(JobStatus::Queued),
    };
    // A job cancelled once its files were written has no files, as while it was registered.
    let mut names = Vec::new();
    if status == JobStatus::Succeeded
        && let Ok(mut entries) =
            tokio::fs::read_dir(state.output_dir.join(job_id.to_string())).await
    {
        while let Ok(Some(entry)) = entries.next_entry().await {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(Some(JobResponse {
        job_id,
        status,
        media_type: if job.media_type == "video" {
            MediaType::Video
        } else {
            MediaType::Image
        },
        model_name: job.model_name,
        prompt: job.prompt,
        device: metrics.as_ref().map(|row| row.device.clone()),
        progress: None,
        metrics,
        files: files(job_id, names),
    }))
}

fn files(job_id: Uuid, names: Vec<String>) -> Vec<JobFile> {
    names
        .into_iter()
        .map(|name| JobFile {
            url: format!("/api/jobs/{job_id}/files/{name}"),
            name,
        })
        .collect()
}
