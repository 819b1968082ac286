//! JobContextActor: the job registry. It stores accepted jobs, hands each to an idle device,
//! joins the device's measurement with the job's context into a row for the writer, and
//! reports a job finished only once its row is committed.
//!
//! The queue lives here, not in the devices' mailboxes, so a device that crashes loses at
//! most the job it was running, and that job is recorded as failed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::NotSet, ActiveValue::Set, ColumnTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter,
};
use serde_json::json;
use thiserror::Error;
use uuid::Uuid;

use crate::actors::broadcast::BroadcastMessage;
use crate::actors::gpu_model::{GpuModelMessage, WorkOutcome, WorkReport};
use crate::actors::telemetry_writer::{NewMetric, TelemetryWriterMessage};
use crate::events::{EventType, GenerationItem, JobEvent};
use crate::generation::{CancelFlag, GenerationRequest, Job, JobStatus, MediaType};
use crate::model::GenerationError;
use crate::storage::entities::{generation_jobs, personas, users};

/// Finished jobs kept in memory for status reads; older ones are read from the database.
const FINISHED_JOBS_KEPT: usize = 10_000;

/// A job as a client sees it.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The job.
    pub job: Job,
    /// Where it stands.
    pub status: JobStatus,
    /// The device running or that ran it.
    pub device: Option<String>,
    /// Steps done and total, while it runs.
    pub progress: Option<(u32, u32)>,
    /// Its committed row, once finished.
    pub metrics: Option<GenerationItem>,
    /// Its files, relative to its output folder.
    pub files: Vec<String>,
}

/// Why a job was not accepted.
#[derive(Debug, Error)]
pub enum SubmitError {
    /// The database refused to store it.
    #[error("the job could not be stored: {0}")]
    Storage(#[from] DbErr),
    /// Too many jobs are waiting to be run or recorded.
    #[error("{0} jobs are waiting to be run or recorded; retry later")]
    Full(usize),
    /// The service is shutting down.
    #[error("the service is shutting down")]
    Stopping,
}

/// Why a job could not be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It will stop and leave a cancelled row.
    Cancelling,
    /// It had already ended.
    AlreadyFinished(JobStatus),
    /// No such job is known.
    NotFound,
}

/// Messages to the JobContextActor.
pub enum JobContextMessage {
    /// Stores and queues a job.
    SubmitJob(Job, RpcReplyPort<Result<(), SubmitError>>),
    /// A submitted job's storage ended; it is queued if it was stored.
    JobStored {
        /// The job.
        job: Job,
        /// Whether it was stored.
        stored: Result<(), DbErr>,
        /// The submitter's reply port.
        reply: RpcReplyPort<Result<(), SubmitError>>,
    },
    /// A job's view, if it is known in memory.
    GetJob(Uuid, RpcReplyPort<Option<JobView>>),
    /// Cancels a queued or running job.
    CancelJob(Uuid, RpcReplyPort<CancelOutcome>),
    /// A device is ready (at start or after a restart).
    DeviceReady {
        /// Position of the device.
        device_index: usize,
        /// Its actor.
        actor: ActorRef<GpuModelMessage>,
    },
    /// A device's actor crashed; the job it held has failed.
    DeviceCrashed {
        /// Position of the device.
        device_index: usize,
        /// What happened.
        reason: String,
    },
    /// Work on a job began on its device.
    JobStarted {
        /// The job.
        job_id: Uuid,
        /// Its device.
        device_index: usize,
    },
    /// Steps done on a running job.
    JobProgress {
        /// The job.
        job_id: Uuid,
        /// Steps done.
        done: u32,
        /// Steps in all.
        total: u32,
    },
    /// A device finished a job, with or without outputs.
    GenerationEnded {
        /// Its device.
        device_index: usize,
        /// The job.
        job_id: Uuid,
        /// What the device measured.
        report: WorkReport,
    },
    /// The writer committed a job's row.
    RowCommitted(Uuid, GenerationItem),
    /// The writer stopped without committing a job's row.
    RowLost(Uuid),
    /// Refuses new jobs and records the queued ones as failed, before a shutdown.
    StopAccepting(RpcReplyPort<()>),
    /// Records the running jobs as failed and asks their devices to stop them, when a
    /// shutdown has waited long enough for them.
    StopRunning(RpcReplyPort<()>),
    /// Answers once no submission is being stored and every row sent to the writer has come
    /// back committed, with its job's end published: a shutdown waits for it before closing
    /// the channel's clients.
    AwaitRecorded(RpcReplyPort<()>),
}

