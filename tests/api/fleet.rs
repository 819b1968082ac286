//! Several hosts on one PostgreSQL database, and what survives a crash.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::helpers::{
    AppOptions, CuttableProxy, TestApp, fresh_database, get_json, small_image, spawn_app_with,
};

#[tokio::test]
async fn two_instances_on_one_database_see_each_others_rows_and_events() {
    let Some(shared) = fresh_database().await else {
        // Needs SEIDRA_TEST_POSTGRES_URL: several hosts share a PostgreSQL database.
        return;
    };
    let a = spawn_app_with(AppOptions {
        database_url: Some(shared.clone()),
        host_name: "host-a".to_owned(),
        ..AppOptions::default()
    })
    .await;
    let b = spawn_app_with(AppOptions {
        database_url: Some(shared),
        host_name: "host-b".to_owned(),
        ..AppOptions::default()
    })
    .await;
    let (mut on_b, _) = connect_async(format!("{}?token={}", b.ws_url, b.token))
        .await
        .unwrap();
    let (mut on_a, _) = connect_async(format!("{}?token={}", a.ws_url, a.token))
        .await
        .unwrap();

    let from_a = a.submit(small_image(1)).await;
    let from_b = b.submit(small_image(2)).await;
    a.wait_for_job(&from_a).await;
    b.wait_for_job(&from_b).await;

    for (socket, other_job, other_host) in [
        (&mut on_b, &from_a, "host-a"),
        (&mut on_a, &from_b, "host-b"),
    ] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let event = loop {
            let event = next_generation(socket, deadline).await;
            if event["data"]["job_id"] == other_job.as_str() {
                break event;
            }
        };
        assert_eq!(event["data"]["host"], other_host);
    }
    for app in [&a, &b] {
        let answer = app.telemetry("").await;
        let mut hosts: Vec<&str> = answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["host"].as_str().unwrap())
            .collect();
        hosts.sort();
        assert_eq!(hosts, ["host-a", "host-b"]);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn rows_another_host_commits_while_the_listener_is_cut_still_reach_the_channel_once() {
    let Some(shared) = fresh_database().await else {
        // Needs SEIDRA_TEST_POSTGRES_URL: several hosts share a PostgreSQL database.
        return;
    };
    let direct = reqwest::Url::parse(&shared).unwrap();
    let mut proxy = CuttableProxy::start(format!(
        "{}:{}",
        direct.host_str().unwrap(),
        direct.port().unwrap_or(5432)
    ))
    .await;
    let mut through_proxy = direct.clone();
    through_proxy.set_host(Some("127.0.0.1")).unwrap();
    through_proxy.set_port(Some(proxy.address.port())).unwrap();
    let a = spawn_host("host-a", shared).await;
    let b = spawn_host("host-b", through_proxy.to_string()).await;
    let mut on_b = follow(&b).await;
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(30);
    // B listens once it relays a row of A's.
    let before = a.submit(small_image(1)).await;
    a.wait_for_job(&before).await;
    assert_eq!(
        next_generation(&mut on_b, deadline()).await["data"]["job_id"],
        before.as_str()
    );

    // B's connections to the database, its listener's among them, are cut while A commits.
    proxy.cut().await;
    let missed = a.submit(small_image(2)).await;
    a.wait_for_job(&missed).await;
    proxy.restore();
    let after = a.submit(small_image(3)).await;
    a.wait_for_job(&after).await;

    let mut seen = Vec::new();
    let until = deadline();
    while !seen.contains(&after) {
        let event = next_generation(&mut on_b, until).await;
        seen.push(event["data"]["job_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        seen,
        [missed, after],
        "the row committed during the cut is published once, before the later one"
    );
    a.stop().await;
    b.stop().await;
    proxy.stop();
}

/// An instance named `host` on the database at `url`.
async fn spawn_host(host: &str, url: String) -> TestApp {
    spawn_app_with(AppOptions {
        database_url: Some(url),
        host_name: host.to_owned(),
        ..AppOptions::default()
    })
    .await
}

/// A client of `app`'s channel.
async fn follow(app: &TestApp) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
    let (socket, _) = connect_async(format!("{}?token={}", app.ws_url, app.token))
        .await
        .unwrap();
    socket
}

/// The next `telemetry.generation` event on `socket`, before `deadline`.
async fn next_generation(
    socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
    deadline: tokio::time::Instant,
) -> Value {
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("another host's row reaches the channel in time")
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            continue;
        };
        let event: Value = serde_json::from_str(&text).unwrap();
        if event["type"] == "telemetry.generation" {
            return event;
        }
    }
}

