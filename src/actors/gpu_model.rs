//! GpuModelActor: one per device. It owns a worker thread that holds the device's model and
//! probes, runs one job at a time there, measures it, and writes its files.
//!
//! A generation that fails is an outcome, not a crash. A panic inside the model is a crash:
//! the actor fails, its supervisor records the job as failed and starts a fresh actor (and so
//! a fresh worker thread and model) for the device.

use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;

use crate::actors::job_context::JobContextMessage;
use crate::generation::{Job, MediaType};
use crate::measure::{DeviceMemorySampler, DeviceProbe, JobMeter, Measurement};
use crate::model::{GenerationError, Generator, StepObserver, encode};

/// Everything a worker thread needs to run jobs on one device.
pub struct DeviceRuntime {
    /// The model, bound to the device.
    pub generator: Box<dyn Generator>,
    /// The device as the meter sees it.
    pub probe: Box<dyn DeviceProbe>,
    /// Device-level memory sampling, where the device has a driver to ask.
    pub sampler: Option<DeviceMemorySampler>,
}

/// Builds a device's runtime on its worker thread; called again after a crash.
pub type RuntimeFactory = Arc<dyn Fn(&str) -> anyhow::Result<DeviceRuntime> + Send + Sync>;

/// How a job ended on its device.
#[derive(Debug)]
pub enum WorkOutcome {
    /// The outputs are written and measured.
    Finished {
        /// The device's figures.
        measurement: Measurement,
        /// Images or frames produced.
        outputs: u32,
        /// Files written, relative to the job's output folder.
        files: Vec<String>,
        /// Seconds spent writing the files, after the clock stopped.
        encode_seconds: f64,
    },
    /// The generation ended without outputs.
    Failed {
        /// Why.
        error: GenerationError,
        /// Time from the start of work to the failure.
        elapsed: Duration,
    },
}

/// A job that ran on a device, with when its work started.
#[derive(Debug)]
pub struct WorkReport {
    /// When work on the device started; queue wait ends here.
    pub started: Instant,
    /// How it ended.
    pub outcome: WorkOutcome,
}

/// Messages to a GpuModelActor.
pub enum GpuModelMessage {
    /// Runs a job; the result goes to the JobContextActor as `GenerationEnded`.
    RunGeneration(Job),
}

/// Spawn arguments of a GpuModelActor.
pub struct GpuModelArguments {
    /// Position of the device in the configured list.
    pub index: usize,
    /// The device's name, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Builds the device's runtime.
    pub factory: RuntimeFactory,
    /// Where job files are written, one folder per job.
    pub output_dir: PathBuf,
    /// Where outcomes and progress go.
    pub job_context: ActorRef<JobContextMessage>,
}

/// State of a GpuModelActor: the channel to its worker thread.
pub struct GpuModelState {
    index: usize,
    device: String,
    job_context: ActorRef<JobContextMessage>,
    orders: mpsc::Sender<WorkOrder>,
}

struct WorkOrder {
    job: Job,
    reply: oneshot::Sender<Result<WorkReport, String>>,
}

/// Runs and measures generations on one device.
pub struct GpuModelActor;

impl Actor for GpuModelActor {
    type Msg = GpuModelMessage;
    type State = GpuModelState;
    type Arguments = GpuModelArguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: GpuModelArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (orders, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let worker = Worker {
            index: args.index,
            device: args.device.clone(),
            output_dir: args.output_dir,
            job_context: args.job_context.clone(),
        };
        let factory = args.factory;
        std::thread::Builder::new()
            .name(format!("gpu-worker-{}", args.device))
            .spawn(move || {
                // A device whose driver misbehaves can panic while starting; that is a failed
                // start, not a dead thread.
                match catch_unwind(AssertUnwindSafe(|| factory(&worker.device))) {
                    Ok(Ok(runtime)) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.serve(runtime, inbox);
                    }
                    Ok(Err(error)) => {
                        let _ = ready_tx.send(Err(format!("{error:#}")));
                    }
                    Err(panic) => {
                        let _ = ready_tx.send(Err(panic_message(&panic)));
                    }
                }
            })?;
        ready_rx
            .await
            .map_err(|_| "the worker thread ended while starting")?
            .map_err(|error| format!("device {} did not start: {error}", args.device))?;
        tracing::info!(device = %args.device, "model loaded");
        Ok(GpuModelState {
            index: args.index,
            device: args.device,
            job_context: args.job_context,
            orders,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GpuModelMessage::RunGeneration(job) => self.run_generation(job, state).await,
        }
    }
}

impl GpuModelActor {
    async fn run_generation(
        &self,
        job: Job,
        state: &mut GpuModelState,
    ) -> Result<(), ActorProcessingErr> {
        let job_id = job.id;
        let (reply, result) = oneshot::channel();
        state
            .orders
            .send(WorkOrder { job, reply })
            .map_err(|_| "the worker thread is gone")?;
        match result.await {
            Ok(Ok(report)) => {
                state.job_context.cast(JobContextMessage::GenerationEnded {
                    device_index: state.index,
                    job_id,
                    report,
                })?;
                Ok(())
            }
            // The model panicked: the actor fails so that its supervisor rebuilds the device.
            Ok(Err(panic)) => {
                Err(format!("the model panicked on {}: {panic}", state.device).into())
            }
            Err(_) => Err(format!("the worker thread of {} died", state.device).into()),
        }
    }
}

struct Worker {
    index: usize,
    device: String,
    output_dir: PathBuf,
    job_context: ActorRef<JobContextMessage>,
}

