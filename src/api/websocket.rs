//! The WebSocket channel `system` at `GET /api/system/ws`.
//!
//! The token comes in the `Authorization` header or, for browsers, the `token` query
//! parameter; it is checked before the upgrade. A client passing `after_seq` first receives
//! the messages it missed from the last `client_queue` ones the channel holds. Close codes: 1001 when the service shuts
//! down, 4001 when the token expires, 4008 when the client fell too far behind.
//!
//! Each client is served by its own task with its own receiver, so a client that stops
//! reading only ever holds up its own task: once it is more than its queue behind, or its
//! socket takes no message for the send timeout, it is closed.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use poem::handler;
use poem::http::StatusCode;
use poem::web::websocket::{CloseCode, Message, WebSocket, WebSocketConfig};
use poem::web::{Data, Query, RemoteAddr};
use poem::{IntoResponse, Request, Response};
use ractor::rpc::CallResult;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::actors::{BroadcastMessage, Subscription};
use crate::api::AppState;
use crate::api::auth::{bearer_token, verify_for_request};
use crate::api::errors::{ErrorBody, to_json_error};
use crate::events::ChannelEvent;

/// Close code sent when the client's token expires.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// Close code sent when the client fell further behind than its queue holds.
pub const CLOSE_LAGGED: u16 = 4008;
/// How often a send that waits on a full socket checks whether its client is lagging.
const LAG_CHECK: Duration = Duration::from_millis(50);
/// Longest a close frame may wait: a lagging client that reads again in this time learns why
/// it was closed; one that never reads again does not hold its connection longer.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest frame a client may send, and its read buffer.
const CLIENT_FRAME_BYTES: usize = 4096;

/// How the channel treats its clients; from the settings.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSettings {
    /// Interval between pings; a peer that has not answered a ping by the next one is closed.
    pub heartbeat: Duration,
    /// Longest a client's socket may take to accept one message before it counts as lagging.
    pub send_timeout: Duration,
    /// Messages a client may fall behind before it is closed with 4008.
    pub client_queue: usize,
}

/// Query parameters of the upgrade request.
#[derive(Debug, Deserialize)]
pub struct ChannelQuery {
    /// A JWT, for clients that cannot set headers.
    token: Option<String>,
    /// The last sequence number the client received; read by `after_seq()`, so that a bad
    /// value gets an answer that names it.
    after_seq: Option<String>,
}

impl ChannelQuery {
    fn after_seq(&self) -> Result<Option<u64>, String> {
        self.after_seq
            .as_deref()
            .map(|text| {
                text.parse::<u64>().map_err(|_| {
                    format!(
                        "after_seq: `{text}` is not a sequence number (a whole number from 0 to {})",
                        u64::MAX
                    )
                })
            })
            .transpose()
    }
}

/// Upgrades to the channel `system` once the token is checked.
#[handler]
pub async fn system_channel(
    request: &Request,
    ws: WebSocket,
    Query(query): Query<ChannelQuery>,
    Data(state): Data<&AppState>,
    Data(settings): Data<&ChannelSettings>,
    RemoteAddr(remote): &RemoteAddr,
) -> Response {
    let Some(token) = bearer_token(request)
        .map(str::to_owned)
        .or(query.token.clone())
    else {
        return to_json_error(poem::Error::from_string(
            "a bearer token is needed, in the Authorization header or the `token` parameter",
            StatusCode::UNAUTHORIZED,
        ))
        .await;
    };
    let claims = match verify_for_request(&state.keys, &token) {
        Ok(claims) => claims,
        Err(error) => return to_json_error(error).await,
    };
    if !claims.is_operator() {
        return ErrorBody::new(
            "forbidden",
            "the channel needs a token with the operator role",
        )
        .with_status(StatusCode::FORBIDDEN)
        .into_response();
    }

    let after_seq = match query.after_seq() {
        Ok(after_seq) => after_seq,
        Err(message) => {
            return ErrorBody::new("bad_request", message)
                .with_status(StatusCode::BAD_REQUEST)
                .into_response();
        }
    };
    let subscription = match state
        .runtime
        .broadcast
        .call(
            |reply| BroadcastMessage::Subscribe { after_seq, reply },
            None,
        )
        .await
    {
        Ok(CallResult::Success(subscription)) => subscription,
        _ => {
            return ErrorBody::new("unavailable", "the channel is not running")
                .with_status(StatusCode::SERVICE_UNAVAILABLE)
                .into_response();
        }
    };
    let expires_in = Duration::from_secs(
        u64::try_from(claims.exp - chrono::Utc::now().timestamp()).unwrap_or(0),
    );
    let shutdown = state.shutdown.clone();
    let peer = Peer {
        remote: remote.to_string(),
        settings: *settings,
    };
    // Clients only send pings, pongs and close frames: small buffers keep a thousand idle
    // connections cheap and refuse large messages nobody reads.
    let config = WebSocketConfig::default()
        .read_buffer_size(CLIENT_FRAME_BYTES)
        .max_message_size(Some(CLIENT_FRAME_BYTES))
        .max_frame_size(Some(CLIENT_FRAME_BYTES));
    ws.config(config)
        .on_upgrade(move |socket| serve_client(socket, peer, subscription, expires_in, shutdown))
        .into_response()
}

