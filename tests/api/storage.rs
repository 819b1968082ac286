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
