//! The runtime: supervised ractor actors that run, measure, record and publish generations.
//!
//! ```text
//! RuntimeSupervisor
//! ├── GpuModelActor × N    one per device: runs and measures, on its own worker thread
//! ├── JobContextActor      job registry and dispatch; joins a measurement with its job
//! ├── TelemetryWriterActor batches rows into generation_metrics
//! └── BroadcastActor       ring of recent events; fan-out on channel `system`
//! ```
//!
//! A job's row is committed before its event is published, and published before the job is
//! reported finished.

pub mod broadcast;
pub mod gpu_model;
pub mod job_context;
pub mod supervisor;
pub mod telemetry_writer;

pub use broadcast::{BroadcastActor, BroadcastMessage, Subscription};
pub use gpu_model::{DeviceRuntime, GpuModelActor, GpuModelMessage, RuntimeFactory};
pub use job_context::{JobContextActor, JobContextMessage, JobView, SubmitError};
pub use supervisor::{Runtime, RuntimeSettings, RuntimeSupervisor};
pub use telemetry_writer::{NewMetric, TelemetryWriterActor, TelemetryWriterMessage};