/// Spawn arguments of the JobContextActor.
pub struct JobContextArguments {
    /// Jobs are stored here at submission.
    pub db: DatabaseConnection,
    /// Rows go here.
    pub writer: ActorRef<TelemetryWriterMessage>,
    /// Lifecycle events go here.
    pub broadcast: ActorRef<BroadcastMessage>,
    /// Device names, in order.
    pub devices: Vec<String>,
    /// This host's name, stored on every row.
    pub host: String,
    /// Jobs accepted but not yet recorded beyond which submissions are refused.
    pub max_pending_jobs: usize,
}

struct DeviceSlot {
    name: String,
    actor: Option<ActorRef<GpuModelMessage>>,
    running: Option<Uuid>,
}

struct Entry {
    view: JobView,
    started: Option<Instant>,
    /// The status of its row once the row is on its way to the writer: a cancel is then too
    /// late, although the status in `view` stays unfinished until the commit.
    ending: Option<JobStatus>,
}

/// State of the JobContextActor.
pub struct JobContextState {
    db: DatabaseConnection,
    writer: ActorRef<TelemetryWriterMessage>,
    broadcast: ActorRef<BroadcastMessage>,
    host: String,
    devices: Vec<DeviceSlot>,
    queue: VecDeque<Uuid>,
    jobs: HashMap<Uuid, Entry>,
    finished: VecDeque<Uuid>,
    max_pending_jobs: usize,
    /// Submitted jobs whose storage has not ended yet.
    storing: usize,
    /// Rows sent to the writer whose commit has not come back yet.
    recording: usize,
    /// Waiting for `storing` and `recording` to fall to zero.
    recorded_waiters: Vec<RpcReplyPort<()>>,
    accepting: bool,
}

/// Keeps the registry of jobs and dispatches them.
pub struct JobContextActor;