struct Service {
    child: Child,
    base_url: String,
}

fn start_service(data_dir: &std::path::Path, port: u16) -> Service {
    let child = Command::new(env!("CARGO_BIN_EXE_seidra"))
        .args(["serve", "--devices", "cpu", "--port", &port.to_string()])
        .arg("--data-dir")
        .arg(data_dir)
        .env("SEIDRA_JWT_SECRET", "crash-test-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    Service {
        child,
        base_url: format!("http://127.0.0.1:{port}"),
    }
}

async fn wait_until_up(client: &reqwest::Client, service: &Service) {
    for _ in 0..600 {
        if client
            .get(format!("{}/health", service.base_url))
            .send()
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the service did not come up");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn after_kill_9_the_database_is_sound_and_every_finished_job_has_its_row() {
    if fresh_database().await.is_some() {
        // This test is about the embedded SQLite file.
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let token = {
        let keys =
            seidra::api::auth::AuthKeys::new(&"crash-test-secret".to_owned().into()).unwrap();
        keys.mint(
            "crash",
            seidra::api::auth::Role::Operator,
            chrono::Duration::hours(1),
        )
        .unwrap()
    };
    let client = reqwest::Client::new();
    let mut service = start_service(data.path(), port);
    wait_until_up(&client, &service).await;

    let mut ids = Vec::new();
    for seed in 0..12 {
        let accepted: Value = client
            .post(format!("{}/api/jobs", service.base_url))
            .bearer_auth(&token)
            .json(&small_image(seed))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(accepted["job_id"].as_str().unwrap().to_owned());
    }
    // Kill the service once some jobs are reported finished and others are not.
    let mut finished = Vec::new();
    while finished.len() < 3 {
        finished.clear();
        for id in &ids {
            let job = get_json(
                &client,
                &token,
                &format!("{}/api/jobs/{id}", service.base_url),
            )
            .await;
            if job["status"] == "succeeded" {
                finished.push(id.clone());
            }
        }
    }
    service.child.kill().unwrap();
    service.child.wait().unwrap();
    assert!(
        finished.len() < ids.len(),
        "the kill came in the middle of the burst"
    );

    let database = data.path().join("seidra.db");
    let check = Command::new("sqlite3")
        .arg(&database)
        .arg("PRAGMA integrity_check;")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");

    let mut restarted = start_service(data.path(), port);
    wait_until_up(&client, &restarted).await;
    let url = format!(
        "{}/api/system/telemetry/generation?limit=1000",
        restarted.base_url
    );
    let answer = get_json(&client, &token, &url).await;
    let rows: Vec<&Value> = answer["items"].as_array().unwrap().iter().collect();
    for id in &finished {
        let row = rows.iter().find(|row| row["job_id"] == id.as_str());
        assert_eq!(
            row.expect("a finished job has its row")["status"],
            "succeeded"
        );
    }
    // Jobs the kill interrupted are recorded as failed at restart: every accepted job has a row.
    for id in &ids {
        let mut row = None;
        for _ in 0..200 {
            let job = get_json(
                &client,
                &token,
                &format!("{}/api/jobs/{id}", restarted.base_url),
            )
            .await;
            if !job["metrics"].is_null() {
                row = Some(job["metrics"].clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let row = row.unwrap_or_else(|| panic!("job {id} has a row after the restart"));
        if !finished.contains(id) && row["status"] == "failed" {
            assert_eq!(row["extra"]["error"]["kind"], "interrupted");
            // What is not known is said so, not given as a measurement.
            assert_eq!(row["queue_wait_seconds"], 0.0);
            assert_eq!(row["duration_seconds"], 0.0);
            assert!(
                row["extra"]["timings"]
                    .as_str()
                    .unwrap()
                    .starts_with("unknown")
            );
            // What is known: the time from submission to the row.
            let at = |field: &Value| {
                chrono::DateTime::parse_from_rfc3339(field.as_str().unwrap()).unwrap()
            };
            let lived =
                (at(&row["created_at"]) - at(&row["extra"]["submitted_at"])).as_seconds_f64();
            let total = row["extra"]["total_seconds"].as_f64().unwrap();
            assert!(
                (total - lived).abs() < 1.0,
                "total_seconds {total} against {lived} s from submission to the row"
            );
        }
    }
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();
}
