//! TelemetryWriterActor: commits measurements to `generation_metrics` in batches, publishes
//! each committed row, and only then answers the job that sent it.
//!
//! Rows that arrive while a batch is being committed wait in the mailbox and form the next
//! batch, so batches grow with load and add no delay when idle. When the database refuses a
//! batch the writer keeps it and retries with backoff; nothing it holds is dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, Statement,
    TransactionTrait, Value,
};

use crate::actors::broadcast::BroadcastMessage;
use crate::events::GenerationItem;
use crate::generation::JobStatus;
use crate::storage::entities::generation_metrics;
use crate::storage::notify::{self, Announcement};
use crate::storage::rollup;
use crate::storage::timestamp_parameter;
use uuid::Uuid;

/// A measurement ready to be stored; `id` and `created_at` come from the database.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMetric {
    /// The job measured.
    pub job_id: String,
    /// The user who submitted it.
    pub user_id: String,
    /// Its persona.
    pub persona_id: Option<String>,
    /// `image` or `video`.
    pub media_type: String,
    /// The model.
    pub model_name: String,
    /// The prompt.
    pub prompt: String,
    /// Images or frames produced.
    pub outputs: i32,
    /// Inference seconds, or seconds until failure.
    pub duration_seconds: f64,
    /// Outputs per second.
    pub throughput: Option<f64>,
    /// MiB in use at the end.
    pub vram_allocated_mb: Option<f64>,
    /// MiB reserved at the end.
    pub vram_reserved_mb: Option<f64>,
    /// Peak MiB in use.
    pub vram_peak_mb: Option<f64>,
    /// Peak minus MiB in use at the start.
    pub vram_delta_mb: Option<f64>,
    /// Everything without a column.
    pub extra: serde_json::Value,
    /// How the job ended.
    pub status: JobStatus,
    /// The device that ran it.
    pub device: String,
    /// Seconds in the queue.
    pub queue_wait_seconds: f64,
    /// This host's name.
    pub host: String,
}

impl NewMetric {
    fn into_active_model(self) -> generation_metrics::ActiveModel {
        generation_metrics::ActiveModel {
            id: NotSet,
            job_id: Set(self.job_id),
            user_id: Set(self.user_id),
            persona_id: Set(self.persona_id),
            media_type: Set(self.media_type),
            model_name: Set(self.model_name),
            prompt: Set(self.prompt),
            outputs: Set(self.outputs),
            duration_seconds: Set(self.duration_seconds),
            throughput: Set(self.throughput),
            vram_allocated_mb: Set(self.vram_allocated_mb),
            vram_reserved_mb: Set(self.vram_reserved_mb),
            vram_peak_mb: Set(self.vram_peak_mb),
            vram_delta_mb: Set(self.vram_delta_mb),
            extra: Set(self.extra),
            created_at: NotSet,
            status: Set(self.status.as_str().to_owned()),
            device: Set(self.device),
            queue_wait_seconds: Set(self.queue_wait_seconds),
            host: Set(self.host),
        }
    }
}

/// Messages to the TelemetryWriterActor.
pub enum TelemetryWriterMessage {
    /// Stores a row; the reply comes once it is committed and published.
    Append(Box<NewMetric>, RpcReplyPort<GenerationItem>),
    /// Stores a job's row like `Append`, with `extra.total_seconds` set to the time from
    /// `submitted` to the insert that commits it.
    AppendJob {
        /// The row.
        row: Box<NewMetric>,
        /// When the job was accepted, on the monotonic clock.
        submitted: Instant,
        /// Answered once the row is committed and published.
        reply: RpcReplyPort<GenerationItem>,
    },
    /// Commits what is held.
    Flush,
}

/// Spawn arguments of the writer.
pub struct TelemetryWriterArguments {
    /// The database.
    pub db: DatabaseConnection,
    /// Where committed rows are published.
    pub broadcast: ActorRef<BroadcastMessage>,
    /// The most rows in one transaction.
    pub max_batch: usize,
    /// This service instance, named in the announcements of its commits on PostgreSQL.
    pub instance: Uuid,
}

/// State of the writer: rows not yet committed, oldest first.
pub struct TelemetryWriterState {
    db: DatabaseConnection,
    broadcast: ActorRef<BroadcastMessage>,
    max_batch: usize,
    instance: Uuid,
    pending: Vec<Pending>,
    flush_scheduled: bool,
    failures: u32,
}

struct Pending {
    row: Box<NewMetric>,
    submitted: Option<Instant>,
    reply: RpcReplyPort<GenerationItem>,
}

/// Batches rows into `generation_metrics`.
pub struct TelemetryWriterActor;