impl Actor for JobContextActor {
    type Msg = JobContextMessage;
    type State = JobContextState;
    type Arguments = JobContextArguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: JobContextArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = JobContextState {
            db: args.db,
            writer: args.writer,
            broadcast: args.broadcast,
            host: args.host,
            devices: args
                .devices
                .into_iter()
                .map(|name| DeviceSlot {
                    name,
                    actor: None,
                    running: None,
                })
                .collect(),
            queue: VecDeque::new(),
            jobs: HashMap::new(),
            finished: VecDeque::new(),
            max_pending_jobs: args.max_pending_jobs,
            storing: 0,
            recording: 0,
            recorded_waiters: Vec::new(),
            accepting: true,
        };
        state.recover_interrupted(&myself).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            JobContextMessage::SubmitJob(job, reply) => state.submit(&myself, job, reply),
            JobContextMessage::JobStored { job, stored, reply } => {
                state.storing -= 1;
                if stored.is_ok() {
                    state.announce(EventType::JobQueued, &job, |_| {});
                    state.accept(job);
                    if state.accepting {
                        state.dispatch();
                    } else {
                        // Stopped while it was being stored: it gets its row like any queued job.
                        state.stop_accepting(&myself);
                    }
                }
                let _ = reply.send(stored.map_err(SubmitError::from));
            }
            JobContextMessage::GetJob(job_id, reply) => {
                let _ = reply.send(state.jobs.get(&job_id).map(|entry| entry.view.clone()));
            }
            JobContextMessage::CancelJob(job_id, reply) => {
                let _ = reply.send(state.cancel(&myself, job_id));
            }
            JobContextMessage::DeviceReady {
                device_index,
                actor,
            } => {
                state.devices[device_index].actor = Some(actor);
                state.dispatch();
            }
            JobContextMessage::DeviceCrashed {
                device_index,
                reason,
            } => {
                state.device_crashed(&myself, device_index, reason);
            }
            JobContextMessage::JobStarted {
                job_id,
                device_index,
            } => {
                let device = state.devices[device_index].name.clone();
                if let Some(entry) = state.jobs.get_mut(&job_id) {
                    entry.view.status = JobStatus::Running;
                    entry.view.device = Some(device.clone());
                    entry.started = Some(Instant::now());
                    let job = entry.view.job.clone();
                    state.announce(EventType::JobStarted, &job, |event| {
                        event.device = Some(device)
                    });
                }
            }
            JobContextMessage::JobProgress {
                job_id,
                done,
                total,
            } => {
                if let Some(entry) = state.jobs.get_mut(&job_id) {
                    entry.view.progress = Some((done, total));
                    let job = entry.view.job.clone();
                    let device = entry.view.device.clone();
                    state.announce(EventType::JobProgress, &job, |event| {
                        event.device = device;
                        event.step = Some(done);
                        event.steps = Some(total);
                        if event.frames.is_some() {
                            event.frames_done =
                                Some(if done == total { job.request.frames } else { 0 });
                        }
                    });
                }
            }
            JobContextMessage::GenerationEnded {
                device_index,
                job_id,
                report,
            } => {
                // A job recorded already (its shutdown stopped waiting) leaves no second row.
                if state.devices[device_index].running.take() == Some(job_id) {
                    state.generation_ended(&myself, device_index, job_id, report);
                }
                state.dispatch();
            }
            JobContextMessage::RowCommitted(job_id, item) => {
                state.recording = state.recording.saturating_sub(1);
                state.row_committed(job_id, item);
            }
            JobContextMessage::RowLost(_) => {
                state.recording = state.recording.saturating_sub(1);
            }
            JobContextMessage::StopAccepting(reply) => {
                state.stop_accepting(&myself);
                let _ = reply.send(());
            }
            JobContextMessage::StopRunning(reply) => {
                state.stop_running(&myself);
                let _ = reply.send(());
            }
            JobContextMessage::AwaitRecorded(reply) => state.recorded_waiters.push(reply),
        }
        state.answer_if_recorded();
        Ok(())
    }
}

impl JobContextState {
    /// Records as failed the jobs this host accepted in an earlier run that never ended (the
    /// service was killed or crashed): every accepted job leaves a row. They are not run again.
    async fn recover_interrupted(
        &mut self,
        myself: &ActorRef<JobContextMessage>,
    ) -> Result<(), DbErr> {
        let interrupted = generation_jobs::Entity::find()
            .filter(generation_jobs::Column::Host.eq(self.host.clone()))
            .filter(
                generation_jobs::Column::Status
                    .is_in([JobStatus::Queued.as_str(), JobStatus::Running.as_str()]),
            )
            .all(&self.db)
            .await?;
        for stored in interrupted {
            let (Ok(id), Ok(request)) = (
                Uuid::parse_str(&stored.id),
                serde_json::from_value::<GenerationRequest>(stored.parameters.clone()),
            ) else {
                tracing::warn!(job.id = %stored.id, "an interrupted job cannot be read; left as it is");
                continue;
            };
            // Its submission on this run's clock, so that `total_seconds` is the time from
            // submission to this row.
            let age = (chrono::Utc::now() - stored.submitted_at)
                .to_std()
                .unwrap_or_default();
            let submitted = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let job = Job {
                id,
                user_id: stored.user_id,
                persona_id: stored.persona_id,
                request,
                submitted,
                submitted_at: stored.submitted_at,
                cancel: CancelFlag::default(),
            };
            tracing::warn!(job.id = %id, "recording a job interrupted by an earlier stop as failed");
            // FIXME: when a job starts, neither the time nor the device is stored, so a job the
            // service was killed during is recorded on device `none` with 0 s of queue wait
            // and of inference, and `extra.timings` says they are unknown; storing both with
            // the job's start would give its real queue wait and device.
            let ended = Ended::Failed {
                kind: "interrupted",
                message: "the service stopped (killed or crashed) before the job ended; it was not run again".to_owned(),
                elapsed: Duration::ZERO,
            };
            let extra = json!({
                "timings": "unknown: the service stopped without recording when the job started or ended"
            });
            let row = self.row(&job, None, extra, ended, submitted);
            self.accept_without_queueing(job);
            self.append(myself, id, row);
        }
        Ok(())
    }

