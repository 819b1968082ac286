//! The database lost for 30 s in the middle of a stream of jobs: PostgreSQL behind a TCP proxy
//! the test cuts, and the SQLite file under a write lock held from another connection.
//!
//! Meanwhile the service keeps what it holds, refuses new jobs with a 503 that says why once
//! `max_pending_jobs` are waiting or a job cannot be stored, and keeps answering reads. Once the
//! database is back every accepted job has exactly one row, checked in the database itself.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use sea_orm::sqlx::sqlite::SqliteConnectOptions;
use sea_orm::sqlx::{Connection, Executor, SqliteConnection};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::helpers::{
    AppOptions, CuttableProxy, TestApp, fresh_database, small_image, spawn_app_with,
};

/// Jobs waiting to be run or recorded beyond which the service refuses new ones.
const MAX_PENDING_JOBS: usize = 8;

/// How long the database stays out of reach.
const OUTAGE: Duration = Duration::from_secs(30);

/// The pace of the stream of jobs while the database is out of reach.
const SUBMIT_EVERY: Duration = Duration::from_millis(250);

/// Longer than any of the service's own database timeouts (5 s): a read that takes longer
/// waits on the database instead of answering from memory or failing.
const READ_ANSWERS_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test]
async fn postgres_cut_for_30_s_loses_no_row_and_duplicates_none() {
    let Some(database_url) = fresh_database().await else {
        // Needs SEIDRA_TEST_POSTGRES_URL.
        return;
    };
    let direct = reqwest::Url::parse(&database_url).unwrap();
    let server = format!(
        "{}:{}",
        direct.host_str().unwrap(),
        direct.port().unwrap_or(5432)
    );
    let mut proxy = CuttableProxy::start(server).await;
    let mut through_proxy = direct.clone();
    through_proxy.set_host(Some("127.0.0.1")).unwrap();
    through_proxy.set_port(Some(proxy.address.port())).unwrap();
    let app = spawn_app_with(AppOptions {
        database_url: Some(through_proxy.to_string()),
        max_pending_jobs: MAX_PENDING_JOBS,
        ..AppOptions::default()
    })
    .await;
    let rows = Database::connect(database_url.as_str()).await.unwrap();

    let seen = stream_through_outage(&app, &rows, &mut proxy).await;

    assert!(
        seen.telemetry_during.iter().all(|status| *status == 503),
        "the telemetry endpoint cannot read while the connection is cut: {:?}",
        seen.telemetry_during
    );
    seen.print("postgres, connection cut");
    app.stop().await;
    proxy.stop();
}

#[tokio::test]
async fn sqlite_write_lock_for_30_s_loses_no_row_and_duplicates_none() {
    let app = spawn_app_with(AppOptions {
        max_pending_jobs: MAX_PENDING_JOBS,
        ..AppOptions::default()
    })
    .await;
    if app.on_postgres() {
        // This test is about the embedded SQLite file.
        app.stop().await;
        return;
    }
    let database = app.data_dir.join("seidra.db");
    let rows = Database::connect(format!("sqlite://{}?mode=ro", database.display()))
        .await
        .unwrap();
    let mut lock = WriteLock {
        database,
        holder: None,
    };

    let seen = stream_through_outage(&app, &rows, &mut lock).await;

    // WAL: readers never wait for a writer, so the endpoint keeps serving committed rows.
    assert!(
        seen.telemetry_during.iter().all(|status| *status == 200),
        "the telemetry endpoint reads under a write lock: {:?}",
        seen.telemetry_during
    );
    seen.print("sqlite, write lock held");
    app.stop().await;
}

/// A way to put the database out of the service's reach, and back.
trait Outage {
    /// From now on the service cannot write.
    async fn begin(&mut self);
    /// From now on it can again.
    async fn end(&mut self);
}

impl Outage for CuttableProxy {
    async fn begin(&mut self) {
        self.cut().await;
    }

    async fn end(&mut self) {
        self.restore();
    }
}

/// A write transaction held on the SQLite file from a connection of its own.
struct WriteLock {
    database: PathBuf,
    holder: Option<SqliteConnection>,
}

impl Outage for WriteLock {
    async fn begin(&mut self) {
        // Waits for a commit of the service in progress, then keeps every other writer out.
        let options = SqliteConnectOptions::new()
            .filename(&self.database)
            .busy_timeout(Duration::from_secs(30));
        let mut holder = SqliteConnection::connect_with(&options).await.unwrap();
        holder.execute("BEGIN IMMEDIATE").await.unwrap();
        self.holder = Some(holder);
    }

    async fn end(&mut self) {
        let mut holder = self.holder.take().expect("the lock is held");
        holder.execute("ROLLBACK").await.unwrap();
        holder.close().await.unwrap();
    }
}

/// Why the service refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Refusal {
    /// `max_pending_jobs` are waiting to be run or recorded.
    Full,
    /// The job could not be stored.
    Storage,
}

/// The service's answer to one submission.
struct Submission {
    /// The job's id if it was accepted, why not otherwise.
    outcome: Result<String, Refusal>,
    /// When the answer came.
    answered: Instant,
}

