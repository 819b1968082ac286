//! The summary from pre-aggregated figures against the same figures computed here from the
//! rows, through every way the table changes: a bulk load, the writer, a `DELETE` by hand, the
//! retention purge.

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ConnectionTrait, EntityTrait, Statement, Value};
use seidra::storage::entities::generation_metrics;
use seidra::storage::{retention, rollup, timestamp_parameter};

use crate::helpers::{TestApp, small_image, spawn_app};

/// Windows checked, in minutes (`None`: no window). Each mixes rows of its first partial hour
/// with hour and day cells differently.
const WINDOWS: [Option<i64>; 5] = [None, Some(45), Some(150), Some(1500), Some(2900)];
/// Filters checked with each window.
const FILTERS: [&str; 5] = [
    "",
    "&media_type=video",
    "&model_name=model-b",
    "&device=cuda:1",
    "&status=failed",
];

/// Deterministic numbers in [0, 1).
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[(self.next() * choices.len() as f64) as usize]
    }
}

/// Inserts `rows` rows over the last three days with inference times from 50 ms to over an
/// hour, none within ten minutes of a checked window's start (the test takes less).
async fn load(app: &TestApp, rows: usize) {
    let backend = app.db.get_database_backend();
    let now = Utc::now();
    let mut numbers = Numbers(0x5eed_1234_abcd_0001);
    let near_an_edge = |age: f64| {
        WINDOWS
            .iter()
            .flatten()
            .any(|minutes| (age - *minutes as f64 * 60.0).abs() < 600.0)
    };
    let mut values = Vec::new();
    let mut tuples = Vec::new();
    let mut n = 0;
    while n < rows {
        let age = numbers.next() * 3.0 * 86_400.0;
        if near_an_edge(age) {
            continue;
        }
        let video = numbers.next() < 0.2;
        let status = match numbers.next() {
            r if r < 0.9 => "succeeded",
            r if r < 0.97 => "failed",
            _ => "cancelled",
        };
        let duration = (0.05f64.ln() + numbers.next() * (4_000f64.ln() - 0.05f64.ln())).exp();
        let succeeded = status == "succeeded";
        let row: [Value; 12] = [
            Value::from(format!("bulk-{n}")),
            Value::from(numbers.pick(&["alice", "bob"])),
            Value::from(if video { "video" } else { "image" }),
            Value::from(numbers.pick(&["model-a", "model-b"])),
            Value::from(duration),
            Value::from(succeeded.then(|| 1.0 / duration)),
            Value::from(succeeded.then(|| 1000.0 + numbers.next() * 8000.0)),
            timestamp_parameter(backend, now - Duration::milliseconds((age * 1000.0) as i64)),
            Value::from(status),
            Value::from(numbers.pick(&["cuda:0", "cuda:1"])),
            Value::from(numbers.next() * 10.0),
            Value::from("bulk-host"),
        ];
        let first = values.len();
        values.extend(row);
        let placeholders: Vec<String> = (first + 1..=values.len())
            .map(|i| match backend {
                sea_orm::DatabaseBackend::Postgres => format!("${i}"),
                _ => "?".to_owned(),
            })
            .collect();
        tuples.push(format!("({}, 'p', 1, '{{}}')", placeholders.join(", ")));
        n += 1;
        if tuples.len() == 100 || n == rows {
            let sql = format!(
                "INSERT INTO generation_metrics (job_id, user_id, media_type, model_name, \
                 duration_seconds, throughput, vram_peak_mb, created_at, status, device, \
                 queue_wait_seconds, host, prompt, outputs, extra) VALUES {}",
                tuples.join(", ")
            );
            app.db
                .execute_raw(Statement::from_sql_and_values(
                    backend,
                    sql,
                    std::mem::take(&mut values),
                ))
                .await
                .unwrap();
            tuples.clear();
        }
    }
}

/// The summary fields computed here from `rows`.
fn expected(rows: &[&generation_metrics::Model]) -> serde_json::Value {
    let mean = |values: Vec<f64>| {
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    let done: Vec<_> = rows
        .iter()
        .filter(|row| row.status == "succeeded")
        .collect();
    let mut durations: Vec<f64> = done.iter().map(|row| row.duration_seconds).collect();
    durations.sort_by(f64::total_cmp);
    let rank = |p: usize| {
        let n = durations.len();
        (n > 0).then(|| durations[(p * n).div_ceil(100).max(1) - 1])
    };
    let count = |status: &str| rows.iter().filter(|row| row.status == status).count();
    serde_json::json!({
        "total": rows.len(),
        "succeeded": count("succeeded"),
        "failed": count("failed"),
        "cancelled": count("cancelled"),
        "avg_duration_seconds": mean(durations.clone()),
        "min_duration_seconds": durations.first(),
        "max_duration_seconds": durations.last(),
        "p50_duration_seconds": rank(50),
        "p95_duration_seconds": rank(95),
        "p99_duration_seconds": rank(99),
        "avg_throughput": mean(done.iter().filter_map(|row| row.throughput).collect()),
        "avg_vram_peak_mb": mean(done.iter().filter_map(|row| row.vram_peak_mb).collect()),
        "avg_queue_wait_seconds": mean(rows.iter().map(|row| row.queue_wait_seconds).collect()),
    })
}

/// Compares one summary (or group) with the figures computed here; answers whether its
/// percentiles were exact.
fn compare(label: &str, answer: &serde_json::Value, expected: &serde_json::Value) -> bool {
    let exact = answer["percentiles_exact"].as_bool().unwrap();
    for (field, want) in expected.as_object().unwrap() {
        let got = &answer[field];
        match (got.as_f64(), want.as_f64()) {
            (Some(got), Some(want)) if field.starts_with('p') && !exact => assert!(
                (got - want).abs() <= rollup::PERCENTILE_RELATIVE_ERROR * want + 1e-12,
                "{label}: {field} {got} is not within 1 % of {want}"
            ),
            (Some(got), Some(want)) if field.starts_with("avg") => assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                "{label}: {field} {got} != {want}"
            ),
            _ => assert_eq!(got, want, "{label}: {field}"),
        }
    }
    exact
}