    /// Checks that a job can be taken, then stores it away from the actor: a slow or lost
    /// database must not hold up reads of the registry, progress or dispatch.
    fn submit(
        &mut self,
        myself: &ActorRef<JobContextMessage>,
        job: Job,
        reply: RpcReplyPort<Result<(), SubmitError>>,
    ) {
        let pending = self.jobs.len() - self.finished.len() + self.storing;
        if !self.accepting {
            let _ = reply.send(Err(SubmitError::Stopping));
            return;
        }
        if pending >= self.max_pending_jobs {
            let _ = reply.send(Err(SubmitError::Full(pending)));
            return;
        }
        self.storing += 1;
        let (db, host, myself) = (self.db.clone(), self.host.clone(), myself.clone());
        tokio::spawn(async move {
            let stored = store(&db, &host, &job).await;
            let _ = myself.cast(JobContextMessage::JobStored { job, stored, reply });
        });
    }

    fn accept(&mut self, job: Job) {
        tracing::debug!(job.id = %job.id, media_type = job.request.media_type.as_str(), "job queued");
        self.queue.push_back(job.id);
        self.accept_without_queueing(job);
    }

    /// Registers a job so that it can be read; it runs only if it is also queued.
    fn accept_without_queueing(&mut self, job: Job) {
        self.jobs.insert(
            job.id,
            Entry {
                view: JobView {
                    job,
                    status: JobStatus::Queued,
                    device: None,
                    progress: None,
                    metrics: None,
                    files: Vec::new(),
                },
                started: None,
                ending: None,
            },
        );
    }

