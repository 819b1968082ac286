//! The HTTP and WebSocket interface, with poem-openapi: job submission and status, the
//! telemetry endpoint, the channel `system`, and the OpenAPI document they are described by.

pub mod allow;
pub mod auth;
pub mod errors;
pub mod jobs;
pub mod memo;
pub mod metrics;
pub mod telemetry;
pub mod websocket;

use std::path::PathBuf;

use poem_openapi::{OpenApiService, Tags};
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use crate::actors::Runtime;

pub use auth::{AuthKeys, Claims, Role};

/// What every handler can reach, shared through poem's `Data`.
#[derive(Clone)]
pub struct AppState {
    /// The actors.
    pub runtime: Runtime,
    /// The database.
    pub db: DatabaseConnection,
    /// Token signing and checking.
    pub keys: AuthKeys,
    /// Where job files are.
    pub output_dir: PathBuf,
    /// Becomes `true` when the service shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// The most memory a job's attention may need, MiB; larger jobs are refused.
    pub max_job_memory_mib: u64,
    /// Telemetry endpoint answers kept while they stay exact.
    pub answers: std::sync::Arc<memo::Answers<telemetry::TelemetryResponse>>,
}

/// Groups of operations in the document.
#[derive(Tags)]
pub enum ApiTags {
    /// Generation jobs.
    Jobs,
    /// Operator telemetry.
    System,
}

/// The API's title in the OpenAPI document.
pub const TITLE: &str = "SEIDRA generation telemetry";

/// The document's routes, as one poem-openapi service.
pub fn openapi_service(
    server_url: &str,
) -> OpenApiService<(jobs::JobsApi, telemetry::TelemetryApi), ()> {
    OpenApiService::new(
        (jobs::JobsApi, telemetry::TelemetryApi),
        TITLE,
        env!("CARGO_PKG_VERSION"),
    )
    .server(server_url)
}

/// The OpenAPI document as committed under `openapi/`.
pub fn openapi_json() -> String {
    openapi_service("/").spec()
}