/// Checks every window and filter against the rows in the database; answers how many
/// summaries had estimated percentiles.
async fn check_all(app: &TestApp, stage: &str) -> usize {
    let rows = generation_metrics::Entity::find()
        .all(&app.db)
        .await
        .unwrap();
    let mut estimated = 0;
    for minutes in WINDOWS {
        for filter in FILTERS {
            let query = match minutes {
                Some(minutes) => format!("limit=1&minutes={minutes}{filter}"),
                None => format!("limit=1{filter}"),
            };
            let since: Option<DateTime<Utc>> = minutes.map(|m| Utc::now() - Duration::minutes(m));
            let answer = app.telemetry(&query).await;
            let summary = &answer["summary"];
            let selected: Vec<_> = rows
                .iter()
                .filter(|row| since.is_none_or(|since| row.created_at >= since))
                .filter(|row| matches_filter(row, filter))
                .collect();
            let label = format!("{stage}, ?{query}");
            if !compare(&label, summary, &expected(&selected)) {
                estimated += 1;
            }
            let by_model: fn(&generation_metrics::Model) -> String = |row| row.model_name.clone();
            let by_device: fn(&generation_metrics::Model) -> String = |row| row.device.clone();
            for (groups, key_of) in [("by_model", by_model), ("by_device", by_device)] {
                let mut keys: Vec<String> = selected.iter().map(|row| key_of(row)).collect();
                keys.sort();
                keys.dedup();
                let answered: Vec<&str> = summary[groups]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|group| group["key"].as_str().unwrap())
                    .collect();
                assert_eq!(answered, keys, "{label}: {groups}");
                for (group, key) in summary[groups].as_array().unwrap().iter().zip(&keys) {
                    let members: Vec<_> = selected
                        .iter()
                        .copied()
                        .filter(|row| &key_of(row) == key)
                        .collect();
                    compare(
                        &format!("{label}, {groups} {key}"),
                        group,
                        &expected(&members),
                    );
                }
            }
        }
    }
    estimated
}

fn matches_filter(row: &generation_metrics::Model, filter: &str) -> bool {
    match filter.trim_start_matches('&').split_once('=') {
        Some(("media_type", value)) => row.media_type == value,
        Some(("model_name", value)) => row.model_name == value,
        Some(("device", value)) => row.device == value,
        Some(("status", value)) => row.status == value,
        _ => true,
    }
}

#[tokio::test]
async fn summaries_from_the_rollup_match_the_rows_through_every_change() {
    let app = spawn_app().await;
    load(&app, 2_400).await;
    assert!(
        !rollup::is_current(&app.db).await.unwrap(),
        "rows loaded behind the writer's back leave the rollup behind"
    );
    assert_eq!(
        check_all(&app, "bulk load, from the rows").await,
        0,
        "summaries from the rows are exact"
    );

    let rebuilt = rollup::rebuild(&app.db).await.unwrap();
    assert_eq!(rebuilt.rows, 2_400);
    assert!(rollup::is_current(&app.db).await.unwrap());
    assert!(
        check_all(&app, "rebuilt").await > 0,
        "dense day cells keep only their histogram"
    );

    // The second job's row merges into the cell the first one created.
    for seed in [1, 2] {
        let id = app.submit(small_image(seed)).await;
        app.wait_for_job(&id).await;
    }
    assert!(
        rollup::is_current(&app.db).await.unwrap(),
        "the writer accounts for its rows"
    );
    assert_eq!(app.telemetry("limit=1").await["summary"]["total"], 2_402);
    check_all(&app, "after the writer").await;

    let backend = app.db.get_database_backend();
    let two_days_ago = Utc::now() - Duration::hours(50);
    app.db
        .execute_raw(Statement::from_sql_and_values(
            backend,
            match backend {
                sea_orm::DatabaseBackend::Postgres => {
                    "DELETE FROM generation_metrics WHERE created_at < $1"
                }
                _ => "DELETE FROM generation_metrics WHERE created_at < ?",
            },
            [timestamp_parameter(backend, two_days_ago)],
        ))
        .await
        .unwrap();
    assert!(
        !rollup::is_current(&app.db).await.unwrap(),
        "a DELETE by hand leaves the rollup behind"
    );
    assert_eq!(check_all(&app, "deleted by hand, from the rows").await, 0);
    rollup::catch_up(&app.db).await;
    assert!(rollup::is_current(&app.db).await.unwrap());
    check_all(&app, "deleted by hand, rebuilt").await;

    let cutoff = Utc::now() - Duration::hours(27);
    let removed = retention::purge_older_than(&app.db, cutoff, 100)
        .await
        .unwrap();
    assert!(removed > 0);
    assert!(
        rollup::is_current(&app.db).await.unwrap(),
        "the purge accounts for what it removes"
    );
    check_all(&app, "purged").await;
    app.stop().await;
}