    /// Hands queued jobs to idle devices, in submission order.
    fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some(slot) = self
                .devices
                .iter_mut()
                .find(|slot| slot.actor.is_some() && slot.running.is_none())
            else {
                return;
            };
            let Some(job_id) = self.queue.pop_front() else {
                return;
            };
            let Some(entry) = self.jobs.get(&job_id) else {
                continue;
            };
            let actor = slot.actor.as_ref().expect("checked above");
            if actor
                .cast(GpuModelMessage::RunGeneration(entry.view.job.clone()))
                .is_ok()
            {
                slot.running = Some(job_id);
            } else {
                // The actor is stopping; its supervisor will announce a fresh one.
                slot.actor = None;
                self.queue.push_front(job_id);
            }
        }
    }

    fn cancel(&mut self, myself: &ActorRef<JobContextMessage>, job_id: Uuid) -> CancelOutcome {
        let Some(entry) = self.jobs.get(&job_id) else {
            return CancelOutcome::NotFound;
        };
        if let Some(status) = entry.ending {
            return CancelOutcome::AlreadyFinished(status);
        }
        match entry.view.status {
            status if status.is_final() => CancelOutcome::AlreadyFinished(status),
            JobStatus::Queued if self.queue.contains(&job_id) => {
                self.queue.retain(|queued| *queued != job_id);
                let job = entry.view.job.clone();
                let row = self.row(
                    &job,
                    None,
                    json!({}),
                    Ended::Cancelled {
                        elapsed: Duration::ZERO,
                    },
                    Instant::now(),
                );
                self.append(myself, job_id, row);
                CancelOutcome::Cancelling
            }
            _ => {
                entry.view.job.cancel.cancel();
                CancelOutcome::Cancelling
            }
        }
    }

    fn device_crashed(
        &mut self,
        myself: &ActorRef<JobContextMessage>,
        device_index: usize,
        reason: String,
    ) {
        let slot = &mut self.devices[device_index];
        slot.actor = None;
        let Some(job_id) = slot.running.take() else {
            return;
        };
        let device = slot.name.clone();
        let Some(entry) = self.jobs.get(&job_id) else {
            return;
        };
        let started = entry.started.unwrap_or(entry.view.job.submitted);
        let job = entry.view.job.clone();
        // An out-of-memory inside the backend arrives as a panic; it is recorded as what it
        // is, while the device is rebuilt like after any other crash.
        let kind = match GenerationError::from_device_message(reason.clone()) {
            GenerationError::OutOfMemory(_) => "out_of_memory",
            _ => "worker_crashed",
        };
        let ended = if job.cancel.is_cancelled() {
            // The client was told the job is cancelled; the crash stays in the supervisor's log.
            Ended::Cancelled {
                elapsed: started.elapsed(),
            }
        } else {
            Ended::Failed {
                kind,
                message: reason,
                elapsed: started.elapsed(),
            }
        };
        let row = self.row(&job, Some(device), json!({}), ended, started);
        self.append(myself, job_id, row);
    }

    fn generation_ended(
        &mut self,
        myself: &ActorRef<JobContextMessage>,
        device_index: usize,
        job_id: Uuid,
        report: WorkReport,
    ) {
        let Some(entry) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let job = entry.view.job.clone();
        let device = self.devices[device_index].name.clone();
        let (extra, ended) = match report.outcome {
            // Cancelled after the device's last look at the flag: the client was answered 202,
            // so the row says cancelled whatever the device made of the job.
            WorkOutcome::Finished { measurement, .. } if job.cancel.is_cancelled() => (
                json!({}),
                Ended::Cancelled {
                    elapsed: measurement.duration,
                },
            ),
            WorkOutcome::Failed { elapsed, .. } if job.cancel.is_cancelled() => {
                (json!({}), Ended::Cancelled { elapsed })
            }
            WorkOutcome::Finished {
                measurement,
                outputs,
                files,
                encode_seconds,
            } => {
                entry.view.files = files;
                let mut extra = json!({ "encode_seconds": encode_seconds });
                if let Some(usage) = &measurement.device_usage {
                    extra["device_memory"] = serde_json::to_value(usage).unwrap_or_default();
                }
                let vram = measurement.vram;
                extra["vram_source"] = json!(if vram.is_some() { "allocator" } else { "none" });
                (
                    extra,
                    Ended::Succeeded {
                        duration: measurement.duration,
                        outputs,
                        vram,
                    },
                )
            }
            WorkOutcome::Failed {
                error: GenerationError::Cancelled,
                elapsed,
            } => (json!({}), Ended::Cancelled { elapsed }),
            WorkOutcome::Failed { error, elapsed } => (
                json!({}),
                Ended::Failed {
                    kind: error.kind(),
                    message: error.to_string(),
                    elapsed,
                },
            ),
        };
        let row = self.row(&job, Some(device), extra, ended, report.started);
        self.append(myself, job_id, row);
    }

    /// Joins a job's context with how it ended into a row.
    fn row(
        &self,
        job: &Job,
        device: Option<String>,
        mut extra: serde_json::Value,
        ended: Ended,
        started: Instant,
    ) -> NewMetric {
        let request = &job.request;
        extra["width"] = json!(request.width);
        extra["height"] = json!(request.height);
        extra["steps"] = json!(request.steps);
        extra["seed"] = json!(request.seed);
        extra["scheduler"] = json!(request.scheduler);
        extra["loras"] = json!(request.loras);
        if request.media_type == MediaType::Video {
            extra["frames"] = json!(request.frames);
            extra["fps"] = json!(request.fps);
        } else {
            extra["images"] = json!(request.images);
        }
        extra["submitted_at"] = json!(job.submitted_at);

        let (status, duration, outputs, vram) = match ended {
            Ended::Succeeded {
                duration,
                outputs,
                vram,
            } => (JobStatus::Succeeded, duration, outputs, vram),
            Ended::Failed {
                kind,
                message,
                elapsed,
            } => {
                extra["error"] = json!({ "kind": kind, "message": message });
                (JobStatus::Failed, elapsed, 0, None)
            }
            Ended::Cancelled { elapsed } => (JobStatus::Cancelled, elapsed, 0, None),
        };
        let duration_seconds = duration.as_secs_f64();
        NewMetric {
            job_id: job.id.to_string(),
            user_id: job.user_id.clone(),
            persona_id: job.persona_id.clone(),
            media_type: request.media_type.as_str().to_owned(),
            model_name: request.model_name.clone(),
            prompt: request.prompt.clone(),
            outputs: outputs as i32,
            duration_seconds,
            throughput: (outputs > 0 && duration_seconds > 0.0)
                .then(|| f64::from(outputs) / duration_seconds),
            vram_allocated_mb: vram.map(|v| v.allocated_mib),
            vram_reserved_mb: vram.map(|v| v.reserved_mib),
            vram_peak_mb: vram.map(|v| v.peak_mib),
            vram_delta_mb: vram.map(|v| v.delta_mib),
            extra,
            status,
            device: device.unwrap_or_else(|| "none".to_owned()),
            queue_wait_seconds: started
                .saturating_duration_since(job.submitted)
                .as_secs_f64(),
            host: self.host.clone(),
        }
    }

    /// Sends a row to the writer; its commit comes back as `RowCommitted`. The row is in the
    /// writer's mailbox when this returns, so a draining writer commits it.
    fn append(&mut self, myself: &ActorRef<JobContextMessage>, job_id: Uuid, row: NewMetric) {
        let Some(entry) = self.jobs.get_mut(&job_id) else {
            tracing::error!(job.id = %job_id, "row lost: the job is not in the registry");
            return;
        };
        entry.ending = Some(row.status);
        let submitted = entry.view.job.submitted;
        let (reply, committed) = ractor::concurrency::oneshot();
        if self
            .writer
            .cast(TelemetryWriterMessage::AppendJob {
                row: Box::new(row),
                submitted,
                reply: reply.into(),
            })
            .is_err()
        {
            tracing::error!(job.id = %job_id, "row lost: the writer is not running");
            return;
        }
        self.recording += 1;
        let myself = myself.clone();
        tokio::spawn(async move {
            let message = match committed.await {
                Ok(item) => JobContextMessage::RowCommitted(job_id, item),
                Err(_) => {
                    tracing::error!(job.id = %job_id, "the writer stopped before committing the job's row");
                    JobContextMessage::RowLost(job_id)
                }
            };
            let _ = myself.cast(message);
        });
    }

    /// Answers those waiting for every row to be recorded, once none is on its way.
    fn answer_if_recorded(&mut self) {
        if self.storing == 0 && self.recording == 0 {
            for reply in self.recorded_waiters.drain(..) {
                let _ = reply.send(());
            }
        }
    }

    /// Refuses new jobs from now on, and records every queued job as failed: it was accepted,
    /// so it must leave a row.
    fn stop_accepting(&mut self, myself: &ActorRef<JobContextMessage>) {
        self.accepting = false;
        let queued: Vec<Uuid> = self.queue.drain(..).collect();
        for job_id in queued {
            let Some(entry) = self.jobs.get(&job_id) else {
                continue;
            };
            let job = entry.view.job.clone();
            let ended = Ended::Failed {
                kind: "service_stopped",
                message: "the service stopped before the job ran".to_owned(),
                elapsed: Duration::ZERO,
            };
            let row = self.row(&job, None, json!({}), ended, Instant::now());
            self.append(myself, job_id, row);
        }
    }

    /// Records every running job as failed and cancels its work: the service stops without
    /// waiting for it any longer, and an accepted job must leave a row.
    fn stop_running(&mut self, myself: &ActorRef<JobContextMessage>) {
        for index in 0..self.devices.len() {
            let Some(job_id) = self.devices[index].running.take() else {
                continue;
            };
            let Some(entry) = self.jobs.get(&job_id) else {
                continue;
            };
            entry.view.job.cancel.cancel();
            let started = entry.started.unwrap_or(entry.view.job.submitted);
            let job = entry.view.job.clone();
            let ended = Ended::Failed {
                kind: "service_stopped",
                message: "the service stopped while the job ran".to_owned(),
                elapsed: started.elapsed(),
            };
            let device = self.devices[index].name.clone();
            let row = self.row(&job, Some(device), json!({}), ended, started);
            self.append(myself, job_id, row);
        }
    }

    /// Publishes a lifecycle event of `job`, filled in by `fill`.
    fn announce(&self, event_type: EventType, job: &Job, fill: impl FnOnce(&mut JobEvent)) {
        let request = &job.request;
        let mut event = JobEvent {
            job_id: job.id.to_string(),
            user_id: job.user_id.clone(),
            media_type: request.media_type.as_str().to_owned(),
            model_name: request.model_name.clone(),
            device: None,
            step: None,
            steps: None,
            frames_done: None,
            frames: (request.media_type == MediaType::Video).then_some(request.frames),
            metric_id: None,
            error: None,
        };
        fill(&mut event);
        let _ = self
            .broadcast
            .cast(BroadcastMessage::PublishJob(event_type, Box::new(event)));
    }

    fn row_committed(&mut self, job_id: Uuid, item: GenerationItem) {
        let Some(entry) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let status = JobStatus::parse(&item.status).unwrap_or(JobStatus::Failed);
        entry.view.status = status;
        let event_type = match status {
            JobStatus::Succeeded => EventType::JobFinished,
            JobStatus::Cancelled => EventType::JobCancelled,
            _ => EventType::JobFailed,
        };
        let job = entry.view.job.clone();
        let (metric_id, device) = (item.id, item.device.clone());
        let error = item.extra["error"]["message"].as_str().map(str::to_owned);
        tracing::debug!(
            job.id = %job_id,
            status = %item.status,
            duration_seconds = item.duration_seconds,
            device = %item.device,
            "job finished"
        );
        entry.view.metrics = Some(item);
        entry.view.progress = None;
        self.announce(event_type, &job, |event| {
            event.device = Some(device);
            event.metric_id = Some(metric_id);
            event.error = error;
        });
        self.finished.push_back(job_id);
        while self.finished.len() > FINISHED_JOBS_KEPT {
            if let Some(old) = self.finished.pop_front() {
                self.jobs.remove(&old);
            }
        }
    }
}

