//! BroadcastActor: numbers every message of channel `system`, keeps the recent ones, and fans
//! them out to WebSocket clients.
//!
//! Fan-out goes through a bounded `tokio::sync::broadcast` channel: publishing never waits on
//! a client, and a client that falls further behind than the channel holds is told so by its
//! own receiver. Each message is serialised once, whatever the number of clients. The
//! `recent` buffer of committed rows is filled again from the database at start.
//!
//! Each run numbers its messages from the instant it started, in microseconds since the
//! epoch, so that a sequence number from an earlier run is always older than anything this
//! run holds: a client reconnecting across a restart is told to reload instead of being
//! handed the refilled rows under numbers it already saw.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sea_orm::DatabaseConnection;
use tokio::sync::broadcast;

use crate::events::{ChannelEvent, EventEnvelope, EventType, GenerationItem, JobEvent, Payload};
use crate::metrics::Metrics;
use crate::storage::{TelemetryFilter, queries};

/// What a new WebSocket client gets: the messages it missed, then a live receiver.
pub enum Subscription {
    /// Messages after the client's last sequence number, oldest first, then live ones.
    Live {
        /// Missed messages still held.
        backlog: Vec<Arc<ChannelEvent>>,
        /// Every later message.
        receiver: broadcast::Receiver<Arc<ChannelEvent>>,
    },
    /// The client's last sequence number is older than what is held, or no number of this
    /// run.
    GapTooLarge {
        /// The client's last sequence number.
        after_seq: u64,
        /// The oldest sequence number still held.
        oldest_seq: u64,
        /// The newest sequence number published.
        latest_seq: u64,
        /// Every later message.
        receiver: broadcast::Receiver<Arc<ChannelEvent>>,
    },
}

/// Messages to the BroadcastActor.
pub enum BroadcastMessage {
    /// Publishes a committed row as `telemetry.generation`; replies with its seq.
    Publish(Box<GenerationItem>, RpcReplyPort<u64>),
    /// Publishes a row another instance committed (several hosts on one database); it is
    /// counted in that instance's metrics, not here.
    PublishRemote(Box<GenerationItem>),
    /// Publishes a job lifecycle event.
    PublishJob(EventType, Box<JobEvent>),
    /// Subscribes a client that last saw `after_seq` (none for a fresh client).
    Subscribe {
        /// The last sequence number the client received.
        after_seq: Option<u64>,
        /// Where the subscription goes.
        reply: RpcReplyPort<Subscription>,
    },
    /// The recent `telemetry.generation` messages, oldest first.
    GetRecent(RpcReplyPort<Vec<EventEnvelope>>),
    /// The sequence number of the newest recent message (0 when there is none): the recent
    /// messages are the same as long as it is.
    GetRecentSeq(RpcReplyPort<u64>),
}

/// Spawn arguments of the BroadcastActor.
pub struct BroadcastArguments {
    /// Where the recent buffer is refilled from.
    pub db: DatabaseConnection,
    /// Committed rows kept for `recent`.
    pub recent_capacity: usize,
    /// Messages a client may fall behind before it is disconnected; also how far back a
    /// reconnecting client can catch up.
    pub client_queue: usize,
    /// Prometheus metrics, recorded for every published row.
    pub metrics: Metrics,
}

/// State of the BroadcastActor.
pub struct BroadcastState {
    recent: VecDeque<EventEnvelope>,
    recent_capacity: usize,
    held: VecDeque<Arc<ChannelEvent>>,
    held_capacity: usize,
    next_seq: u64,
    sender: broadcast::Sender<Arc<ChannelEvent>>,
    metrics: Metrics,
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
        let held_capacity = args.client_queue.max(1);
        let (sender, _) = broadcast::channel(held_capacity);
        let mut state = BroadcastState {
            recent: VecDeque::with_capacity(args.recent_capacity),
            recent_capacity: args.recent_capacity,
            held: VecDeque::with_capacity(held_capacity),
            held_capacity,
            next_seq: first_seq(SystemTime::now()),
            sender,
            metrics: args.metrics,
        };
        let rows = queries::list_items(
            &args.db,
            &TelemetryFilter::default(),
            None,
            args.recent_capacity as u64,
        )
        .await?;
        for row in rows.into_iter().rev() {
            state.push(
                EventType::TelemetryGeneration,
                Payload::Generation(row.into()),
            );
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
                state.metrics.record(&item);
                let seq = state.publish(EventType::TelemetryGeneration, Payload::Generation(*item));
                let _ = reply.send(seq);
            }
            BroadcastMessage::PublishRemote(item) => {
                state.publish(EventType::TelemetryGeneration, Payload::Generation(*item));
            }
            BroadcastMessage::PublishJob(event_type, job) => {
                state.publish(event_type, Payload::Job(*job));
            }
            BroadcastMessage::Subscribe { after_seq, reply } => {
                let _ = reply.send(state.subscribe(after_seq));
            }
            BroadcastMessage::GetRecent(reply) => {
                let _ = reply.send(state.recent.iter().cloned().collect());
            }
            BroadcastMessage::GetRecentSeq(reply) => {
                let _ = reply.send(state.recent.back().map_or(0, |event| event.seq));
            }
        }
        Ok(())
    }
}

// FIXME: the numbering trusts the wall clock: a clock set back between two runs by more than
// the earlier run lasted lets that run's clients resume on numbers that now name other
// messages, and they miss the reload they needed.
/// The sequence number of a run's first message: the microseconds from the epoch to `start`.
/// A run publishing fewer than a million messages a second never reaches the next run's first
/// number, and the numbers stay below 2^53 (until the year 2255), so JavaScript reads them
/// exactly.
fn first_seq(start: SystemTime) -> u64 {
    let micros = start
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros());
    u64::try_from(micros).unwrap_or(u64::MAX).max(1)
}

impl BroadcastState {
    fn publish(&mut self, event_type: EventType, payload: Payload) -> u64 {
        let event = self.push(event_type, payload);
        // No receiver is not an error: nobody is connected.
        let _ = self.sender.send(Arc::clone(&event));
        event.seq
    }

    fn push(&mut self, event_type: EventType, payload: Payload) -> Arc<ChannelEvent> {
        let event = Arc::new(ChannelEvent::new(event_type, self.next_seq, payload));
        self.next_seq += 1;
        if let Some(envelope) = event.envelope() {
            if self.recent.len() == self.recent_capacity {
                self.recent.pop_front();
            }
            if self.recent_capacity > 0 {
                self.recent.push_back(envelope);
            }
        }
        if self.held.len() == self.held_capacity {
            self.held.pop_front();
        }
        self.held.push_back(Arc::clone(&event));
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
        let oldest_seq = self.held.front().map_or(self.next_seq, |event| event.seq);
        if after_seq < oldest_seq.saturating_sub(1) || after_seq > latest_seq {
            return Subscription::GapTooLarge {
                after_seq,
                oldest_seq,
                latest_seq,
                receiver,
            };
        }
        let backlog = self
            .held
            .iter()
            .filter(|event| event.seq > after_seq)
            .cloned()
            .collect();
        Subscription::Live { backlog, receiver }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_later_run_starts_past_every_number_an_earlier_one_used() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let first = first_seq(start);
        assert_eq!(first, 1_780_000_000_000_000);
        // An earlier run that started a second before and published 100,000 messages.
        let earlier = first_seq(start - Duration::from_secs(1));
        assert!(earlier + 100_000 < first);
        assert!(first < 1 << 53, "JavaScript reads it exactly");
        assert_eq!(
            first_seq(SystemTime::UNIX_EPOCH),
            1,
            "never 0, which means nothing seen"
        );
    }
}
