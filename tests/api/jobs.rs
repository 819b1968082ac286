//! Jobs end to end: submitted, measured, stored, served; outputs reproducible.

use futures_util::StreamExt;
use sea_orm::ConnectionTrait;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{TestApp, small_image, small_video, spawn_app};

#[tokio::test]
async fn an_image_job_and_a_video_job_finish_with_complete_rows() {
    let app = spawn_app().await;

    let image = app.submit(small_image(7)).await;
    let video = app.submit(small_video(8)).await;
    let image_job = app.wait_for_job(&image).await;
    let video_job = app.wait_for_job(&video).await;

    assert_eq!(image_job["status"], "succeeded", "{image_job}");
    assert_eq!(video_job["status"], "succeeded", "{video_job}");
    let row = &image_job["metrics"];
    assert_eq!(row["job_id"], image.as_str());
    assert_eq!(row["user_id"], "operator-1");
    assert_eq!(row["media_type"], "image");
    assert_eq!(row["model_name"], "seidra-tiny-diffusion");
    assert_eq!(row["prompt"], "a small test image");
    assert_eq!(row["outputs"], 1);
    assert_eq!(row["device"], "cpu");
    assert_eq!(row["host"], "test-host");
    assert_eq!(row["status"], "succeeded");
    let duration = row["duration_seconds"].as_f64().unwrap();
    assert!(duration > 0.0);
    let throughput = row["throughput"].as_f64().unwrap();
    assert!((throughput - 1.0 / duration).abs() < 1e-9 * throughput.max(1.0));
    assert!(row["queue_wait_seconds"].as_f64().unwrap() >= 0.0);
    for column in [
        "vram_allocated_mb",
        "vram_reserved_mb",
        "vram_peak_mb",
        "vram_delta_mb",
    ] {
        assert!(row[column].is_null(), "{column} is NULL on the CPU: {row}");
    }
    assert_eq!(row["extra"]["width"], 32);
    assert_eq!(row["extra"]["steps"], 3);
    assert_eq!(row["extra"]["seed"], 7);
    assert_eq!(row["extra"]["scheduler"], "ddim");
    let total = row["extra"]["total_seconds"].as_f64().unwrap();
    let wait = row["queue_wait_seconds"].as_f64().unwrap();
    assert!(
        total >= wait + duration,
        "submission to commit covers the wait and the inference: {total} < {wait} + {duration}"
    );

    let video_row = &video_job["metrics"];
    assert_eq!(video_row["outputs"], 3, "frames of the video");
    assert_eq!(video_row["extra"]["frames"], 3);
    assert_eq!(video_row["extra"]["fps"], 6);
    assert_eq!(video_job["files"][0]["name"], "video.gif");

    app.stop().await;
}

#[tokio::test]
async fn the_same_request_and_seed_give_the_same_bytes() {
    let app = spawn_app().await;
    let first = app.submit(small_image(42)).await;
    let second = app.submit(small_image(42)).await;
    let other = app.submit(small_image(43)).await;

    let mut bytes = Vec::new();
    for id in [&first, &second, &other] {
        let job = app.wait_for_job(id).await;
        let url = job["files"][0]["url"].as_str().unwrap().to_owned();
        let response = app
            .client
            .get(format!("{}{url}", app.base_url))
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "image/png");
        bytes.push(response.bytes().await.unwrap());
    }
    assert!(bytes[0].starts_with(b"\x89PNG"));
    assert_eq!(bytes[0], bytes[1], "same seed, same bytes");
    assert_ne!(bytes[0], bytes[2], "another seed, other bytes");
    app.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_with_the_field_named() {
    let app = spawn_app().await;
    let cases = [
        (
            json!({"media_type": "image", "prompt": "x", "width": 7}),
            "width",
        ),
        (
            json!({"media_type": "image", "prompt": "x", "steps": 0}),
            "steps",
        ),
        (json!({"media_type": "sound", "prompt": "x"}), "media_type"),
        (json!({"media_type": "image", "prompt": ""}), "prompt"),
        (
            json!({"media_type": "image", "prompt": "x", "model": "sdxl"}),
            "model",
        ),
        // Within every field's range, but its attention would need about 128 GiB.
        (
            json!({"media_type": "image", "prompt": "x", "width": 512, "height": 512, "images": 16}),
            "images",
        ),
        (
            json!({"media_type": "video", "prompt": "x", "width": 256, "height": 256, "frames": 120}),
            "frames",
        ),
        // Past 2^53 − 1 a seed is no longer exact in JavaScript clients.
        (
            json!({"media_type": "image", "prompt": "x", "seed": 9_007_199_254_740_992_u64}),
            "seed",
        ),
        // PostgreSQL's text and JSON take no NUL character; both backends refuse it alike.
        (
            json!({"media_type": "image", "prompt": "a\u{0}b"}),
            "prompt",
        ),
        (
            json!({"media_type": "image", "prompt": "x", "persona_id": "p\u{0}"}),
            "persona_id",
        ),
        (
            json!({"media_type": "image", "prompt": "x", "loras": [{"name": "a\u{0}"}]}),
            "name",
        ),
    ];
    for (body, field) in cases {
        let response = app
            .client
            .post(format!("{}/api/jobs", app.base_url))
            .bearer_auth(&app.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"], "bad_request");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(field), "`{message}` names `{field}`");
    }
    let huge = json!({"media_type": "image", "prompt": "x", "pad": "a".repeat(100_000)});
    let response = app.submit_response(&huge).await;
    assert_eq!(response.status(), 413);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"], "payload_too_large");
    // The same body sent in chunks, with no length announced.
    let address = app.base_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /api/jobs HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        app.token
    );
    let body = huge.to_string();
    let mut request = head.into_bytes();
    for chunk in body.as_bytes().chunks(8192) {
        request.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut answer = vec![0; 12];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), "HTTP/1.1 413");
    let jobs = app.db.query_one_raw(sea_orm::Statement::from_string(
        app.db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM generation_jobs",
    ));
    let jobs: i64 = jobs.await.unwrap().unwrap().try_get("", "n").unwrap();
    assert_eq!(jobs, 0, "no refused job is queued");
    app.stop().await;
}

