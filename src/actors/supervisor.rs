//! RuntimeSupervisor: starts the broadcast, writer, job-context and device actors, and
//! restarts a device actor that crashes, with backoff.
//!
//! A crash of the writer, the broadcast or the job registry is not recovered from: their
//! state is the service's, so the supervisor stops and the service shuts down.

use std::path::PathBuf;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use sea_orm::DatabaseConnection;

use crate::actors::broadcast::{BroadcastActor, BroadcastArguments, BroadcastMessage};
use crate::actors::gpu_model::{GpuModelActor, GpuModelArguments, RuntimeFactory};
use crate::actors::job_context::{JobContextActor, JobContextArguments, JobContextMessage};
use crate::actors::telemetry_writer::{
    TelemetryWriterActor, TelemetryWriterArguments, TelemetryWriterMessage,
};
use crate::metrics::Metrics;

/// What the runtime needs from the service's settings.
pub struct RuntimeSettings {
    /// The database rows go to.
    pub db: DatabaseConnection,
    /// Device names, one actor each.
    pub devices: Vec<String>,
    /// Builds a device's model and probes.
    pub factory: RuntimeFactory,
    /// Where job files are written.
    pub output_dir: PathBuf,
    /// This host's name.
    pub host: String,
    /// Events kept for `recent` and catching up.
    pub recent_capacity: usize,
    /// Events a WebSocket client may fall behind.
    pub client_queue: usize,
    /// The most rows in one commit.
    pub max_batch: usize,
    /// Prometheus metrics of committed rows.
    pub metrics: Metrics,
    /// Jobs accepted but not yet recorded beyond which submissions are refused.
    pub max_pending_jobs: usize,
    /// This service instance.
    pub instance: uuid::Uuid,
}

/// Handles to the running actors.
#[derive(Clone)]
pub struct Runtime {
    /// The supervisor; stopping it stops everything.
    pub supervisor: ActorRef<SupervisorMessage>,
    /// The job registry.
    pub job_context: ActorRef<JobContextMessage>,
    /// The channel `system`.
    pub broadcast: ActorRef<BroadcastMessage>,
    /// The writer.
    pub writer: ActorRef<TelemetryWriterMessage>,
}

/// Messages to the supervisor.
pub enum SupervisorMessage {
    /// Handles to the running actors.
    GetRuntime(RpcReplyPort<Runtime>),
    /// Starts a fresh actor for a device after a crash.
    RestartDevice(usize),
    /// Stops the devices, waits until every ended job's row is committed and its end
    /// announced, then stops the registry, the writer once it has committed what it holds,
    /// and the broadcast once it has published what it holds.
    Shutdown(RpcReplyPort<()>),
}

/// Supervises the runtime's actors.
pub struct RuntimeSupervisor;

/// State of the supervisor.
pub struct SupervisorState {
    devices: Vec<DeviceChild>,
    factory: RuntimeFactory,
    output_dir: PathBuf,
    job_context: ActorRef<JobContextMessage>,
    broadcast: ActorRef<BroadcastMessage>,
    writer: ActorRef<TelemetryWriterMessage>,
    stopping: bool,
}

struct DeviceChild {
    name: String,
    cell: Option<ActorCell>,
    restarts: u32,
    last_crash: Option<std::time::Instant>,
}

/// A device that ran this long without crashing starts its backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(300);

/// The longest wait before restarting a crashed device.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

impl RuntimeSupervisor {
    /// Starts the supervisor and its children; answers once every device is ready.
    pub async fn start(settings: RuntimeSettings) -> anyhow::Result<Runtime> {
        let (supervisor, _) = Actor::spawn(None, RuntimeSupervisor, settings)
            .await
            .map_err(|error| anyhow::anyhow!("the runtime did not start: {error}"))?;
        match supervisor.call(SupervisorMessage::GetRuntime, None).await {
            Ok(CallResult::Success(runtime)) => Ok(runtime),
            _ => anyhow::bail!("the runtime supervisor stopped while starting"),
        }
    }
}

impl Actor for RuntimeSupervisor {
    type Msg = SupervisorMessage;
    type State = SupervisorState;
    type Arguments = RuntimeSettings;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        settings: RuntimeSettings,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cell = myself.get_cell();
        let (broadcast, _) = Actor::spawn_linked(
            Some(named(&myself, "broadcast")),
            BroadcastActor,
            BroadcastArguments {
                db: settings.db.clone(),
                recent_capacity: settings.recent_capacity,
                client_queue: settings.client_queue,
                metrics: settings.metrics,
            },
            cell.clone(),
        )
        .await?;
        let (writer, _) = Actor::spawn_linked(
            Some(named(&myself, "telemetry-writer")),
            TelemetryWriterActor,
            TelemetryWriterArguments {
                db: settings.db.clone(),
                broadcast: broadcast.clone(),
                max_batch: settings.max_batch,
                instance: settings.instance,
            },
            cell.clone(),
        )
        .await?;
        let (job_context, _) = Actor::spawn_linked(
            Some(named(&myself, "job-context")),
            JobContextActor,
            JobContextArguments {
                db: settings.db,
                writer: writer.clone(),
                broadcast: broadcast.clone(),
                devices: settings.devices.clone(),
                host: settings.host,
                max_pending_jobs: settings.max_pending_jobs,
            },
            cell,
        )
        .await?;

