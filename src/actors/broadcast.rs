//! BroadcastActor: numbers every event of channel `system`, keeps the most recent ones, and
//! fans them out to WebSocket clients.
//!
//! Fan-out goes through a bounded `tokio::sync::broadcast` channel: publishing never waits on
//! a client, and a client that falls further behind than the channel holds is told it lagged
//! by its own receiver. The recent buffer is filled again from the database at start.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sea_orm::DatabaseConnection;
use tokio::sync::broadcast;

use crate::events::{EventEnvelope, EventType, GenerationItem, SYSTEM_CHANNEL};
use crate::storage::{TelemetryFilter, queries};

/// What a new WebSocket client gets: the events it missed, then a live receiver.
pub enum Subscription {
    /// Events after the client's last sequence number, oldest first, then live ones.
    Live {
        /// Missed events still in the recent buffer.
        backlog: Vec<Arc<EventEnvelope>>,
        /// Every later event.
        receiver: broadcast::Receiver<Arc<EventEnvelope>>,
    },
    /// The client's last sequence number is older than the recent buffer reaches.
    GapTooLarge {
        /// The oldest sequence number still held.
        oldest_seq: u64,
        /// The newest sequence number published.
        latest_seq: u64,
        /// Every later event.
        receiver: broadcast::Receiver<Arc<EventEnvelope>>,
    },
}

/// Messages to the BroadcastActor.
pub enum BroadcastMessage {
    /// Publishes a committed row as a `telemetry.generation` event; replies with its seq.
    Publish(Box<GenerationItem>, RpcReplyPort<u64>),
    /// Subscribes a client that last saw `after_seq` (none for a fresh client).
    Subscribe {
        /// The last sequence number the client received.
        after_seq: Option<u64>,
        /// Where the subscription goes.
        reply: RpcReplyPort<Subscription>,
    },
    /// The recent buffer, oldest first.
    GetRecent(RpcReplyPort<Vec<Arc<EventEnvelope>>>),
}

/// Spawn arguments of the BroadcastActor.
pub struct BroadcastArguments {
    /// Where the recent buffer is refilled from.
    pub db: DatabaseConnection,
    /// Events kept for `recent` and for catching up.
    pub recent_capacity: usize,
    /// Events a client may fall behind before it is disconnected.
    pub client_queue: usize,
}

/// State of the BroadcastActor.
pub struct BroadcastState {
    recent: VecDeque<Arc<EventEnvelope>>,
    recent_capacity: usize,
    next_seq: u64,
    sender: broadcast::Sender<Arc<EventEnvelope>>,
}

/// Publishes channel `system`.
pub struct BroadcastActor;

impl Actor for BroadcastActor {
    type Msg = BroadcastMessage;
    type State = BroadcastState;
    type Arguments = BroadcastArguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: BroadcastArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (sender, _) = broadcast::channel(args.client_queue.max(1));
        let mut state = BroadcastState {
            recent: VecDeque::with_capacity(args.recent_capacity),
            recent_capacity: args.recent_capacity,
            next_seq: 1,
            sender,
        };
        let rows = queries::list_items(
            &args.db,
            &TelemetryFilter::default(),
            None,
            args.recent_capacity as u64,
        )
        .await?;
        for row in rows.into_iter().rev() {
            state.push(GenerationItem::from(row));
        }
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            BroadcastMessage::Publish(item, reply) => {
                let event = state.push(*item);
                // No receiver is not an error: nobody is connected.
                let _ = state.sender.send(Arc::clone(&event));
                let _ = reply.send(event.seq);
            }
            BroadcastMessage::Subscribe { after_seq, reply } => {
                let _ = reply.send(state.subscribe(after_seq));
            }
            BroadcastMessage::GetRecent(reply) => {
                let _ = reply.send(state.recent.iter().cloned().collect());
            }
        }
        Ok(())
    }
}

impl BroadcastState {
    fn push(&mut self, item: GenerationItem) -> Arc<EventEnvelope> {
        let event = Arc::new(EventEnvelope {
            event_type: EventType::TelemetryGeneration,
            channel: SYSTEM_CHANNEL.to_owned(),
            seq: self.next_seq,
            emitted_at: Utc::now(),
            data: item,
        });
        self.next_seq += 1;
        if self.recent_capacity > 0 {
            if self.recent.len() == self.recent_capacity {
                self.recent.pop_front();
            }
            self.recent.push_back(Arc::clone(&event));
        }
        event
    }

    fn subscribe(&self, after_seq: Option<u64>) -> Subscription {
        let receiver = self.sender.subscribe();
        let latest_seq = self.next_seq - 1;
        let Some(after_seq) = after_seq else {
            return Subscription::Live {
                backlog: Vec::new(),
                receiver,
            };
        };
        let oldest_seq = self.recent.front().map_or(self.next_seq, |event| event.seq);
        if after_seq + 1 < oldest_seq || after_seq > latest_seq {
            return Subscription::GapTooLarge {
                oldest_seq,
                latest_seq,
                receiver,
            };
        }
        let backlog = self
            .recent
            .iter()
            .filter(|event| event.seq > after_seq)
            .cloned()
            .collect();
        Subscription::Live { backlog, receiver }
    }
}
