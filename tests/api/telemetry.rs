//! The telemetry endpoint: filters, ordering, summary over the window, recent buffer.

use chrono::{DateTime, FixedOffset, SecondsFormat, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement, Value};
use seidra::storage::timestamp_parameter;
use serde_json::json;

use crate::doubles::FakeGpus;
use crate::helpers::{AppOptions, TestApp, small_image, small_video, spawn_app, spawn_app_with};

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
async fn out_of_range_and_unknown_parameters_get_400_naming_them_and_what_is_allowed() {
    let app = spawn_app().await;
    let text = "1 to 256 characters, none of them NUL";
    let cursor = "an item id (an integer from 1 to 999999999999999999) or an RFC 3339 time";
    for (query, parameter, allowed) in [
        ("limit=0", "limit", "an integer from 1 to 1000"),
        ("limit=1001", "limit", "an integer from 1 to 1000"),
        ("limit=abc", "limit", "an integer from 1 to 1000"),
        ("minutes=0", "minutes", "an integer from 1 to 5256000"),
        ("minutes=-5", "minutes", "an integer from 1 to 5256000"),
        ("media_type=audio", "media_type", "one of image, video"),
        (
            "status=running",
            "status",
            "one of succeeded, failed, cancelled",
        ),
        ("model_name=a%00", "model_name", text),
        ("user_id=%00", "user_id", text),
        ("persona_id=p%00", "persona_id", text),
        (
            "device=cpu%00",
            "device",
            "1 to 64 characters, none of them NUL",
        ),
        ("before=0", "before", cursor),
        ("before=-3", "before", cursor),
        ("before=abc", "before", cursor),
        ("before=99999999999999999999", "before", cursor),
        ("before=2026-13-01T00:00:00Z", "before", cursor),
        ("before=2026-12-04", "before", cursor),
        ("before=", "before", cursor),
        ("before=018", "before", cursor),
        ("before=1000000000000000000", "before", cursor),
        ("before=2026-02-29T00:00:00Z", "before", cursor),
        ("before=2100-02-29T00:00:00Z", "before", cursor),
        ("before=2026-04-31T00:00:00Z", "before", cursor),
        ("before=2026-12-04T24:00:00Z", "before", cursor),
        ("before=2026-12-04t16:00:00z", "before", cursor),
    ] {
        let response = app.telemetry_response(query, Some(&app.token)).await;
        assert_eq!(response.status(), 400, "?{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "bad_request", "?{query}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{parameter}: expected {allowed}")),
            "?{query}: {body}"
        );
    }
    // What the document's pattern for `before` admits is taken: real dates, leap days too.
    for before in [
        "999999999999999999",
        "2024-02-29T00:00:00Z",
        "2000-02-29T23:59:59.999999999%2B14:00",
        "2026-01-31T12:00:00.5-09:30",
        "9999-12-31T23:59:59-23:59",
    ] {
        let response = app
            .telemetry_response(&format!("before={before}"), Some(&app.token))
            .await;
        assert_eq!(response.status(), 200, "before={before}");
    }
    app.stop().await;
}