enum Ended {
    Succeeded {
        duration: Duration,
        outputs: u32,
        vram: Option<crate::measure::VramFigures>,
    },
    Failed {
        kind: &'static str,
        message: String,
        elapsed: Duration,
    },
    Cancelled {
        elapsed: Duration,
    },
}

/// Stores the job as queued, registering its user and persona on first sight.
async fn store(db: &DatabaseConnection, host: &str, job: &Job) -> Result<(), DbErr> {
    users::Entity::insert(users::ActiveModel {
        id: Set(job.user_id.clone()),
        created_at: NotSet,
    })
    .on_conflict(
        OnConflict::column(users::Column::Id)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    if let Some(persona) = &job.persona_id {
        personas::Entity::insert(personas::ActiveModel {
            id: Set(persona.clone()),
            user_id: Set(job.user_id.clone()),
            created_at: NotSet,
        })
        .on_conflict(
            OnConflict::column(personas::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    }
    generation_jobs::Entity::insert(generation_jobs::ActiveModel {
        id: Set(job.id.to_string()),
        user_id: Set(job.user_id.clone()),
        persona_id: Set(job.persona_id.clone()),
        media_type: Set(job.request.media_type.as_str().to_owned()),
        model_name: Set(job.request.model_name.clone()),
        prompt: Set(job.request.prompt.clone()),
        parameters: Set(serde_json::to_value(&job.request).unwrap_or_default()),
        status: Set(JobStatus::Queued.as_str().to_owned()),
        host: Set(host.to_owned()),
        submitted_at: NotSet,
        finished_at: NotSet,
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}
