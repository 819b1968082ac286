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

async fn next_of_type(socket: &mut Socket, event_type: &str) -> Value {
    loop {
        let event = next_json(socket).await;
        if event["type"] == event_type {
            return event;
        }
    }
}

#[tokio::test]
async fn a_client_receives_an_event_for_every_committed_row() {
    let app = spawn_app().await;
    let mut socket = connect(&app, "").await;

    let image = app.submit(small_image(1)).await;
    let video = app.submit(small_video(2)).await;
    let first = next_of_type(&mut socket, "telemetry.generation").await;
    let second = next_of_type(&mut socket, "telemetry.generation").await;

    for event in [&first, &second] {
        assert_eq!(event["type"], "telemetry.generation");
        assert_eq!(event["channel"], "system");
    }
    assert_eq!(first["data"]["job_id"], image.as_str());
    assert_eq!(second["data"]["job_id"], video.as_str());
    assert!(second["seq"].as_u64().unwrap() > first["seq"].as_u64().unwrap());

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
    let mut everything = connect(&app, "").await;
    let mut ids = Vec::new();
    for seed in 0..3 {
        let id = app.submit(small_image(seed)).await;
        app.wait_for_job(&id).await;
        ids.push(id);
    }
    let mut seen = Vec::new();
    while seen.last().is_none_or(|event: &Value| {
        event["data"]["job_id"] != ids[2].as_str() || event["type"] != "job.finished"
    }) {
        seen.push(next_json(&mut everything).await);
    }
    let seqs: Vec<u64> = seen
        .iter()
        .map(|event| event["seq"].as_u64().unwrap())
        .collect();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "every message, in order, no gap"
    );

    // Reconnect after the first job's row: exactly what followed comes back.
    let first_row = seen
        .iter()
        .find(|event| event["type"] == "telemetry.generation")
        .unwrap()["seq"]
        .as_u64()
        .unwrap();
    let mut socket = connect(&app, &format!("&after_seq={first_row}")).await;
    for expected in seen
        .iter()
        .filter(|event| event["seq"].as_u64().unwrap() > first_row)
    {
        assert_eq!(&next_json(&mut socket).await, expected);
    }

    // Too old (a run that started earlier numbered from a smaller base), or ahead.
    let latest = *seqs.last().unwrap();
    for unknown in [
        "0",
        &(first - 2).to_string(),
        &(latest + 1000).to_string(),
        &u64::MAX.to_string(),
    ] {
        let mut stale = connect(&app, &format!("&after_seq={unknown}")).await;
        let notice = next_json(&mut stale).await;
        assert_eq!(notice["type"], "reload", "after_seq={unknown}");
        assert_eq!(notice["data"]["latest_seq"], latest, "after_seq={unknown}");
    }
    for bad in ["abc", "-1", "1.5", "18446744073709551616"] {
        let url = format!("{}?token={}&after_seq={bad}", app.ws_url, app.token);
        let error = connect_async(url).await.expect_err("refused");
        let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
            panic!("after_seq={bad}: refused before the upgrade, got {error:?}");
        };
        assert_eq!(response.status().as_u16(), 400, "after_seq={bad}");
        let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
        assert!(body.contains("after_seq"), "after_seq={bad}: {body}");
    }
    let after = app.submit(small_image(9)).await;
    app.wait_for_job(&after).await;
    app.stop().await;
}

#[tokio::test]
async fn a_job_announces_queued_started_progress_then_its_row_then_finished() {
    let app = spawn_app().await;
    let mut socket = connect(&app, "").await;
    let id = app.submit(small_video(3)).await;

    let mut types = Vec::new();
    loop {
        let event = next_json(&mut socket).await;
        let job_id = event["data"]["job_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(job_id, id);
        let event_type = event["type"].as_str().unwrap().to_owned();
        if event_type == "job.progress" {
            assert_eq!(event["data"]["steps"], 2);
            assert_eq!(event["data"]["frames"], 3);
        }
        if event_type == "job.finished" {
            assert!(event["data"]["metric_id"].as_i64().is_some());
        }
        types.push(event_type);
        if types.last().unwrap() == "job.finished" {
            break;
        }
    }
    types.dedup();
    assert_eq!(
        types,
        [
            "job.queued",
            "job.started",
            "job.progress",
            "telemetry.generation",
            "job.finished"
        ]
    );
    app.stop().await;
}