impl Actor for TelemetryWriterActor {
    type Msg = TelemetryWriterMessage;
    type State = TelemetryWriterState;
    type Arguments = TelemetryWriterArguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: TelemetryWriterArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(TelemetryWriterState {
            db: args.db,
            broadcast: args.broadcast,
            max_batch: args.max_batch.max(1),
            instance: args.instance,
            pending: Vec::new(),
            flush_scheduled: false,
            failures: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TelemetryWriterMessage::Append(row, reply) => {
                self.append(&myself, state, row, None, reply).await;
            }
            TelemetryWriterMessage::AppendJob {
                row,
                submitted,
                reply,
            } => {
                self.append(&myself, state, row, Some(submitted), reply)
                    .await;
            }
            TelemetryWriterMessage::Flush => {
                state.flush_scheduled = false;
                self.flush(&myself, state).await;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        while !state.pending.is_empty() {
            if let Err(error) = self.commit_batch(state).await {
                tracing::error!(
                    rows = state.pending.len(),
                    error = %error,
                    "rows lost at shutdown: the database refused them"
                );
                break;
            }
        }
        let _ = myself;
        Ok(())
    }
}

impl TelemetryWriterActor {
    async fn append(
        &self,
        myself: &ActorRef<TelemetryWriterMessage>,
        state: &mut TelemetryWriterState,
        row: Box<NewMetric>,
        submitted: Option<Instant>,
        reply: RpcReplyPort<GenerationItem>,
    ) {
        state.pending.push(Pending {
            row,
            submitted,
            reply,
        });
        if !state.flush_scheduled {
            if myself.cast(TelemetryWriterMessage::Flush).is_ok() {
                state.flush_scheduled = true;
            } else {
                // Draining for shutdown refuses new messages: commit now instead.
                self.flush(myself, state).await;
            }
        }
    }

    async fn flush(
        &self,
        myself: &ActorRef<TelemetryWriterMessage>,
        state: &mut TelemetryWriterState,
    ) {
        while !state.pending.is_empty() {
            match self.commit_batch(state).await {
                Ok(()) => state.failures = 0,
                Err(error) => {
                    state.failures += 1;
                    let backoff = retry_backoff(state.failures);
                    tracing::warn!(
                        rows = state.pending.len(),
                        attempt = state.failures,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %error,
                        "commit failed; keeping the rows and retrying"
                    );
                    state.flush_scheduled = true;
                    myself.send_after(backoff, || TelemetryWriterMessage::Flush);
                    return;
                }
            }
        }
    }

    /// Commits up to `max_batch` of the oldest pending rows, publishes them, and answers
    /// their senders. On error nothing is removed from `pending`.
    async fn commit_batch(&self, state: &mut TelemetryWriterState) -> Result<(), DbErr> {
        let count = state.pending.len().min(state.max_batch);
        let mut batch: Vec<NewMetric> = state.pending[..count]
            .iter()
            .map(|pending| (*pending.row).clone())
            .collect();

        let transaction = state.db.begin().await?;
        let backend = transaction.get_database_backend();
        let finished_at = timestamp_parameter(backend, chrono::Utc::now());
        for row in &batch {
            let sql = match backend {
                sea_orm::DatabaseBackend::Postgres => {
                    "UPDATE generation_jobs SET status = $1, finished_at = $2 WHERE id = $3"
                }
                _ => "UPDATE generation_jobs SET status = ?, finished_at = ? WHERE id = ?",
            };
            transaction
                .execute_raw(Statement::from_sql_and_values(
                    backend,
                    sql,
                    [
                        Value::from(row.status.as_str()),
                        finished_at.clone(),
                        Value::from(row.job_id.as_str()),
                    ],
                ))
                .await?;
        }
        // After a failed attempt the commit may have gone through with only its answer lost
        // (a connection cut at the wrong moment): rows already there are not inserted again.
        let mut stored = HashMap::new();
        if state.failures > 0 {
            let job_ids = batch.iter().map(|row| row.job_id.clone());
            for row in generation_metrics::Entity::find()
                .filter(generation_metrics::Column::JobId.is_in(job_ids))
                .all(&transaction)
                .await?
            {
                stored.insert(row.job_id.clone(), row);
            }
        }
        // Stamped at each attempt, right before the insert: while the database is out, rows
        // wait here, and that wait is part of the time from submission to commit.
        for (row, pending) in batch.iter_mut().zip(&state.pending) {
            if let Some(submitted) = pending.submitted {
                row.extra["total_seconds"] = serde_json::json!(submitted.elapsed().as_secs_f64());
            }
        }
        let new_rows: Vec<_> = batch
            .into_iter()
            .filter(|row| !stored.contains_key(&row.job_id))
            .map(NewMetric::into_active_model)
            .collect();
        let inserted = if new_rows.is_empty() {
            Vec::new()
        } else {
            generation_metrics::Entity::insert_many(new_rows)
                .exec_with_returning(&transaction)
                .await?
        };
        rollup::add_rows(&transaction, &inserted).await?;
        let inserted_ids: Vec<i64> = inserted.iter().map(|row| row.id).collect();
        let mut committed = inserted;
        committed.extend(stored.into_values());
        if backend == sea_orm::DatabaseBackend::Postgres {
            // Delivered to listeners at commit, and only if the commit succeeds.
            let announcement = Announcement {
                instance: state.instance,
                ids: inserted_ids,
            };
            transaction
                .execute_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT pg_notify($1, $2)",
                    [
                        Value::from(notify::CHANNEL),
                        Value::from(serde_json::to_string(&announcement).unwrap_or_default()),
                    ],
                ))
                .await?;
        }
        transaction.commit().await?;

        let mut committed: HashMap<String, generation_metrics::Model> = committed
            .into_iter()
            .map(|row| (row.job_id.clone(), row))
            .collect();
        for Pending {
            row: sent, reply, ..
        } in state.pending.drain(..count)
        {
            let Some(row) = committed.remove(&sent.job_id) else {
                continue;
            };
            let item = GenerationItem::from(row);
            // Publishing is awaited so that a job is never reported finished before its event
            // is out; the broadcast actor itself never waits on a client.
            let _ = state
                .broadcast
                .call(
                    |port| BroadcastMessage::Publish(Box::new(item.clone()), port),
                    None,
                )
                .await;
            let _ = reply.send(item);
        }
        Ok(())
    }
}

fn retry_backoff(failures: u32) -> Duration {
    let millis = 100u64.saturating_mul(1 << failures.min(6));
    Duration::from_millis(millis.min(5_000))
}