/// Sends messages to one client until it leaves, lags, its token expires, or the service
/// stops. Each client has its own task; none waits on another.
async fn serve_client(
    socket: WebSocketStream,
    peer: Peer,
    subscription: Subscription,
    expires_in: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (sink, mut stream) = socket.split();
    let heartbeat_interval = peer.settings.heartbeat;
    let mut client = Client { sink, peer };
    let (backlog, mut receiver) = match subscription {
        Subscription::Live { backlog, receiver } => (backlog, receiver),
        Subscription::GapTooLarge {
            after_seq,
            oldest_seq,
            latest_seq,
            receiver,
        } => {
            let reload = reload_notice(after_seq, oldest_seq, latest_seq);
            if !client
                .send(Message::Text(reload.to_string()), &receiver)
                .await
            {
                return;
            }
            // Live messages continue after the reload notice.
            (Vec::new(), receiver)
        }
    };
    for event in backlog {
        if !client
            .send(Message::Text(event.json.clone()), &receiver)
            .await
        {
            return;
        }
    }

    let expiry = tokio::time::sleep(expires_in);
    tokio::pin!(expiry);
    let mut heartbeat = tokio::time::interval(heartbeat_interval);
    // After a long send, the next ping waits a whole interval: a burst of missed ticks would
    // close a peer that had no time to answer.
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut ping_unanswered = false;
    loop {
        tokio::select! {
            received = receiver.recv() => match received {
                Ok(event) => {
                    if !client.send(Message::Text(event.json.clone()), &receiver).await {
                        return;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    let reason = format!("lagged: {missed} messages missed; reconnect with after_seq");
                    return client.lagged(&reason).await;
                }
                Err(RecvError::Closed) => return client.close(CloseCode::Away, "service stopping").await,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                // Anything the peer sends shows it is alive, a pong above all.
                Some(Ok(_)) => ping_unanswered = false,
            },
            _ = heartbeat.tick() => {
                // A peer is closed between one and two intervals after it fell silent.
                if ping_unanswered {
                    tracing::debug!(client = %client.peer.remote, "websocket peer stopped answering pings");
                    return;
                }
                ping_unanswered = true;
                if !client.send(Message::Ping(Vec::new()), &receiver).await {
                    return;
                }
            }
            _ = &mut expiry => {
                return client.close(CloseCode::from(CLOSE_TOKEN_EXPIRED), "token expired").await;
            }
            _ = shutdown.changed() => return client.close(CloseCode::Away, "service stopping").await,
        }
    }
}

type WebSocketStream = poem::web::websocket::WebSocketStream;
type Receiver = tokio::sync::broadcast::Receiver<std::sync::Arc<ChannelEvent>>;

/// The `reload` notice: the envelope of every message, its figures in `data`. Its `seq` is
/// the newest message published, so a client that keeps it as its last seen resumes exactly
/// with the live messages that follow it.
fn reload_notice(after_seq: u64, oldest_seq: u64, latest_seq: u64) -> serde_json::Value {
    let reason = if after_seq > latest_seq {
        "after_seq is past every message of this run; reload from the endpoint"
    } else {
        "the messages after after_seq are no longer held; reload from the endpoint"
    };
    json!({
        "type": "reload",
        "channel": crate::events::SYSTEM_CHANNEL,
        "seq": latest_seq,
        "emitted_at": chrono::Utc::now().to_rfc3339(),
        "data": {
            "reason": reason,
            "oldest_seq": oldest_seq,
            "latest_seq": latest_seq,
        },
    })
}

/// Who a client is, known before the upgrade.
struct Peer {
    remote: String,
    settings: ChannelSettings,
}

struct Client {
    sink: futures_util::stream::SplitSink<WebSocketStream, Message>,
    peer: Peer,
}

/// How a send that was waited on ended.
enum Sent {
    Done(bool),
    TimedOut,
    Lagged(usize),
}

impl Client {
    /// Sends a message. While the client's socket is full, the client is closed as lagging
    /// as soon as it is more than its queue behind, or once the send timeout has passed.
    async fn send(&mut self, message: Message, receiver: &Receiver) -> bool {
        let settings = self.peer.settings;
        let outcome = {
            let sending = self.sink.send(message);
            tokio::pin!(sending);
            let timeout = tokio::time::sleep(settings.send_timeout);
            tokio::pin!(timeout);
            let mut check = tokio::time::interval(LAG_CHECK);
            loop {
                tokio::select! {
                    sent = &mut sending => break Sent::Done(sent.is_ok()),
                    _ = &mut timeout => break Sent::TimedOut,
                    _ = check.tick() => {
                        let behind = receiver.len();
                        if behind > settings.client_queue {
                            break Sent::Lagged(behind);
                        }
                    }
                }
            }
        };
        match outcome {
            Sent::Done(sent) => sent,
            Sent::TimedOut => {
                self.lagged("lagged: the client stopped reading").await;
                false
            }
            Sent::Lagged(behind) => {
                let reason = format!("lagged: {behind} messages behind; reconnect with after_seq");
                self.lagged(&reason).await;
                false
            }
        }
    }

    async fn lagged(&mut self, reason: &str) {
        tracing::warn!(client = %self.peer.remote, reason, "websocket client lagged; disconnecting");
        self.close(CloseCode::from(CLOSE_LAGGED), reason).await;
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let close = Message::Close(Some((code, reason.to_owned())));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.sink.send(close)).await;
    }
}