impl Worker {
    fn serve(&self, mut runtime: DeviceRuntime, inbox: mpsc::Receiver<WorkOrder>) {
        for order in inbox {
            let result = self.run(&mut runtime, &order.job);
            let crashed = result.is_err();
            let _ = order.reply.send(result);
            if crashed {
                return;
            }
        }
    }

    fn run(&self, runtime: &mut DeviceRuntime, job: &Job) -> Result<WorkReport, String> {
        let _ = self.job_context.cast(JobContextMessage::JobStarted {
            job_id: job.id,
            device_index: self.index,
        });
        tracing::debug!(job.id = %job.id, device = %self.device, "generation started");

        let DeviceRuntime {
            generator,
            probe,
            sampler,
        } = runtime;
        let mut meter = JobMeter::start(probe.as_mut(), sampler.as_ref());
        let started = meter.started();

        // A cancel accepted while the job was on its way here, or while the device finished
        // earlier work: the model never starts.
        if job.cancel.is_cancelled() {
            return Ok(WorkReport {
                started,
                outcome: cancelled(meter.abandon()),
            });
        }
        let mut observer = JobObserver {
            job,
            meter: &mut meter,
            job_context: &self.job_context,
            progress: ProgressThrottle::default(),
        };
        let generated = catch_unwind(AssertUnwindSafe(|| {
            generator.generate(&job.request, &mut observer)
        }));

        let outcome = match generated {
            Err(panic) => {
                meter.abandon();
                return Err(panic_message(&panic));
            }
            // A cancel accepted after the last step's check still ends the job as cancelled,
            // as the client was told; its outputs are dropped.
            Ok(_) if job.cancel.is_cancelled() => cancelled(meter.abandon()),
            Ok(Err(error)) => WorkOutcome::Failed {
                error,
                elapsed: meter.abandon(),
            },
            Ok(Ok(images)) => match meter.finish() {
                Err(error) => WorkOutcome::Failed {
                    error: GenerationError::from_device_message(error.to_string()),
                    elapsed: started.elapsed(),
                },
                Ok(measurement) => self.write_outputs(job, &images, measurement),
            },
        };
        Ok(WorkReport { started, outcome })
    }

    fn write_outputs(
        &self,
        job: &Job,
        images: &[image::RgbImage],
        measurement: Measurement,
    ) -> WorkOutcome {
        let encoding = Instant::now();
        let folder = job_folder(&self.output_dir, job);
        let written = match job.request.media_type {
            MediaType::Image => encode::write_pngs(&folder, images),
            MediaType::Video => encode::write_gif(&folder, images, job.request.fps),
        };
        match written {
            Ok(files) => WorkOutcome::Finished {
                measurement,
                outputs: images.len() as u32,
                files,
                encode_seconds: encoding.elapsed().as_secs_f64(),
            },
            Err(error) => WorkOutcome::Failed {
                error: GenerationError::Model(format!("writing outputs failed: {error}")),
                elapsed: measurement.duration,
            },
        }
    }
}

/// The folder a job's files are written to.
pub fn job_folder(output_dir: &Path, job: &Job) -> PathBuf {
    output_dir.join(job.id.to_string())
}

/// Progress events are sent at most this often, whatever the step rate.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Decides which steps are announced: the first, then one per `PROGRESS_INTERVAL`, and the
/// last whenever it comes.
#[derive(Debug, Default)]
struct ProgressThrottle {
    last_sent: Option<Instant>,
}

impl ProgressThrottle {
    /// Whether step `done` of `total`, finished at `now`, is announced; remembers it if so.
    fn due(&mut self, now: Instant, done: u32, total: u32) -> bool {
        let due = done == total
            || self
                .last_sent
                .is_none_or(|last| now.duration_since(last) >= PROGRESS_INTERVAL);
        if due {
            self.last_sent = Some(now);
        }
        due
    }
}

struct JobObserver<'a, 'm> {
    job: &'a Job,
    meter: &'a mut JobMeter<'m>,
    job_context: &'a ActorRef<JobContextMessage>,
    progress: ProgressThrottle,
}

impl StepObserver for JobObserver<'_, '_> {
    fn step_finished(&mut self, done: u32, total: u32) -> ControlFlow<()> {
        self.meter.sample();
        if self.progress.due(Instant::now(), done, total) {
            let _ = self.job_context.cast(JobContextMessage::JobProgress {
                job_id: self.job.id,
                done,
                total,
            });
        }
        if self.job.cancel.is_cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

fn cancelled(elapsed: Duration) -> WorkOutcome {
    WorkOutcome::Failed {
        error: GenerationError::Cancelled,
        elapsed,
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_announced_at_most_five_times_a_second_and_always_at_the_last_step() {
        let start = Instant::now();
        let mut throttle = ProgressThrottle::default();
        // A step every 30 ms for 50 steps: 1.47 s.
        let announced: Vec<u32> = (1..=50)
            .filter(|&done| {
                let at = start + Duration::from_millis(30 * u64::from(done - 1));
                throttle.due(at, done, 50)
            })
            .collect();
        // The first step, then the first step at least 200 ms after the last one announced
        // (every seventh step, 210 ms apart), and the last step.
        assert_eq!(announced, [1, 8, 15, 22, 29, 36, 43, 50]);

        // Steps slower than the interval are each announced.
        let mut throttle = ProgressThrottle::default();
        assert!(throttle.due(start, 1, 3));
        assert!(throttle.due(start + PROGRESS_INTERVAL, 2, 3));
        // The last step comes right after, and is still announced.
        assert!(throttle.due(start + PROGRESS_INTERVAL, 3, 3));
    }
}
