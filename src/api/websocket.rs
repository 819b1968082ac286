//! The WebSocket channel `system` at `GET /api/system/ws`.
//!
//! The token comes in the `Authorization` header or, for browsers, the `token` query
//! parameter; it is checked before the upgrade. A client passing `after_seq` first receives
//! the events it missed from the recent buffer. Close codes: 1001 when the service shuts
//! down, 4001 when the token expires, 4008 when the client fell too far behind.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use poem::handler;
use poem::http::StatusCode;
use poem::web::websocket::{CloseCode, Message, WebSocket};
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

/// Close code sent when the client's token expires.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// Close code sent when the client fell further behind than its queue holds.
pub const CLOSE_LAGGED: u16 = 4008;
/// Interval between pings; a peer that answers none of two is closed.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Query parameters of the upgrade request.
#[derive(Debug, Deserialize)]
pub struct ChannelQuery {
    /// A JWT, for clients that cannot set headers.
    token: Option<String>,
    /// The last sequence number the client received.
    after_seq: Option<u64>,
}

/// Upgrades to the channel `system` once the token is checked.
#[handler]
pub async fn system_channel(
    request: &Request,
    ws: WebSocket,
    Query(query): Query<ChannelQuery>,
    Data(state): Data<&AppState>,
    RemoteAddr(remote): &RemoteAddr,
) -> Response {
    let Some(token) = bearer_token(request).map(str::to_owned).or(query.token) else {
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

    let subscription = match state
        .runtime
        .broadcast
        .call(
            |reply| BroadcastMessage::Subscribe {
                after_seq: query.after_seq,
                reply,
            },
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
    let mut shutdown = state.shutdown.clone();
    let remote = remote.to_string();

    ws.on_upgrade(move |socket| async move {
        let (mut sink, mut stream) = socket.split();
        let (backlog, mut receiver) = match subscription {
            Subscription::Live { backlog, receiver } => (backlog, receiver),
            Subscription::GapTooLarge { oldest_seq, latest_seq, receiver } => {
                let reload = json!({
                    "type": "reload",
                    "channel": crate::events::SYSTEM_CHANNEL,
                    "reason": "the events after after_seq are no longer held; reload from the endpoint",
                    "oldest_seq": oldest_seq,
                    "latest_seq": latest_seq,
                });
                if sink.send(Message::Text(reload.to_string())).await.is_err() {
                    return;
                }
                // Live events continue after the reload notice.
                (Vec::new(), receiver)
            }
        };
        for event in backlog {
            if sink.send(Message::Text(event.json.clone())).await.is_err() {
                return;
            }
        }
        let expiry = tokio::time::sleep(expires_in);
        tokio::pin!(expiry);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        let mut unanswered_pings = 0u32;
        loop {
            tokio::select! {
                received = receiver.recv() => match received {
                    Ok(event) => {
                        if sink.send(Message::Text(event.json.clone())).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(client = %remote, missed, "websocket client lagged; disconnecting");
                        let _ = sink.send(Message::Close(Some((CloseCode::from(CLOSE_LAGGED), format!("lagged: {missed} events missed; reconnect with after_seq"))))).await;
                        return;
                    }
                    Err(RecvError::Closed) => {
                        let _ = sink.send(Message::Close(Some((CloseCode::Away, "service stopping".to_owned())))).await;
                        return;
                    }
                },
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Pong(_))) => unanswered_pings = 0,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
                _ = heartbeat.tick() => {
                    if unanswered_pings >= 2 {
                        tracing::debug!(client = %remote, "websocket peer stopped answering pings");
                        return;
                    }
                    unanswered_pings += 1;
                    if sink.send(Message::Ping(Vec::new())).await.is_err() {
                        return;
                    }
                }
                _ = &mut expiry => {
                    let _ = sink.send(Message::Close(Some((CloseCode::from(CLOSE_TOKEN_EXPIRED), "token expired".to_owned())))).await;
                    return;
                }
                _ = shutdown.changed() => {
                    let _ = sink.send(Message::Close(Some((CloseCode::Away, "service stopping".to_owned())))).await;
                    return;
                }
            }
        }
    })
    .into_response()
}
