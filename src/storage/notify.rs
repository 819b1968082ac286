//! Several hosts on one PostgreSQL database: each writer announces its committed rows with
//! `NOTIFY`, and every instance relays the rows committed by the others to its own WebSocket
//! clients, reading from the table what was announced while it was not listening. It needs no
//! server beyond PostgreSQL.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ractor::ActorRef;
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{
    ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::actors::BroadcastMessage;
use crate::events::GenerationItem;
use crate::storage::entities::generation_metrics;

/// The PostgreSQL channel rows are announced on.
pub const CHANNEL: &str = "seidra_generation";

/// What a writer announces after a commit.
#[derive(Debug, Serialize, Deserialize)]
pub struct Announcement {
    /// The service instance that committed the rows.
    pub instance: Uuid,
    /// Their ids.
    pub ids: Vec<i64>,
}

/// How far before a lost connection a replay looks for rows: a row's `created_at` is the start
/// of the transaction that committed it, which can come some time before the commit.
const REPLAY_MARGIN: Duration = Duration::from_secs(60);

/// Rows published after a reconnection at most; more than a channel client could catch up on.
const REPLAY_LIMIT: u64 = 10_000;

/// Relays rows committed by other instances to `broadcast` until `stop` changes. A lost
/// connection is re-established, and the rows other hosts committed meanwhile are then read
/// from the table and published, each once.
pub async fn relay_other_instances(
    db: DatabaseConnection,
    instance: Uuid,
    host: String,
    broadcast: ActorRef<BroadcastMessage>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let pool = db.get_postgres_connection_pool().clone();
    let mut relayed = Relayed::default();
    // Rows committed before the relay started came with the recent buffer.
    let started_at = Utc::now();
    // Where the next successful connection must read the rows it was not told about.
    let mut replay_from: Option<DateTime<Utc>> = None;
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        let mut listener = match listener.await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(error = %error, "cannot listen for other hosts' rows; retrying");
                replay_from.get_or_insert(started_at);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        if let Some(from) = replay_from.take() {
            match replay(&db, &host, from, &mut relayed, &broadcast).await {
                Ok(published) => {
                    tracing::info!(
                        published,
                        "published other hosts' rows missed while not listening"
                    );
                }
                Err(error) => {
                    tracing::warn!(error = %error, "reading other hosts' missed rows failed; retrying");
                    replay_from = Some(from);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            }
        }
        loop {
            // `try_recv` answers `None` when the connection is lost, instead of reconnecting
            // silently as `recv` does: what was announced meanwhile must be replayed.
            let notification = tokio::select! {
                notification = listener.try_recv() => notification,
                _ = stop.changed() => return,
            };
            let announcement = match notification {
                Ok(Some(notification)) => {
                    serde_json::from_str::<Announcement>(notification.payload())
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("lost the notification connection; reconnecting");
                    replay_from = Some(started_at.max(Utc::now() - REPLAY_MARGIN));
                    break;
                }
            };
            match announcement {
                Ok(announcement) if announcement.instance != instance => {
                    relay(&db, &broadcast, announcement.ids, &mut relayed).await;
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "unreadable announcement"),
            }
        }
    }
}

/// Ids of the rows published lately, so that a replay publishes none twice.
#[derive(Default)]
struct Relayed {
    order: VecDeque<i64>,
    ids: HashSet<i64>,
}

impl Relayed {
    /// Ids remembered at most: more than a replay publishes.
    const CAPACITY: usize = 2 * REPLAY_LIMIT as usize;

    /// Remembers `id`; answers whether it is new.
    fn insert(&mut self, id: i64) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > Self::CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        true
    }
}

async fn relay(
    db: &DatabaseConnection,
    broadcast: &ActorRef<BroadcastMessage>,
    ids: Vec<i64>,
    relayed: &mut Relayed,
) {
    let rows = generation_metrics::Entity::find()
        .filter(generation_metrics::Column::Id.is_in(ids))
        .order_by_asc(generation_metrics::Column::Id)
        .all(db)
        .await;
    match rows {
        Ok(rows) => {
            publish(broadcast, rows, relayed);
        }
        Err(error) => tracing::warn!(error = %error, "reading another host's rows failed"),
    }
}

/// Publishes the rows other hosts committed from `from` on that were not published yet;
/// answers how many.
async fn replay(
    db: &DatabaseConnection,
    host: &str,
    from: DateTime<Utc>,
    relayed: &mut Relayed,
    broadcast: &ActorRef<BroadcastMessage>,
) -> Result<usize, DbErr> {
    let rows = generation_metrics::Entity::find()
        .filter(generation_metrics::Column::CreatedAt.gte(from))
        .filter(generation_metrics::Column::Host.ne(host))
        .order_by_asc(generation_metrics::Column::Id)
        .limit(REPLAY_LIMIT)
        .all(db)
        .await?;
    Ok(publish(broadcast, rows, relayed))
}

fn publish(
    broadcast: &ActorRef<BroadcastMessage>,
    rows: Vec<generation_metrics::Model>,
    relayed: &mut Relayed,
) -> usize {
    let mut published = 0;
    for row in rows {
        if relayed.insert(row.id) {
            published += 1;
            let _ = broadcast.cast(BroadcastMessage::PublishRemote(Box::new(
                GenerationItem::from(row),
            )));
        }
    }
    published
}