/// Submits a small job; any answer but 202, or a 503 whose JSON body names the reason, fails.
async fn submit(app: &TestApp, seed: u64) -> Submission {
    submit_body(app, small_image(seed)).await
}

/// Submits `body`, as `submit` does.
async fn submit_body(app: &TestApp, body: Value) -> Submission {
    let response = app.submit_response(&body).await;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|error| panic!("submit answered {status} without a JSON body: {error}"));
    let outcome = match status.as_u16() {
        202 => Ok(body["job_id"].as_str().unwrap().to_owned()),
        503 => {
            assert_eq!(body["error"], "unavailable", "{body}");
            let message = body["message"].as_str().unwrap_or_default();
            if message.contains("jobs are waiting") {
                Err(Refusal::Full)
            } else if message.contains("could not be stored") {
                Err(Refusal::Storage)
            } else {
                panic!("a refused job is told why: {body}")
            }
        }
        _ => panic!("submit answers 202 or 503, not {status}: {body}"),
    };
    Submission {
        outcome,
        answered: Instant::now(),
    }
}

/// What the test saw, for its own assertions and the figures it prints.
struct Seen {
    before: Vec<Submission>,
    during: Vec<Submission>,
    restored: Instant,
    telemetry_during: Vec<u16>,
    most_pending: usize,
    drained_in: Duration,
    rows: usize,
}

impl Seen {
    fn print(&self, what: &str) {
        let count = |submissions: &[Submission], outcome: Option<Refusal>| {
            submissions
                .iter()
                .filter(|s| s.outcome.as_ref().err().copied() == outcome)
                .count()
        };
        let answered_after = self
            .during
            .iter()
            .filter(|s| s.answered > self.restored)
            .count();
        println!(
            "{what}: before: {} submitted, {} accepted, {} refused (full); during {OUTAGE:?}: \
             {} submitted ({answered_after} answered after the restore), {} accepted, \
             {} refused (full), {} refused (storage); telemetry during: {:?}; \
             most jobs waiting: {}; drained in {:?} after the restore; {} rows checked",
            self.before.len(),
            count(&self.before, None),
            count(&self.before, Some(Refusal::Full)),
            self.during.len(),
            count(&self.during, None),
            count(&self.during, Some(Refusal::Full)),
            count(&self.during, Some(Refusal::Storage)),
            self.telemetry_during,
            self.most_pending,
            self.drained_in,
            self.rows,
        );
    }
}

/// A burst of jobs, the outage in the middle of it, a stream of jobs during the outage, then
/// the drain. Checks on the way that jobs reported finished have their row and that no more
/// than `MAX_PENDING_JOBS` accepted jobs wait for one; at the end, that every accepted job has
/// exactly one row and that nothing else does.
async fn stream_through_outage(
    app: &TestApp,
    rows: &DatabaseConnection,
    outage: &mut impl Outage,
) -> Seen {
    // Jobs long enough that, when the first has ended, the others still wait for their rows
    // however busy the machine is.
    let burst = (0..2 * MAX_PENDING_JOBS as u64).map(|seed| {
        let mut body = small_image(seed);
        body["steps"] = 40.into();
        submit_body(app, body)
    });
    let before: Vec<Submission> = futures_util::future::join_all(burst).await;
    let accepted = Mutex::new(accepted_ids(&before));
    let mut watcher = Watcher::new(app, rows, &accepted);
    let first = accepted.lock().unwrap().first().cloned();
    app.wait_for_job(&first.expect("the first jobs are accepted"))
        .await;

    outage.begin().await;
    let lost = Instant::now();
    let waiting = watcher.check().await;
    assert!(
        waiting > 0,
        "the outage comes in the middle of the stream: jobs wait for their rows"
    );

    let (stop, stopped) = watch::channel(false);
    let submitting = keep_submitting(app, 1_000, stopped, &accepted);
    let mut telemetry_during = Vec::new();
    let watching = async {
        while lost.elapsed() < OUTAGE {
            telemetry_during.push(telemetry_status(app).await);
            watcher.check().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.send_replace(true);
        outage.end().await;
        Instant::now()
    };
    let (during, restored) = tokio::join!(submitting, watching);

    let all: Vec<String> = accepted.lock().unwrap().clone();
    for id in &all {
        let job = app.wait_for_job(id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let drained_in = restored.elapsed();
    watcher.check().await;
    let answer = app.telemetry("limit=1").await;
    assert_eq!(
        answer["summary"]["total"],
        all.len(),
        "{}",
        answer["summary"]
    );
    assert_one_row_per_job(rows, &all).await;

    assert!(
        during.len() > MAX_PENDING_JOBS,
        "more jobs are submitted during the outage than the bound"
    );
    let accepted_during = during
        .iter()
        .filter(|s| s.outcome.is_ok() && s.answered < restored)
        .count();
    assert!(
        accepted_during <= MAX_PENDING_JOBS,
        "{accepted_during} jobs accepted while the database was out of reach, over the bound"
    );
    Seen {
        before,
        during,
        restored,
        telemetry_during,
        most_pending: watcher.most_pending,
        drained_in,
        rows: all.len(),
    }
}

fn accepted_ids(submissions: &[Submission]) -> Vec<String> {
    submissions
        .iter()
        .filter_map(|s| s.outcome.as_ref().ok().cloned())
        .collect()
}

/// Submits a job every `SUBMIT_EVERY` without waiting for the answers, as independent clients
/// do, until `stop`; then waits for the answers still due.
async fn keep_submitting(
    app: &TestApp,
    first_seed: u64,
    mut stop: watch::Receiver<bool>,
    accepted: &Mutex<Vec<String>>,
) -> Vec<Submission> {
    let mut in_flight = FuturesUnordered::new();
    let mut answers = Vec::new();
    let mut ticks = tokio::time::interval(SUBMIT_EVERY);
    let mut seed = first_seed;
    let mut record = |answer: Submission| {
        if let Ok(id) = &answer.outcome {
            accepted.lock().unwrap().push(id.clone());
        }
        answers.push(answer);
    };
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                in_flight.push(submit(app, seed));
                seed += 1;
            }
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => record(answer),
            _ = stop.changed() => break,
        }
    }
    while let Some(answer) = in_flight.next().await {
        record(answer);
    }
    answers
}

