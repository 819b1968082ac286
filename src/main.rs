//! The `seidra` command: serve, migrate, mint tokens, write the OpenAPI document.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use migration::{Migrator, MigratorTrait};
use seidra::api::auth::{self, AuthKeys, Role, load_or_create_secret};
use seidra::app::Application;
use seidra::logging::{self, LogFormat};
use seidra::settings::Settings;
use seidra::storage;
use seidra::storage::retention;

mod demo;
mod generate;

/// Runs generation models on every device of this host and measures every generation.
#[derive(Debug, Parser)]
#[command(name = "seidra", version)]
struct Cli {
    /// A TOML settings file; `SEIDRA_*` variables and flags override it.
    #[arg(long, global = true, env = "SEIDRA_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory: SQLite database, JWT secret, job outputs [default: data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// `postgres://…` or `sqlite://…` instead of the embedded database.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API and run generations.
    Serve {
        /// Address to listen on [default: 127.0.0.1].
        #[arg(long)]
        host: Option<String>,
        /// Port [default: 8080; 0 picks one].
        #[arg(long)]
        port: Option<u16>,
        /// Devices: `auto`, or a list such as `cpu,cpu` or `cuda:0,cuda:2`.
        #[arg(long)]
        devices: Option<String>,
        /// Do not apply pending migrations at start.
        #[arg(long)]
        no_migrate: bool,
        /// Submit a short demo workload (three images, one video) once started.
        #[arg(long)]
        demo: bool,
    },
    /// Apply, revert or list migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Mint a JWT from the configured secret.
    Token {
        /// The token's subject: 1 to 256 characters, what `user_id` filters on.
        #[arg(long, default_value = "operator", value_parser = subject)]
        user: String,
        /// The token's role.
        #[arg(long, value_enum, default_value = "operator")]
        role: Role,
        /// Validity in hours, 1 to 87,600 (ten years).
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(i64).range(1..=87_600))]
        hours: i64,
    },
    /// Delete rows of generation_metrics older than a window, in small batches.
    Purge {
        /// The window, e.g. `30d`, `12h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        /// Count the rows that would go, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Submit a job to a running service, follow its progress, print its figures and files.
    Generate(generate::GenerateArgs),
    /// Write the OpenAPI document to a folder.
    Openapi {
        /// Where to write `openapi.json`.
        #[arg(long, default_value = "openapi")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the last migration.
    Down,
    /// List migrations and whether they are applied.
    Status,
}

fn main() -> anyhow::Result<()> {
    // NVML lists GPUs in PCI order; CUDA must number them the same way. This has to happen
    // before any thread starts.
    if cfg!(feature = "cuda") && std::env::var_os("CUDA_DEVICE_ORDER").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("CUDA_DEVICE_ORDER", "PCI_BUS_ID") };
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = vec![
        (
            "data_dir",
            cli.data_dir.as_ref().map(|p| p.display().to_string()),
        ),
        ("database_url", cli.database_url.clone()),
        (
            "log_format",
            cli.log_format.map(|f| format!("{f:?}").to_lowercase()),
        ),
    ];
    if let Command::Serve {
        host,
        port,
        devices,
        no_migrate,
        ..
    } = &cli.command
    {
        overrides.push(("listen_host", host.clone()));
        overrides.push(("port", port.map(|p| p.to_string())));
        overrides.push(("devices", devices.clone()));
        overrides.push(("migrate", no_migrate.then(|| "false".to_owned())));
    }
    let settings = Settings::load(cli.config.as_deref(), &overrides)?;
    logging::init(settings.log_format);

    match cli.command {
        Command::Serve { demo, .. } => serve(settings, demo).await,
        Command::Migrate { action } => migrate(&settings, action).await,
        Command::Token { user, role, hours } => {
            let secret = load_or_create_secret(settings.jwt_secret.as_ref(), &settings.data_dir)?;
            println!(
                "{}",
                AuthKeys::new(&secret)?.mint(&user, role, chrono::Duration::hours(hours))?
            );
            Ok(())
        }
        Command::Purge {
            older_than,
            dry_run,
        } => purge(&settings, older_than, dry_run).await,
        Command::Generate(args) => generate::run(args).await,
        Command::Openapi { out } => {
            std::fs::create_dir_all(&out)?;
            let path = out.join("openapi.json");
            std::fs::write(&path, seidra::api::openapi_json() + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

async fn serve(settings: Settings, demo: bool) -> anyhow::Result<()> {
    let app = Application::build(&settings).await?;
    if demo {
        let address = app.address();
        let keys = app.keys();
        tokio::spawn(async move {
            if let Err(error) = demo::run(address, &keys).await {
                tracing::error!(error = %format!("{error:#}"), "the demo workload failed");
            }
        });
    }
    app.run_until(stop_signal()).await
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn purge(
    settings: &Settings,
    older_than: std::time::Duration,
    dry_run: bool,
) -> anyhow::Result<()> {
    let cutoff = chrono::TimeDelta::from_std(older_than)
        .ok()
        .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
        .with_context(|| {
            format!(
                "--older-than {}: further back than the calendar goes",
                humantime::format_duration(older_than)
            )
        })?;
    let db = storage::connect(settings.database_url.as_deref(), &settings.data_dir).await?;
    if dry_run {
        let count = retention::count_older_than(&db, cutoff).await?;
        println!("{count} rows committed before {cutoff} would be deleted");
    } else {
        let removed = retention::purge_older_than(&db, cutoff, retention::PURGE_BATCH).await?;
        tracing::info!(removed, cutoff = %cutoff, "purge");
        println!("{removed} rows committed before {cutoff} deleted");
    }
    Ok(())
}

async fn migrate(settings: &Settings, action: MigrateAction) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir)?;
    let db = storage::connect(settings.database_url.as_deref(), &settings.data_dir).await?;
    match action {
        MigrateAction::Up => Migrator::up(&db, None).await?,
        MigrateAction::Down => Migrator::down(&db, Some(1)).await?,
        MigrateAction::Status => {
            let applied: Vec<String> = Migrator::get_applied_migrations(&db)
                .await?
                .iter()
                .map(|m| m.name().to_owned())
                .collect();
            for migration in Migrator::migrations() {
                let name = migration.name().to_owned();
                let state = if applied.contains(&name) {
                    "applied"
                } else {
                    "pending"
                };
                println!("{name}\t{state}");
            }
        }
    }
    Ok(())
}

/// A token subject the endpoint's `user_id` filter can select.
fn subject(text: &str) -> Result<String, String> {
    auth::check_subject(text)?;
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_minted_only_for_a_user_the_endpoint_can_select() {
        assert!(subject("operator").is_ok());
        assert!(subject(&"é".repeat(256)).is_ok());
        assert!(subject("").is_err());
        assert!(subject(&"u".repeat(257)).is_err());
        assert!(subject("a\0b").is_err());
        let hours = |value: &str| Cli::try_parse_from(["seidra", "token", "--hours", value]);
        assert!(hours("1").is_ok());
        assert!(hours("0").is_err());
        assert!(hours("87601").is_err());
    }
}
