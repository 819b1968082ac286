//! The channel `system`: events for committed rows, auth before the upgrade, catching up.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{TestApp, small_image, small_video, spawn_app};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, query: &str) -> Socket {
    let url = format!("{}?token={}{query}", app.ws_url, app.token);
    connect_async(url).await.expect("the upgrade succeeds").0
}

async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(120), socket.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a valid frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

#[tokio::test]
async fn a_client_receives_an_event_for_every_committed_row() {
    let app = spawn_app().await;
    let mut socket = connect(&app, "").await;

    let image = app.submit(small_image(1)).await;
    let video = app.submit(small_video(2)).await;
    let first = next_json(&mut socket).await;
    let second = next_json(&mut socket).await;

    for event in [&first, &second] {
        assert_eq!(event["type"], "telemetry.generation");
        assert_eq!(event["channel"], "system");
    }
    assert_eq!(first["data"]["job_id"], image.as_str());
    assert_eq!(second["data"]["job_id"], video.as_str());
    assert_eq!(
        second["seq"].as_u64().unwrap(),
        first["seq"].as_u64().unwrap() + 1
    );

    let job = app.job(&video).await;
    assert_eq!(
        job["metrics"], second["data"],
        "the event carries the row as the API shows it"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_upgrade_needs_an_operator_token() {
    let app = spawn_app().await;
    for url in [
        app.ws_url.clone(),
        format!("{}?token=garbage", app.ws_url),
        format!("{}?token={}", app.ws_url, app.user_token("alice")),
    ] {
        let error = connect_async(url.clone()).await.expect_err("refused");
        let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
            panic!("{url}: refused before the upgrade, got {error:?}");
        };
        assert!(matches!(response.status().as_u16(), 401 | 403), "{url}");
    }
    let mut request = app.ws_url.clone().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.token).parse().unwrap(),
    );
    assert!(connect_async(request).await.is_ok(), "the header works too");
    app.stop().await;
}

#[tokio::test]
async fn a_reconnecting_client_gets_what_it_missed_or_is_told_to_reload() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for seed in 0..3 {
        let id = app.submit(small_image(seed)).await;
        app.wait_for_job(&id).await;
        ids.push(id);
    }
    let mut socket = connect(&app, "&after_seq=1").await;
    let missed = [next_json(&mut socket).await, next_json(&mut socket).await];
    assert_eq!(missed[0]["seq"], 2);
    assert_eq!(missed[0]["data"]["job_id"], ids[1].as_str());
    assert_eq!(missed[1]["seq"], 3);

    let mut stale = connect(&app, "&after_seq=99").await;
    let notice = next_json(&mut stale).await;
    assert_eq!(notice["type"], "reload");
    app.stop().await;
}