/// The ids of an answer's items, in order.
fn item_ids(answer: &serde_json::Value) -> Vec<i64> {
    answer["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_i64().unwrap())
        .collect()
}

/// Sets a row's commit time.
async fn set_created_at(app: &TestApp, id: i64, at: DateTime<Utc>) {
    let backend = app.db.get_database_backend();
    let (set, row) = match backend {
        DatabaseBackend::Postgres => ("$1", "$2"),
        _ => ("?", "?"),
    };
    app.db
        .execute_raw(Statement::from_sql_and_values(
            backend,
            format!("UPDATE generation_metrics SET created_at = {set} WHERE id = {row}"),
            [timestamp_parameter(backend, at), Value::from(id)],
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn before_pages_in_the_items_order_through_rows_that_share_a_time() {
    let app = spawn_app().await;
    for seed in 0..5 {
        let job = app.submit(small_image(seed)).await;
        app.wait_for_job(&job).await;
    }
    let mut ids = item_ids(&app.telemetry("").await);
    ids.sort();
    assert_eq!(ids.len(), 5);

    // Commit times out of id order, two of them shared, as hosts sharing a PostgreSQL database
    // give them (a row's time is its transaction's start, its id is drawn before the commit).
    let start = DateTime::from_timestamp_millis((Utc::now().timestamp() - 3600) * 1000).unwrap();
    let at = |seconds| start + TimeDelta::seconds(seconds);
    for (id, seconds) in ids.iter().zip([2, 1, 2, 1, 0]) {
        set_created_at(&app, *id, at(seconds)).await;
    }
    let newest_first = vec![ids[2], ids[0], ids[3], ids[1], ids[4]];
    assert_eq!(item_ids(&app.telemetry("limit=1000").await), newest_first);

    let mut seen: Vec<i64> = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let page = app.telemetry(&query).await;
        assert_eq!(page["summary"]["total"], 5, "the summary is of the window");
        let page = item_ids(&page);
        let Some(last) = page.last() else { break };
        assert!(page.len() <= 2);
        seen.extend(&page);
        assert!(seen.len() <= 5, "pages repeat rows: {seen:?}");
        query = format!("limit=2&before={last}");
    }
    assert_eq!(seen, newest_first, "every row once, in order");

    let before =
        |at: DateTime<Utc>| format!("before={}", at.to_rfc3339_opts(SecondsFormat::AutoSi, true));
    assert_eq!(
        item_ids(&app.telemetry(&before(at(2))).await),
        [ids[3], ids[1], ids[4]],
        "rows strictly older than the time"
    );
    assert_eq!(item_ids(&app.telemetry(&before(at(1))).await), [ids[4]]);
    assert_eq!(
        item_ids(
            &app.telemetry(&before(at(1) + TimeDelta::microseconds(500)))
                .await
        ),
        [ids[3], ids[1], ids[4]],
        "a finer time than the column's still leaves out only rows as new or newer"
    );
    let offset = at(2).with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap());
    assert_eq!(
        item_ids(
            &app.telemetry(&format!(
                "before={}",
                offset.to_rfc3339().replace('+', "%2B")
            ))
            .await
        ),
        [ids[3], ids[1], ids[4]],
        "a time with an offset is the same instant"
    );
    assert_eq!(
        item_ids(&app.telemetry("before=999999").await),
        Vec::<i64>::new(),
        "no row comes after an id no row has"
    );
    app.stop().await;
}

/// Submits a job with `token`; answers its id.
async fn submit_as(app: &TestApp, token: &str, body: serde_json::Value) -> String {
    let response = app
        .client
        .post(format!("{}/api/jobs", app.base_url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "submit {body}");
    let accepted: serde_json::Value = response.json().await.unwrap();
    accepted["job_id"].as_str().unwrap().to_owned()
}

/// An image job that follows `script` on a fake GPU, for `persona`.
fn scripted(script: &str, persona: Option<&str>) -> serde_json::Value {
    json!({"media_type": "image", "prompt": script, "width": 16, "height": 16, "steps": 1,
           "seed": 3, "persona_id": persona})
}

#[tokio::test]
async fn user_persona_device_and_status_filters_select_the_matching_items() {
    let gpus = FakeGpus::named(&["cuda:0", "cuda:1"]);
    let app = spawn_app_with(gpus.app_options()).await;
    let (alice, bob) = (app.user_token("alice"), app.user_token("bob"));
    let works = "alloc 16; steps 3 30";
    // Submitted before any ends, so that the two devices share them.
    let alice_works = submit_as(&app, &alice, scripted(works, Some("p-1"))).await;
    let alice_fails = submit_as(&app, &alice, scripted("alloc 16; step; fail boom", None)).await;
    let bob_works = submit_as(&app, &bob, scripted(works, Some("p-1"))).await;
    let bob_other = submit_as(&app, &bob, scripted(works, Some("p-2"))).await;
    let cancelled = app.submit(scripted("alloc 16; steps 200 20", None)).await;
    assert_eq!(app.cancel(&cancelled).await, 202);
    let jobs = [
        &alice_works,
        &alice_fails,
        &bob_works,
        &bob_other,
        &cancelled,
    ];
    for job in jobs {
        app.wait_for_job(job).await;
    }

    let all = app.telemetry("limit=1000").await;
    let all = all["items"].as_array().unwrap();
    assert_eq!(all.len(), 5);
    let jobs_of = |answer: &serde_json::Value| -> Vec<String> {
        answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["job_id"].as_str().unwrap().to_owned())
            .collect()
    };
    // The expected jobs, in the order of the unfiltered answer (newest first).
    let in_order = |jobs: &[&String]| -> Vec<String> {
        all.iter()
            .map(|item| item["job_id"].as_str().unwrap().to_owned())
            .filter(|job| jobs.contains(&job))
            .collect()
    };
    let on = |device: &str| -> Vec<&String> {
        jobs.into_iter()
            .filter(|job| {
                all.iter()
                    .any(|item| item["job_id"] == job.as_str() && item["device"] == device)
            })
            .collect()
    };
    let (on_first, on_second) = (on("cuda:0"), on("cuda:1"));
    assert!(
        !on_first.is_empty() && !on_second.is_empty(),
        "both devices ran jobs"
    );
    let cases: [(&str, Vec<&String>); 10] = [
        ("user_id=alice", vec![&alice_works, &alice_fails]),
        ("user_id=bob", vec![&bob_works, &bob_other]),
        ("user_id=carol", vec![]),
        ("persona_id=p-1", vec![&alice_works, &bob_works]),
        ("device=cuda:0", on_first),
        ("device=cuda:1", on_second),
        (
            "status=succeeded",
            vec![&alice_works, &bob_works, &bob_other],
        ),
        ("status=failed", vec![&alice_fails]),
        ("status=cancelled", vec![&cancelled]),
        (
            "user_id=bob&persona_id=p-2&status=succeeded",
            vec![&bob_other],
        ),
    ];
    for (query, expected) in cases {
        let answer = app.telemetry(query).await;
        let expected = in_order(&expected);
        assert_eq!(jobs_of(&answer), expected, "?{query}");
        assert_eq!(answer["summary"]["total"], expected.len(), "?{query}");
    }
    app.stop().await;
}

#[tokio::test]
async fn recent_is_filled_again_from_the_database_at_start() {
    let app = spawn_app().await;
    let mut jobs = Vec::new();
    let bodies: [fn(u64) -> serde_json::Value; 5] = [
        small_image,
        small_video,
        small_image,
        small_image,
        small_video,
    ];
    for (seed, body) in bodies.into_iter().enumerate() {
        let job = app.submit(body(seed as u64)).await;
        app.wait_for_job(&job).await;
        jobs.push(job);
    }
    let carried = app.telemetry("").await["recent"].clone();
    let carried = carried.as_array().unwrap();
    assert_eq!(carried.len(), 5);
    let data = |events: &[serde_json::Value]| -> Vec<serde_json::Value> {
        events.iter().map(|event| event["data"].clone()).collect()
    };

    // Three kept of five, oldest first, as the channel carried them.
    let app = app
        .restart(AppOptions {
            recent_size: 3,
            ..AppOptions::default()
        })
        .await;
    let recent = app.telemetry("").await["recent"].clone();
    let recent = recent.as_array().unwrap();
    assert!(recent.iter().all(|e| e["type"] == "telemetry.generation"));
    assert_eq!(
        data(recent),
        data(&carried[2..]),
        "the newest three, oldest first"
    );
    let media = |answer: serde_json::Value| -> Vec<String> {
        answer["recent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|event| event["data"]["job_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        media(app.telemetry("media_type=video").await),
        [jobs[4].clone()]
    );
    assert_eq!(
        media(app.telemetry("media_type=image").await),
        [jobs[2].clone(), jobs[3].clone()]
    );

    let app = app.restart(AppOptions::default()).await;
    let recent = app.telemetry("").await["recent"].clone();
    assert_eq!(data(recent.as_array().unwrap()), data(carried), "all five");
    app.stop().await;
}

#[tokio::test]
async fn a_get_with_a_large_body_is_answered_as_without_one() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(format!(
            "{}/api/system/telemetry/generation?limit=1",
            app.base_url
        ))
        .bearer_auth(&app.token)
        .body("a".repeat(100_000))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "413 is not among the route's answers"
    );
    app.stop().await;
}
