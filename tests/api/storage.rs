//! The procedure's own SQL, verbatim, on the service's SQLite file.

use std::process::Command;

use sea_orm::{ConnectionTrait, Statement};

use crate::helpers::{small_image, spawn_app};

fn sqlite3(database: &std::path::Path, sql: &str) -> String {
    let output = Command::new("sqlite3")
        .arg(database)
        .arg(sql)
        .output()
        .expect("the sqlite3 shell is installed");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn the_procedures_analysis_and_purge_queries_work_verbatim() {
    let app = spawn_app().await;
    if app.on_postgres() {
        // The procedure's SQL is SQLite's (`datetime('now', …)`).
        app.stop().await;
        return;
    }
    for seed in 0..4 {
        let id = app.submit(small_image(seed)).await;
        app.wait_for_job(&id).await;
    }
    // Age the rows: one 2 days old, one 40 days old, two from now.
    let backend = app.db.get_database_backend();
    for (id, age) in [(1, "-2 days"), (2, "-40 days")] {
        app.db
            .execute_raw(Statement::from_string(
                backend,
                format!("UPDATE generation_metrics SET created_at = strftime('%Y-%m-%d %H:%M:%f', created_at, '{age}') WHERE id = {id}"),
            ))
            .await
            .unwrap();
    }
    let database = app.data_dir.join("seidra.db");

    let analysis = sqlite3(
        &database,
        "SELECT model_name, avg(duration_seconds) AS avg_s, avg(vram_peak_mb) AS avg_vram
         FROM generation_metrics
         WHERE created_at >= datetime('now', '-1 day')
         GROUP BY model_name;",
    );
    let count_last_day = sqlite3(
        &database,
        "SELECT count(*) FROM generation_metrics WHERE created_at >= datetime('now', '-1 day');",
    );
    assert_eq!(
        count_last_day.trim(),
        "2",
        "rows from the last day: {analysis}"
    );
    assert!(analysis.starts_with("seidra-tiny-diffusion|"), "{analysis}");

    sqlite3(
        &database,
        "DELETE FROM generation_metrics WHERE created_at < datetime('now', '-30 day')",
    );
    let remaining = sqlite3(&database, "SELECT id FROM generation_metrics ORDER BY id;");
    assert_eq!(
        remaining.split_whitespace().collect::<Vec<_>>(),
        ["1", "3", "4"],
        "only the 40-day-old row is purged"
    );
    app.stop().await;
}

fn metric(n: usize) -> seidra::actors::NewMetric {
    seidra::actors::NewMetric {
        job_id: format!("writer-job-{n}"),
        user_id: "writer".into(),
        persona_id: None,
        media_type: "image".into(),
        model_name: "seidra-tiny-diffusion".into(),
        prompt: "concurrent".into(),
        outputs: 1,
        duration_seconds: 1.0,
        throughput: Some(1.0),
        vram_allocated_mb: None,
        vram_reserved_mb: None,
        vram_peak_mb: None,
        vram_delta_mb: None,
        extra: serde_json::json!({}),
        status: seidra::generation::JobStatus::Succeeded,
        device: "cpu".into(),
        queue_wait_seconds: 0.0,
        host: "test-host".into(),
    }
}

#[tokio::test]
async fn a_purge_running_while_50_writers_insert_loses_no_row_inside_the_window() {
    let app = spawn_app().await;
    let backend = app.db.get_database_backend();
    let old = if app.on_postgres() {
        "now() - interval '40 days'"
    } else {
        "strftime('%Y-%m-%d %H:%M:%f', 'now', '-40 days')"
    };
    for n in 0..3000 {
        app.db
            .execute_raw(Statement::from_string(
                backend,
                format!(
                    "INSERT INTO generation_metrics (job_id, user_id, media_type, model_name, prompt, outputs, \
                     duration_seconds, extra, created_at, status, device, queue_wait_seconds, host) \
                     VALUES ('old-{n}', 'old', 'image', 'm', 'p', 1, 1.0, '{{}}', {old}, 'succeeded', 'cpu', 0, 'h')"
                ),
            ))
            .await
            .unwrap();
    }

    let mut writers = Vec::new();
    for writer in 0..50 {
        let actor = app.runtime.writer.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..40 {
                let row = Box::new(metric(writer * 1000 + n));
                actor
                    .call(
                        |reply| seidra::actors::TelemetryWriterMessage::Append(row, reply),
                        None,
                    )
                    .await
                    .unwrap()
                    .success_or_else(|| "the writer did not answer")
                    .unwrap();
            }
        }));
    }
    let cutoff = chrono::Utc::now() - chrono::Duration::days(30);
    let removed = seidra::storage::retention::purge_older_than(&app.db, cutoff, 100)
        .await
        .unwrap();
    for writer in writers {
        writer.await.unwrap();
    }

    assert_eq!(removed, 3000);
    let count = |condition: &'static str| {
        let db = app.db.clone();
        async move {
            db.query_one_raw(Statement::from_string(
                backend,
                format!("SELECT COUNT(*) AS n FROM generation_metrics WHERE {condition}"),
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap()
        }
    };
    assert_eq!(count("user_id = 'old'").await, 0);
    assert_eq!(
        count("user_id = 'writer'").await,
        2000,
        "every row inside the window is kept"
    );
    app.stop().await;
}
