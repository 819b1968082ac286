//! The service's settings: one typed tree, read once at start-up from defaults, an optional
//! TOML file, `SEIDRA_*` environment variables, and command-line flags, in rising order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use config::{Config, Environment, File};
use secrecy::SecretString;
use serde::Deserialize;

use crate::api::websocket::ChannelSettings;
use crate::logging::LogFormat;

/// The longest heartbeat: a ping and its answer must pass well within the minute after which
/// a quiet connection is closed.
const MAX_HEARTBEAT_SECONDS: u64 = 30;

/// Everything the service reads at start-up.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Where the database file, the JWT secret and job outputs live.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; the embedded SQLite file in `data_dir` when unset.
    pub database_url: Option<String>,
    /// Address to listen on.
    pub listen_host: String,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// `auto` (every GPU, or the CPU), or a list such as `cpu,cpu` or `cuda:0,cuda:2`.
    pub devices: String,
    /// This host's name on every row; the machine's host name when unset.
    pub host_name: Option<String>,
    /// The JWT signing secret; created in `data_dir` when unset.
    pub jwt_secret: Option<SecretString>,
    /// Events kept in the `recent` buffer.
    pub recent_size: usize,
    /// Events a WebSocket client may fall behind before it is disconnected.
    pub client_queue: usize,
    /// Seconds between pings on the channel; a peer that has not answered a ping by the next
    /// one is closed. From 1 to 30, so that pings keep a quiet channel open.
    pub heartbeat_seconds: u64,
    /// Seconds a WebSocket client's socket may take to accept one message before the client
    /// is closed as lagging.
    pub client_send_timeout_seconds: u64,
    /// The most rows the writer commits in one transaction.
    pub max_batch: usize,
    /// A burn weights record (`.mpk`) for the built-in model.
    pub weights: Option<PathBuf>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Apply pending migrations at start.
    pub migrate: bool,
    /// Rows older than this many days are purged every hour; 0 keeps everything.
    pub retention_days: u32,
    /// Jobs accepted but not yet recorded beyond which new jobs are refused with 503.
    pub max_pending_jobs: usize,
    /// The most memory, MiB, the model's attention may need for one job; larger jobs are
    /// refused with 400 instead of exhausting the host.
    pub max_job_memory_mib: u64,
    /// Telemetry endpoint answers kept while they stay exact; 0 builds every answer afresh.
    pub telemetry_cache_size: usize,
    /// Serve `/metrics` without a token on this address (e.g. `10.0.0.5:9464`); when unset
    /// it is served on the main address with the operator token.
    pub metrics_address: Option<String>,
}

impl Settings {
    /// Reads the settings; `overrides` are (key, value) pairs from command-line flags.
    pub fn load(file: Option<&Path>, overrides: &[(&str, Option<String>)]) -> anyhow::Result<Self> {
        let mut builder = Config::builder()
            .set_default("data_dir", "data")?
            .set_default("listen_host", "127.0.0.1")?
            .set_default("port", 8080)?
            .set_default("devices", "auto")?
            .set_default("recent_size", 50)?
            .set_default("client_queue", 1024)?
            .set_default("heartbeat_seconds", 15)?
            .set_default("client_send_timeout_seconds", 5)?
            .set_default("max_batch", 256)?
            .set_default("log_format", "text")?
            .set_default("migrate", true)?
            .set_default("retention_days", 30)?
            .set_default("max_pending_jobs", 10_000)?
            .set_default("telemetry_cache_size", 64)?
            .set_default("max_job_memory_mib", 8192)?;
        if let Some(file) = file {
            builder = builder.add_source(File::from(file));
        }
        builder = builder.add_source(Environment::with_prefix("SEIDRA").try_parsing(true));
        for (key, value) in overrides {
            if let Some(value) = value {
                builder = builder.set_override(*key, value.as_str())?;
            }
        }
        let settings: Settings = builder
            .build()?
            .try_deserialize()
            .context("invalid settings")?;
        settings.check()?;
        Ok(settings)
    }

    /// Refuses values that would leave the service unable to do its work.
    fn check(&self) -> anyhow::Result<()> {
        let at_least_one = [
            ("client_queue", self.client_queue as u64),
            ("max_batch", self.max_batch as u64),
            ("max_pending_jobs", self.max_pending_jobs as u64),
            ("max_job_memory_mib", self.max_job_memory_mib),
            (
                "client_send_timeout_seconds",
                self.client_send_timeout_seconds,
            ),
        ];
        for (name, value) in at_least_one {
            if value == 0 {
                anyhow::bail!(
                    "invalid settings: {name} must be at least 1 (SEIDRA_{} or `{name}` in the \
                     settings file)",
                    name.to_uppercase()
                );
            }
        }
        if !(1..=MAX_HEARTBEAT_SECONDS).contains(&self.heartbeat_seconds) {
            anyhow::bail!(
                "invalid settings: heartbeat_seconds must be from 1 to {MAX_HEARTBEAT_SECONDS}, \
                 not {} (SEIDRA_HEARTBEAT_SECONDS or `heartbeat_seconds` in the settings file)",
                self.heartbeat_seconds
            );
        }
        Ok(())
    }

    /// How the channel `system` treats its clients.
    pub fn channel(&self) -> ChannelSettings {
        ChannelSettings {
            heartbeat: Duration::from_secs(self.heartbeat_seconds),
            send_timeout: Duration::from_secs(self.client_send_timeout_seconds),
            client_queue: self.client_queue,
        }
    }

    /// The name stored in the `host` column.
    pub fn host(&self) -> String {
        self.host_name
            .clone()
            .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
    }

    /// Where job files are written.
    pub fn output_dir(&self) -> PathBuf {
        self.data_dir.join("outputs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_that_would_stop_the_work_is_refused_by_name() {
        for name in [
            "client_queue",
            "max_batch",
            "max_pending_jobs",
            "max_job_memory_mib",
            "client_send_timeout_seconds",
            "heartbeat_seconds",
        ] {
            let error = Settings::load(None, &[(name, Some("0".to_owned()))])
                .expect_err("0 is refused")
                .to_string();
            assert!(error.contains(name), "{error}");
        }
        assert!(Settings::load(None, &[("max_pending_jobs", Some("1".to_owned()))]).is_ok());
        let error = Settings::load(None, &[("heartbeat_seconds", Some("31".to_owned()))])
            .expect_err("a heartbeat longer than 30 s is refused")
            .to_string();
        assert!(error.contains("heartbeat_seconds"), "{error}");
        assert!(Settings::load(None, &[("heartbeat_seconds", Some("30".to_owned()))]).is_ok());
    }
}
