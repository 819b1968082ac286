//! The telemetry endpoint: filters, ordering, summary over the window, recent buffer.

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement, Value};
use seidra::storage::timestamp_parameter;

use crate::helpers::{small_image, small_video, spawn_app};

#[tokio::test]
async fn items_come_newest_first_with_a_summary_of_the_whole_window() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for seed in 0..3 {
        ids.push(app.submit(small_image(seed)).await);
    }
    ids.push(app.submit(small_video(9)).await);
    for id in &ids {
        app.wait_for_job(id).await;
    }

    let answer = app.telemetry("limit=2").await;
    let items = answer["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "limit applies to items");
    assert_eq!(items[0]["job_id"], ids[3].as_str(), "newest first");
    assert_eq!(items[1]["job_id"], ids[2].as_str());

    let summary = &answer["summary"];
    assert_eq!(
        summary["total"], 4,
        "the summary covers the window, not the page"
    );
    assert_eq!(summary["succeeded"], 4);
    assert_eq!(summary["failed"], 0);
    let all = app.telemetry("limit=1000").await;
    let durations: Vec<f64> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["duration_seconds"].as_f64().unwrap())
        .collect();
    let mean = durations.iter().sum::<f64>() / durations.len() as f64;
    assert!((summary["avg_duration_seconds"].as_f64().unwrap() - mean).abs() < 1e-9);
    let mut sorted = durations.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(summary["max_duration_seconds"].as_f64().unwrap(), sorted[3]);
    assert_eq!(
        summary["p50_duration_seconds"].as_f64().unwrap(),
        sorted[1],
        "nearest rank of 4"
    );
    assert!(
        summary["avg_vram_peak_mb"].is_null(),
        "no VRAM on the CPU: null, not 0"
    );
    assert_eq!(summary["by_model"][0]["key"], "seidra-tiny-diffusion");
    assert_eq!(summary["by_model"][0]["total"], 4);
    assert_eq!(summary["by_device"][0]["key"], "cpu");

    let recent = answer["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 4);
    assert_eq!(recent[3]["type"], "telemetry.generation");
    assert_eq!(recent[3]["data"]["job_id"], ids[3].as_str());

    let videos = app.telemetry("media_type=video").await;
    assert_eq!(videos["summary"]["total"], 1);
    assert_eq!(videos["items"][0]["media_type"], "video");
    assert_eq!(
        videos["recent"].as_array().unwrap().len(),
        1,
        "recent is filtered too"
    );

    app.stop().await;
}

#[tokio::test]
async fn an_empty_window_has_null_means() {
    let app = spawn_app().await;
    let answer = app.telemetry("minutes=60").await;
    assert_eq!(answer["items"].as_array().unwrap().len(), 0);
    assert_eq!(answer["summary"]["total"], 0);
    assert!(answer["summary"]["avg_duration_seconds"].is_null());
    assert!(answer["summary"]["avg_throughput"].is_null());
    app.stop().await;
}

#[tokio::test]
async fn minutes_selects_rows_by_commit_time() {
    let app = spawn_app().await;
    let old = app.submit(small_image(1)).await;
    app.wait_for_job(&old).await;
    // Move the first row two hours back, as if it had been committed then.
    let backend = app.db.get_database_backend();
    let sql = if app.on_postgres() {
        "UPDATE generation_metrics SET created_at = created_at - interval '2 hours'"
    } else {
        "UPDATE generation_metrics SET created_at = strftime('%Y-%m-%d %H:%M:%f', created_at, '-2 hours')"
    };
    app.db
        .execute_raw(Statement::from_string(backend, sql))
        .await
        .unwrap();
    let new = app.submit(small_image(2)).await;
    app.wait_for_job(&new).await;

    let hour = app.telemetry("minutes=60").await;
    assert_eq!(hour["summary"]["total"], 1);
    assert_eq!(hour["items"][0]["job_id"], new.as_str());
    let day = app.telemetry("minutes=1440").await;
    assert_eq!(day["summary"]["total"], 2);
    app.stop().await;
}

#[tokio::test]
async fn answers_follow_every_change_to_the_table_and_rows_leaving_the_window() {
    let app = spawn_app().await;
    let backend = app.db.get_database_backend();
    let first = app.submit(small_image(1)).await;
    app.wait_for_job(&first).await;
    assert_eq!(app.telemetry("minutes=60").await["summary"]["total"], 1);
    assert_eq!(app.telemetry("minutes=60").await["summary"]["total"], 1);

    // A change the service does not make itself, as the `sqlite3` shell or another host would.
    app.db
        .execute_raw(Statement::from_string(
            backend,
            "DELETE FROM generation_metrics",
        ))
        .await
        .unwrap();
    let answer = app.telemetry("minutes=60").await;
    assert_eq!(answer["summary"]["total"], 0);
    assert_eq!(answer["items"].as_array().unwrap().len(), 0);

    // A row that leaves the 60-minute window five seconds from now, with no change meanwhile.
    let second = app.submit(small_image(2)).await;
    app.wait_for_job(&second).await;
    let leaves_at = Utc::now() + chrono::Duration::seconds(5);
    let created_at = leaves_at - chrono::Duration::minutes(60);
    let (set, job) = match backend {
        DatabaseBackend::Postgres => ("$1", "$2"),
        _ => ("?", "?"),
    };
    app.db
        .execute_raw(Statement::from_sql_and_values(
            backend,
            format!("UPDATE generation_metrics SET created_at = {set} WHERE job_id = {job}"),
            [
                timestamp_parameter(backend, created_at),
                Value::from(second.clone()),
            ],
        ))
        .await
        .unwrap();
    for _ in 0..2 {
        let answer = app.telemetry("minutes=60").await;
        assert!(
            Utc::now() < leaves_at,
            "the machine is too slow for this test"
        );
        assert_eq!(answer["summary"]["total"], 1);
        assert_eq!(answer["items"][0]["job_id"], second.as_str());
    }
    let wait = (leaves_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + std::time::Duration::from_millis(100)).await;
    let answer = app.telemetry("minutes=60").await;
    assert_eq!(answer["summary"]["total"], 0, "the row has left the window");
    assert_eq!(answer["items"].as_array().unwrap().len(), 0);
    assert_eq!(
        app.telemetry("minutes=61").await["summary"]["total"],
        1,
        "a longer window still holds it"
    );
    app.stop().await;
}

#[tokio::test]
async fn out_of_range_and_unknown_parameters_get_400_naming_them() {
    let app = spawn_app().await;
    for (query, parameter) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=abc", "limit"),
        ("minutes=0", "minutes"),
        ("minutes=-5", "minutes"),
        ("media_type=audio", "media_type"),
        ("status=running", "status"),
        ("model_name=a%00", "model_name"),
        ("user_id=%00", "user_id"),
        ("persona_id=p%00", "persona_id"),
        ("device=cpu%00", "device"),
    ] {
        let response = app.telemetry_response(query, Some(&app.token)).await;
        assert_eq!(response.status(), 400, "?{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(parameter),
            "?{query}: {body}"
        );
    }
    app.stop().await;
}
