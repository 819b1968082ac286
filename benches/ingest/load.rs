//! Ingest rate of the TelemetryWriterActor against plain prepared inserts, run by
//! `benches/ingest/run.sh`.
//!
//! On a fresh, migrated database it commits `--rows` measurements two ways and prints rows per
//! second for each:
//! - `writer`: through the service's runtime, as jobs do: `--producers` concurrent senders
//!   each wait for their row's commit (batched by the writer, up to `--max-batch` rows per
//!   transaction, each row also updating its job, added to the rollup and published);
//! - `plain`: one transaction of prepared single-row INSERTs of the same rows, the baseline.
//!
//! Both write the same table with the same indexes and triggers.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use sea_orm::{ConnectionTrait, Statement, TransactionTrait, Value};
use seidra::actors::{NewMetric, RuntimeSettings, RuntimeSupervisor, TelemetryWriterMessage};
use seidra::generation::JobStatus;
use seidra::metrics::Metrics;

#[derive(Parser)]
struct Args {
    /// PostgreSQL URL of an empty database; a temporary SQLite file when unset.
    #[arg(long)]
    database_url: Option<String>,
    /// Rows committed by each method.
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Concurrent senders to the writer.
    #[arg(long, default_value_t = 512)]
    producers: usize,
    /// The writer's largest transaction.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
}

fn metric(method: &str, n: usize) -> NewMetric {
    NewMetric {
        job_id: format!("{method}-{n}"),
        user_id: format!("user-{}", n % 60),
        persona_id: Some(format!("persona-{}", n % 120)),
        media_type: if n.is_multiple_of(5) {
            "video"
        } else {
            "image"
        }
        .to_owned(),
        model_name: ["sdxl-base-1.0", "flux-1-schnell", "svd-xt-1.1"][n % 3].to_owned(),
        prompt: "a lighthouse, watercolor".to_owned(),
        outputs: 1,
        duration_seconds: 0.5 + (n % 97) as f64 * 0.1,
        throughput: Some(1.0),
        vram_allocated_mb: Some(4000.0),
        vram_reserved_mb: Some(9000.0),
        vram_peak_mb: Some(8000.0),
        vram_delta_mb: Some(4000.0),
        extra: serde_json::json!({"width": 512, "height": 512, "steps": 20}),
        status: JobStatus::Succeeded,
        device: ["cuda:0", "cuda:1"][n % 2].to_owned(),
        queue_wait_seconds: 0.1,
        host: "bench-host".to_owned(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data_dir = tempfile::tempdir()?;
    let db = seidra::storage::connect(args.database_url.as_deref(), data_dir.path()).await?;
    seidra::storage::migrate_up(&db).await?;
    let backend = db.get_database_backend();
    println!("database: {backend:?}, {} rows per method", args.rows);

    // Plain: one transaction of prepared single-row INSERTs.
    let columns = "job_id, user_id, persona_id, media_type, model_name, prompt, outputs, \
        duration_seconds, throughput, vram_allocated_mb, vram_reserved_mb, vram_peak_mb, \
        vram_delta_mb, extra, status, device, queue_wait_seconds, host";
    let placeholders: Vec<String> = (1..=18)
        .map(|i| match backend {
            sea_orm::DatabaseBackend::Postgres => format!("${i}"),
            _ => "?".to_owned(),
        })
        .collect();
    let insert = format!(
        "INSERT INTO generation_metrics ({columns}) VALUES ({})",
        placeholders.join(", ")
    );
    let started = Instant::now();
    let transaction = db.begin().await?;
    for n in 0..args.rows {
        let row = metric("plain", n);
        let values: Vec<Value> = vec![
            row.job_id.into(),
            row.user_id.into(),
            row.persona_id.into(),
            row.media_type.into(),
            row.model_name.into(),
            row.prompt.into(),
            row.outputs.into(),
            row.duration_seconds.into(),
            row.throughput.into(),
            row.vram_allocated_mb.into(),
            row.vram_reserved_mb.into(),
            row.vram_peak_mb.into(),
            row.vram_delta_mb.into(),
            row.extra.into(),
            row.status.as_str().into(),
            row.device.into(),
            row.queue_wait_seconds.into(),
            row.host.into(),
        ];
        transaction
            .execute_raw(Statement::from_sql_and_values(backend, &insert, values))
            .await?;
    }
    transaction.commit().await?;
    let plain = args.rows as f64 / started.elapsed().as_secs_f64();
    println!("plain prepared inserts, one transaction: {plain:.0} rows/s");

    // Writer: the service's runtime without devices.
    let runtime = RuntimeSupervisor::start(RuntimeSettings {
        db: db.clone(),
        devices: Vec::new(),
        factory: seidra::devices::factory(None),
        output_dir: data_dir.path().join("outputs"),
        host: "bench-host".to_owned(),
        recent_capacity: 50,
        client_queue: 1024,
        max_batch: args.max_batch,
        metrics: Metrics::new(),
        max_pending_jobs: args.producers * 2,
        instance: uuid::Uuid::new_v4(),
    })
    .await
    .context("starting the runtime")?;
    let started = Instant::now();
    let mut producers = Vec::new();
    for producer in 0..args.producers {
        let writer = runtime.writer.clone();
        let (rows, step) = (args.rows, args.producers);
        producers.push(tokio::spawn(async move {
            for n in (producer..rows).step_by(step) {
                let row = Box::new(metric("writer", n));
                writer
                    .call(
                        |reply| TelemetryWriterMessage::Append(row, reply),
                        Some(Duration::from_secs(120)),
                    )
                    .await
                    .map_err(|error| anyhow::anyhow!("{error}"))?
                    .success_or_else(|| anyhow::anyhow!("the writer did not commit a row"))?;
            }
            anyhow::Ok(())
        }));
    }
    for producer in producers {
        producer.await??;
    }
    let writer = args.rows as f64 / started.elapsed().as_secs_f64();
    println!(
        "TelemetryWriterActor, {} senders, batches up to {}: {writer:.0} rows/s ({:.0} % of plain)",
        args.producers,
        args.max_batch,
        100.0 * writer / plain
    );
    let _ = runtime
        .supervisor
        .call(
            seidra::actors::supervisor::SupervisorMessage::Shutdown,
            Some(Duration::from_secs(60)),
        )
        .await;
    Ok(())
}