#[tokio::test]
async fn a_user_reads_their_own_jobs_only() {
    let app = spawn_app().await;
    let id = app.submit(small_image(1)).await;
    let response = app
        .client
        .get(format!("{}/api/jobs/{id}", app.base_url))
        .bearer_auth(app.user_token("someone-else"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    app.wait_for_job(&id).await;
    app.stop().await;
}

#[tokio::test]
async fn a_stop_lets_the_running_job_finish_records_the_queued_ones_and_publishes_both() {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    use seidra::storage::entities::generation_metrics;

    let app = spawn_app().await;
    let running = app
        .submit(json!({"media_type": "image", "prompt": "long", "width": 32, "height": 32, "steps": 40, "seed": 1}))
        .await;
    let queued = app.submit(small_image(2)).await;
    for _ in 0..2000 {
        if app.job(&running).await["status"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let db = app.db.clone();
    let url = format!("{}?token={}", app.ws_url, app.token);
    let (mut channel, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    app.stop().await;

    // The channel's clients get both rows before the service closes them, going away.
    let mut published = Vec::new();
    let close = loop {
        match channel.next().await {
            Some(Ok(Message::Text(text))) => {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                if event["type"] == "telemetry.generation" {
                    published.push(event["data"]["job_id"].as_str().unwrap().to_owned());
                }
            }
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("the channel ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|frame| u16::from(frame.code)), Some(1001));
    assert!(
        published.contains(&running) && published.contains(&queued),
        "both rows were published before the close: {published:?}"
    );

    let rows = generation_metrics::Entity::find()
        .filter(generation_metrics::Column::JobId.is_in([running.clone(), queued.clone()]))
        .all(&db)
        .await
        .unwrap();
    let status = |id: &str| {
        rows.iter()
            .find(|row| row.job_id == id)
            .map(|row| row.status.clone())
    };
    assert_eq!(
        status(&running).as_deref(),
        Some("succeeded"),
        "the running job finished and has its row"
    );
    assert_eq!(
        status(&queued).as_deref(),
        Some("failed"),
        "the queued job is recorded"
    );
    let queued_row = rows.iter().find(|row| row.job_id == queued).unwrap();
    assert_eq!(queued_row.extra["error"]["kind"], "service_stopped");
}

/// Runs `seidra generate --json` for a small seeded image with `token`; its exit and output.
async fn run_generate(app: &TestApp, token: &str) -> std::process::Output {
    let base_url = app.base_url.clone();
    let token = token.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_seidra"))
            .args([
                "generate", "--json", "--width", "32", "--height", "32", "--steps", "3",
            ])
            .args([
                "--seed",
                "5",
                "--url",
                &base_url,
                "--token",
                &token,
                "a generated test image",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn assert_generated(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let job: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["metrics"]["extra"]["seed"], 5);
    assert_eq!(job["files"][0]["name"], "image-0.png");
}

#[tokio::test]
async fn seidra_generate_follows_a_job_to_its_end_and_prints_it() {
    let app = spawn_app().await;
    let output = run_generate(&app, &app.token).await;
    assert_generated(&output);
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("polling"),
        "an operator follows the job on the channel"
    );
    app.stop().await;
}

#[tokio::test]
async fn seidra_generate_with_a_user_token_follows_the_job_by_polling() {
    let app = spawn_app().await;
    let output = run_generate(&app, &app.user_token("user-7")).await;
    assert_generated(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not be opened") && stderr.contains("403"),
        "the refused channel is reported: {stderr}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_connection_whose_request_never_ends_is_closed_after_a_quiet_minute() {
    let app = spawn_app().await;
    let address = app.base_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        seidra::app::IDLE_CONNECTION + std::time::Duration::from_secs(15),
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(read.is_ok(), "the connection is still open");
    assert!(started.elapsed() >= seidra::app::IDLE_CONNECTION - std::time::Duration::from_secs(1));
    // The service goes on serving.
    assert_eq!(
        app.client
            .get(format!("{}/health", app.base_url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.stop().await;
}