        let mut state = SupervisorState {
            devices: settings
                .devices
                .into_iter()
                .map(|name| DeviceChild {
                    name,
                    cell: None,
                    restarts: 0,
                    last_crash: None,
                })
                .collect(),
            factory: settings.factory,
            output_dir: settings.output_dir,
            job_context,
            broadcast,
            writer,
            stopping: false,
        };
        for index in 0..state.devices.len() {
            start_device(&myself, &mut state, index).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMessage::GetRuntime(reply) => {
                let _ = reply.send(Runtime {
                    supervisor: myself,
                    job_context: state.job_context.clone(),
                    broadcast: state.broadcast.clone(),
                    writer: state.writer.clone(),
                });
            }
            SupervisorMessage::Shutdown(reply) => {
                state.stopping = true;
                shutdown(state).await;
                let _ = reply.send(());
                myself.stop(None);
            }
            SupervisorMessage::RestartDevice(index) if !state.stopping => {
                if let Err(error) = start_device(&myself, state, index).await {
                    let device = &state.devices[index];
                    tracing::warn!(device = %device.name, error = %error, "device restart failed");
                    schedule_restart(&myself, state, index);
                }
            }
            SupervisorMessage::RestartDevice(_) => {}
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_owned()))
            }
            _ => return Ok(()),
        };
        if state.stopping {
            return Ok(());
        }
        let device = state.devices.iter().position(|child| {
            child
                .cell
                .as_ref()
                .is_some_and(|c| c.get_id() == cell.get_id())
        });
        let Some(index) = device else {
            // The writer, the broadcast or the registry is gone: the service cannot go on.
            tracing::error!(actor = ?cell.get_name(), reason = %reason, "a runtime actor stopped");
            myself.stop(Some(format!("{:?} stopped: {reason}", cell.get_name())));
            return Ok(());
        };
        state.devices[index].cell = None;
        tracing::warn!(device = %state.devices[index].name, reason = %reason, "device actor crashed");
        let _ = state.job_context.cast(JobContextMessage::DeviceCrashed {
            device_index: index,
            reason,
        });
        schedule_restart(&myself, state, index);
        Ok(())
    }
}

async fn shutdown(state: &mut SupervisorState) {
    let timeout = Some(Duration::from_secs(30));
    let _ = state
        .job_context
        .call(JobContextMessage::StopAccepting, timeout)
        .await;
    // A device stops once its running job is done; its outcome is then in the registry's
    // mailbox, which draining processes. Every device is waited for at once, so the stop
    // takes one wait however many devices the host has. A job still running after the wait
    // is recorded as failed, and its device is left to stop at its next step.
    let stops = state
        .devices
        .iter_mut()
        .filter_map(|child| child.cell.take())
        .map(|cell| async move { cell.stop_and_wait(None, timeout).await.is_ok() });
    let waited = futures_util::future::join_all(stops).await;
    if waited.contains(&false) {
        tracing::warn!("a running job outlived the shutdown's wait; recording it as failed");
        let _ = state
            .job_context
            .call(JobContextMessage::StopRunning, timeout)
            .await;
    }
    // Every job has now ended or been recorded as failed. A commit's acknowledgement reaches
    // the registry after the writer has published the row, and only then does the registry
    // announce the job's end: both must be out before the channel closes.
    let recorded = state
        .job_context
        .call(JobContextMessage::AwaitRecorded, timeout)
        .await;
    if !matches!(recorded, Ok(CallResult::Success(()))) {
        tracing::error!(
            "rows still uncommitted after the shutdown's wait; their jobs' ends go unannounced"
        );
    }
    let _ = state.job_context.drain_and_wait(timeout).await;
    // Draining processes every row already sent before stopping, and the writer commits
    // what it still holds when it stops.
    let _ = state.writer.drain_and_wait(timeout).await;
    // Drained, not stopped: a stop would drop the events still in its mailbox. Its fan-out
    // channel closes with it, which closes every client once it has the last event.
    let _ = state.broadcast.drain_and_wait(timeout).await;
}

async fn start_device(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut SupervisorState,
    index: usize,
) -> Result<(), ActorProcessingErr> {
    let name = state.devices[index].name.clone();
    let (actor, _) = Actor::spawn_linked(
        Some(named(myself, &format!("gpu-model-{name}-{index}"))),
        GpuModelActor,
        GpuModelArguments {
            index,
            device: name.clone(),
            factory: state.factory.clone(),
            output_dir: state.output_dir.clone(),
            job_context: state.job_context.clone(),
        },
        myself.get_cell(),
    )
    .await?;
    state.devices[index].cell = Some(actor.get_cell());
    state.job_context.cast(JobContextMessage::DeviceReady {
        device_index: index,
        actor,
    })?;
    Ok(())
}

fn schedule_restart(
    myself: &ActorRef<SupervisorMessage>,
    state: &mut SupervisorState,
    index: usize,
) {
    let child = &mut state.devices[index];
    if child
        .last_crash
        .is_some_and(|at| at.elapsed() > STABLE_AFTER)
    {
        child.restarts = 0;
    }
    child.last_crash = Some(std::time::Instant::now());
    child.restarts += 1;
    let backoff = Duration::from_millis(100u64 << child.restarts.min(9)).min(MAX_RESTART_BACKOFF);
    tracing::warn!(device = %child.name, restarts = child.restarts, backoff_ms = backoff.as_millis() as u64, "restarting device actor");
    myself.send_after(backoff, move || SupervisorMessage::RestartDevice(index));
}

/// Actor names are global to the process; several services (as in tests) must not clash.
fn named(supervisor: &ActorRef<SupervisorMessage>, role: &str) -> String {
    format!("{role}@{}", supervisor.get_id())
}
