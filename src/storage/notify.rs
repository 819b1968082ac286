//! Several hosts on one PostgreSQL database: each writer announces its committed rows with
//! `NOTIFY`, and every instance relays the rows committed by the others to its own WebSocket
//! clients. It needs no server beyond PostgreSQL.

use std::time::Duration;

use ractor::ActorRef;
use sea_orm::sqlx::postgres::PgListener;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
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

/// Relays rows committed by other instances to `broadcast` until `stop` changes. A lost
/// connection is re-established; announcements made meanwhile are missed by the live channel
/// (the rows themselves are in the table).
pub async fn relay_other_instances(
    db: DatabaseConnection,
    instance: Uuid,
    broadcast: ActorRef<BroadcastMessage>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let pool = db.get_postgres_connection_pool().clone();
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(error = %error, "cannot listen for other hosts' rows; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %error, "cannot listen for other hosts' rows; retrying");
            continue;
        }
        loop {
            let notification = tokio::select! {
                notification = listener.recv() => notification,
                _ = stop.changed() => return,
            };
            let announcement = match notification {
                Ok(notification) => serde_json::from_str::<Announcement>(notification.payload()),
                Err(error) => {
                    tracing::warn!(error = %error, "lost the notification connection; reconnecting");
                    break;
                }
            };
            match announcement {
                Ok(announcement) if announcement.instance != instance => {
                    relay(&db, &broadcast, announcement.ids).await;
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "unreadable announcement"),
            }
        }
    }
}

async fn relay(db: &DatabaseConnection, broadcast: &ActorRef<BroadcastMessage>, ids: Vec<i64>) {
    let rows = generation_metrics::Entity::find()
        .filter(generation_metrics::Column::Id.is_in(ids))
        .order_by_asc(generation_metrics::Column::Id)
        .all(db)
        .await;
    match rows {
        Ok(rows) => {
            for row in rows {
                let _ = broadcast.cast(BroadcastMessage::PublishRemote(Box::new(
                    GenerationItem::from(row),
                )));
            }
        }
        Err(error) => tracing::warn!(error = %error, "reading another host's rows failed"),
    }
}