/// The status of the telemetry endpoint; anything but 200 must be a 503 with a JSON error.
async fn telemetry_status(app: &TestApp) -> u16 {
    let response = tokio::time::timeout(
        READ_ANSWERS_WITHIN,
        app.telemetry_response("limit=5", Some(&app.token)),
    )
    .await
    .expect("the telemetry endpoint answers while the database is out of reach");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    if status != 200 {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "unavailable", "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    status
}

/// Follows the accepted jobs through the API and their rows in the database itself.
struct Watcher<'a> {
    app: &'a TestApp,
    rows: &'a DatabaseConnection,
    accepted: &'a Mutex<Vec<String>>,
    reported_finished: HashSet<String>,
    most_pending: usize,
}

impl<'a> Watcher<'a> {
    fn new(
        app: &'a TestApp,
        rows: &'a DatabaseConnection,
        accepted: &'a Mutex<Vec<String>>,
    ) -> Self {
        Watcher {
            app,
            rows,
            accepted,
            reported_finished: HashSet::new(),
            most_pending: 0,
        }
    }

    /// Reads the jobs not yet seen finished, then the rows: every job reported finished has its
    /// row, and no more than `MAX_PENDING_JOBS` accepted jobs wait for one. Answers how many do.
    async fn check(&mut self) -> usize {
        let accepted = self.accepted.lock().unwrap().clone();
        let mut newly_finished = Vec::new();
        for id in accepted
            .iter()
            .filter(|id| !self.reported_finished.contains(*id))
        {
            let job = tokio::time::timeout(READ_ANSWERS_WITHIN, self.app.job(id))
                .await
                .unwrap_or_else(|_| panic!("job {id} can be read while the database is lost"));
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                newly_finished.push(id.clone());
            }
        }

        let committed = committed_rows(self.rows).await;
        for id in &newly_finished {
            assert!(
                committed.contains_key(id),
                "job {id} is reported finished before its row is committed"
            );
        }
        self.reported_finished.extend(newly_finished);
        let pending = accepted
            .iter()
            .filter(|id| !committed.contains_key(*id))
            .count();
        assert!(
            pending <= MAX_PENDING_JOBS,
            "{pending} accepted jobs wait for their rows, over the bound of {MAX_PENDING_JOBS}"
        );
        self.most_pending = self.most_pending.max(pending);
        pending
    }
}

/// Rows in `generation_metrics` by job id, read in the database, not through the service.
async fn committed_rows(rows: &DatabaseConnection) -> HashMap<String, i64> {
    let statement = Statement::from_string(
        rows.get_database_backend(),
        "SELECT job_id, COUNT(*) AS n FROM generation_metrics GROUP BY job_id",
    );
    rows.query_all_raw(statement)
        .await
        .expect("the test reads the database directly")
        .into_iter()
        .map(|row| {
            (
                row.try_get("", "job_id").unwrap(),
                row.try_get("", "n").unwrap(),
            )
        })
        .collect()
}

/// Every accepted job has exactly one row, and no other job has any.
async fn assert_one_row_per_job(rows: &DatabaseConnection, accepted: &[String]) {
    let committed = committed_rows(rows).await;
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|id| !committed.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &i64)> = committed.iter().filter(|(_, n)| **n > 1).collect();
    let known: HashSet<&String> = accepted.iter().collect();
    let stray: Vec<&String> = committed.keys().filter(|id| !known.contains(id)).collect();
    assert!(missing.is_empty(), "rows lost: {missing:?}");
    assert!(duplicated.is_empty(), "rows duplicated: {duplicated:?}");
    assert!(
        stray.is_empty(),
        "rows of jobs that were refused: {stray:?}"
    );
}
