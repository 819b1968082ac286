//! The channel `system` under load and at its edges: many clients each getting every message,
//! a client that stops reading, catching up after a reconnect, tokens, and shutdown.
//!
//! Messages are published straight into the service's real BroadcastActor through
//! `app.runtime.broadcast`, so a test controls how many there are and when they come; the path
//! from the actor to the socket is the one real jobs take.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use seidra::actors::BroadcastMessage;
use seidra::api::auth::{AuthKeys, Role};
use seidra::events::{EventType, JobEvent};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tracing_subscriber::layer::SubscriberExt;

use crate::helpers::{
    AppOptions, CuttableProxy, TestApp, fresh_database, small_image, spawn_app_with,
};

/// A client of the channel.
pub type Socket = WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long any one wait for a condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(120);

/// `job_id` of the message that tells readers a burst is over.
const END: &str = "end";

/// Connects to the channel with `token` and an extra query string (`&after_seq=3`).
pub async fn connect_with(app: &TestApp, token: &str, query: &str) -> Socket {
    let url = format!("{}?token={token}{query}", app.ws_url);
    connect_async(url).await.expect("the upgrade succeeds").0
}

/// The next text message as JSON; pings are answered by the client library and skipped.
pub async fn next_json<S>(socket: &mut WebSocketStream<S>) -> Value
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match next_frame(socket).await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("a text message was due, got {other:?}"),
        }
    }
}

/// The next frame, whatever it is; fails the test if none comes before the deadline.
async fn next_frame<S>(
    socket: &mut WebSocketStream<S>,
) -> Option<Result<Message, tungstenite::Error>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(DEADLINE, socket.next())
        .await
        .expect("a frame or the end of the stream in time")
}

/// The close frame that ends the connection, skipping the messages before it.
async fn closing_frame(socket: &mut Socket) -> CloseFrame {
    loop {
        match next_frame(socket).await {
            Some(Ok(Message::Close(Some(frame)))) => return frame,
            Some(Ok(Message::Close(None))) => panic!("a close frame without a code"),
            Some(Ok(_)) => {}
            other => panic!("the server ended without a close frame: {other:?}"),
        }
    }
}

/// A `job.progress` message numbered by `step`, with `padding` bytes of filler.
fn progress(job_id: &str, step: u32, padding: usize) -> BroadcastMessage {
    let event = JobEvent {
        job_id: job_id.to_owned(),
        user_id: "operator-1".to_owned(),
        media_type: "image".to_owned(),
        model_name: "seidra-tiny-diffusion".to_owned(),
        device: Some("cpu".to_owned()),
        step: Some(step),
        steps: Some(u32::MAX),
        frames_done: None,
        frames: None,
        metric_id: None,
        // The channel carries any JobEvent; a long `error` makes a message big without
        // changing its shape.
        error: (padding > 0).then(|| "x".repeat(padding)),
    };
    BroadcastMessage::PublishJob(EventType::JobProgress, Box::new(event))
}

fn publish(app: &TestApp, message: BroadcastMessage) {
    app.runtime
        .broadcast
        .cast(message)
        .expect("the broadcast actor runs");
}

/// Publishes `count` numbered messages (steps `first..first + count`).
fn publish_burst(app: &TestApp, first: u32, count: u32, padding: usize) {
    for step in first..first + count {
        publish(app, progress("burst", step, padding));
    }
}

/// The number after `"name":` in a message's text. Readers of big messages use it instead of
/// parsing the whole message, so that the test spends its time in the service, not in JSON.
fn field_u64(text: &str, name: &str) -> Option<u64> {
    let key = format!("\"{name}\":");
    let start = text.rfind(&key)? + key.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Microseconds from a message's `emitted_at` to now, read without parsing the message.
fn latency_micros(text: &str) -> Option<i64> {
    let key = "\"emitted_at\":\"";
    let start = text.rfind(key)? + key.len();
    let end = start + text[start..].find('"')?;
    let emitted_at = chrono::DateTime::parse_from_rfc3339(&text[start..end]).ok()?;
    (chrono::Utc::now() - emitted_at.with_timezone(&chrono::Utc)).num_microseconds()
}

/// One message a reader got.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    seq: u64,
    step: u64,
    latency_micros: i64,
}

/// What one reader got, in order of arrival.
type Received = Vec<Delivery>;

/// Reads until the `END` message; counts what it received in `count` as it goes.
async fn read_until_end<S>(mut socket: WebSocketStream<S>, count: Arc<AtomicU64>) -> Received
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut received = Vec::new();
    loop {
        let text = match next_frame(&mut socket).await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("reader {} ended early: {other:?}", received.len()),
        };
        if text.contains(&format!("\"job_id\":\"{END}\"")) {
            return received;
        }
        received.push(Delivery {
            seq: field_u64(&text, "seq").expect("a seq"),
            step: field_u64(&text, "step").expect("a step"),
            latency_micros: latency_micros(&text).expect("an emitted_at"),
        });
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Fails unless `received` holds steps `0..expected` on consecutive seqs; answers the first.
fn assert_complete(received: &Received, expected: u64, who: &str) -> u64 {
    let steps: Vec<u64> = received.iter().map(|delivery| delivery.step).collect();
    assert!(
        steps.iter().copied().eq(0..expected),
        "{who}: got {} messages, expected steps 0..{expected} in order",
        steps.len()
    );
    let first = received[0].seq;
    let seqs = received.iter().map(|delivery| delivery.seq);
    assert!(
        seqs.eq(first..first + expected),
        "{who}: seqs are not consecutive"
    );
    first
}

/// Waits until every counter reaches `target`.
async fn wait_for_counts(counts: &[Arc<AtomicU64>], target: u64, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    while counts
        .iter()
        .any(|count| count.load(Ordering::Relaxed) < target)
    {
        let behind = counts
            .iter()
            .filter(|count| count.load(Ordering::Relaxed) < target)
            .count();
        assert!(
            Instant::now() < deadline,
            "{what}: {behind} readers short of {target}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_each_receive_every_message_of_a_burst_in_order() {
    const CLIENTS: usize = 200;
    const BURST: u32 = 1000;
    let app = spawn_app_with(AppOptions {
        client_queue: 2048,
        ..AppOptions::default()
    })
    .await;

    // A client is subscribed once its upgrade has been answered.
    let sockets: Vec<Socket> = futures_util::stream::iter(0..CLIENTS)
        .map(|_| connect_with(&app, &app.token, ""))
        .buffer_unordered(20)
        .collect()
        .await;
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|socket| tokio::spawn(read_until_end(socket, Arc::default())))
        .collect();

    publish_burst(&app, 0, BURST, 0);
    publish(&app, progress(END, 0, 0));

    let mut firsts = Vec::new();
    for (index, reader) in readers.into_iter().enumerate() {
        let received = tokio::time::timeout(DEADLINE, reader)
            .await
            .expect("every reader gets the burst in time")
            .expect("the reader does not panic");
        firsts.push(assert_complete(
            &received,
            u64::from(BURST),
            &format!("client {index}"),
        ));
    }
    firsts.dedup();
    assert_eq!(firsts.len(), 1, "every client saw the same seqs");
    app.stop().await;
}

/// The server's end of the TCP connection from `client_port` to `server_port`, from
/// `/proc/net/tcp`: its state (1 is ESTABLISHED) and the bytes written to it that the client
/// has not acknowledged. `None` once the kernel has forgotten it.
fn server_end(server_port: u16, client_port: u16) -> Option<(u8, u64)> {
    let port = |address: &str| {
        let hex = address.rsplit(':').next()?;
        u16::from_str_radix(hex, 16).ok()
    };
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp (Linux)");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if port(fields[1])? != server_port || port(fields[2])? != client_port {
            return None;
        }
        let state = u8::from_str_radix(fields[3], 16).ok()?;
        let unacknowledged = u64::from_str_radix(fields[4].split(':').next()?, 16).ok()?;
        Some((state, unacknowledged))
    })
}

const TCP_ESTABLISHED: u8 = 1;

/// Whether the last two readings of a socket's unacknowledged bytes are equal and not zero.
fn stopped_growing(readings: &[u64]) -> bool {
    matches!(readings, [.., before, last] if before == last && *last > 0)
}

/// A client of the channel whose receive buffer is small and fixed, so that the kernel does
/// not grow it, and that reads nothing until the test makes it; answers it and its port.
async fn stalled_client(app: &TestApp) -> (Socket, u16) {
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp
        .connect(format!("127.0.0.1:{}", app_port(app)).parse().unwrap())
        .await
        .unwrap();
    let port = tcp.local_addr().unwrap().port();
    let request = format!("{}?token={}", app.ws_url, app.token)
        .into_client_request()
        .unwrap();
    let (socket, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
        .await
        .expect("the upgrade succeeds");
    (socket, port)
}

fn app_port(app: &TestApp) -> u16 {
    app.base_url.rsplit(':').next().unwrap().parse().unwrap()
}

/// The 99th percentile of the readers' latencies for the messages with steps in `steps`, µs.
fn p99_micros(received: &[Received], steps: std::ops::Range<u64>) -> i64 {
    let mut latencies: Vec<i64> = received
        .iter()
        .flatten()
        .filter(|delivery| steps.contains(&delivery.step))
        .map(|delivery| delivery.latency_micros)
        .collect();
    assert!(!latencies.is_empty(), "no message with steps {steps:?}");
    latencies.sort_unstable();
    latencies[(latencies.len() - 1) * 99 / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_the_others_miss_nothing() {
    const READERS: usize = 50;
    const QUEUE: u32 = 256;
    // Big messages fill the stalled client's socket buffers in a few hundred messages.
    const PADDING: usize = 16 * 1024;
    // Published between two checks that every reader is up to date: an eighth of the queue,
    // so that a reader that keeps reading never lags, and the stalled client, which has at
    // most two chunks waiting once its socket is full, is not closed before the test says.
    const CHUNK: u32 = QUEUE / 8;
    // Messages published with the readers alone, to compare their latency with.
    const BASELINE: u32 = 4 * CHUNK;
    // Messages published while the stalled client's socket is full and it is still served.
    const BESIDE: u32 = 3 * CHUNK;
    // A send that waits longer than the test would never end: only falling more than its
    // queue behind may close the stalled client, and a reader on a busy machine is never
    // taken for a lagging one.
    let app = spawn_app_with(AppOptions {
        client_queue: QUEUE as usize,
        client_send_timeout_seconds: 3600,
        ..AppOptions::default()
    })
    .await;
    let server_port = app_port(&app);

    let counts: Vec<Arc<AtomicU64>> = (0..READERS).map(|_| Arc::default()).collect();
    let mut readers = Vec::new();
    for count in &counts {
        let socket = connect_with(&app, &app.token, "").await;
        readers.push(tokio::spawn(read_until_end(socket, Arc::clone(count))));
    }
    let mut published = 0;
    while published < BASELINE {
        publish_burst(&app, published, CHUNK, PADDING);
        published += CHUNK;
        wait_for_counts(&counts, u64::from(published), "before the stalled client").await;
    }

    let (mut stalled, stalled_port) = stalled_client(&app).await;

    // Until the server's end of the stalled connection holds all the kernel lets it and the
    // task serving it is stuck in a send: the bytes it has not had acknowledged stop growing.
    let mut unacknowledged = Vec::new();
    while !stopped_growing(&unacknowledged) {
        assert!(
            published < 4096,
            "the stalled socket never filled: {unacknowledged:?}"
        );
        publish_burst(&app, published, CHUNK, PADDING);
        published += CHUNK;
        wait_for_counts(&counts, u64::from(published), "filling the stalled socket").await;
        let (state, bytes) =
            server_end(server_port, stalled_port).expect("the stalled connection is open");
        assert_eq!(state, TCP_ESTABLISHED);
        unacknowledged.push(bytes);
    }

    // Less than the stalled client's queue, while its task waits on the socket: the readers
    // get all of it and the stalled client is still connected when they have, so nothing
    // the readers got waited for the stalled client to be dropped.
    let full_from = published;
    while published < full_from + BESIDE {
        publish_burst(&app, published, CHUNK, PADDING);
        published += CHUNK;
        wait_for_counts(&counts, u64::from(published), "beside the stalled client").await;
    }
    assert_eq!(
        server_end(server_port, stalled_port).map(|(state, _)| state),
        Some(TCP_ESTABLISHED),
        "the stalled client was still being waited on when the readers had everything"
    );

    // More than its queue holds: the stalled client falls behind and is closed.
    let lagging_from = published;
    while published <= lagging_from + QUEUE {
        publish_burst(&app, published, CHUNK, PADDING);
        published += CHUNK;
        wait_for_counts(
            &counts,
            u64::from(published),
            "past the stalled client's queue",
        )
        .await;
    }
    publish(&app, progress(END, 0, 0));
    let mut received = Vec::new();
    for (index, reader) in readers.into_iter().enumerate() {
        let got = reader.await.expect("the reader does not panic");
        assert_complete(&got, u64::from(published), &format!("reader {index}"));
        received.push(got);
    }

    // The readers' latency while the stalled client's socket was full is that of the
    // readers alone, within what a busy machine adds.
    let baseline = p99_micros(&received, 0..u64::from(BASELINE));
    let beside = p99_micros(
        &received,
        u64::from(full_from)..u64::from(full_from + BESIDE),
    );
    assert!(
        beside <= (2 * baseline).max(baseline + 50_000),
        "p99 latency {beside} µs beside the stalled client, {baseline} µs without it"
    );

    // The server gives up on the stalled client: its end leaves ESTABLISHED (FIN_WAIT1 with
    // the unsent bytes, then gone).
    let deadline = Instant::now() + DEADLINE;
    while server_end(server_port, stalled_port).map(|(state, _)| state) == Some(TCP_ESTABLISHED) {
        assert!(
            Instant::now() < deadline,
            "the stalled client was never disconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Reading now, the stalled client finds an unbroken prefix of the messages, then the end
    // of the connection: the close frame waited behind the messages it did not read.
    let mut seqs = Vec::new();
    let ending = loop {
        match next_frame(&mut stalled).await {
            Some(Ok(Message::Text(text))) => {
                if let Some(seq) = field_u64(&text, "seq") {
                    seqs.push(seq);
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => break other,
        }
    };
    match &ending {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4008),
        Some(Ok(message)) => panic!("unexpected message {message:?}"),
        // The close frame could not be written either: the connection was dropped.
        None | Some(Err(_)) => {}
    }
    assert!(
        (seqs.len() as u64) < u64::from(published - BASELINE),
        "the stalled client got only part of the messages, got {}",
        seqs.len()
    );
    if let Some(&first) = seqs.first() {
        assert!(
            seqs.iter().copied().eq(first..first + seqs.len() as u64),
            "what the stalled client got has no gap"
        );
    }
    app.stop().await;
}

/// Warn lines logged on the thread that installed it, as `field=value` text.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        let mut line = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                line.push_str(&format!("{}={value:?} ", field.name()));
            },
        );
        self.0.lock().unwrap().push(line);
    }
}

impl Warnings {
    /// The lines that name `127.0.0.1:port`.
    fn naming(&self, port: u16) -> Vec<String> {
        let address = format!("127.0.0.1:{port}");
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .filter(|line| line.contains(&address))
            .cloned()
            .collect()
    }
}

// One thread: the service's tasks run where the test installed its log capture.
#[tokio::test]
async fn a_client_more_than_its_queue_behind_gets_4008_and_one_warning_with_its_address() {
    const QUEUE: u32 = 16;
    const PADDING: usize = 16 * 1024;
    const CHUNK: u32 = 4;
    let warnings = Warnings::default();
    let _capture =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    // Only falling behind may close the client, not a send that takes long.
    let app = spawn_app_with(AppOptions {
        client_queue: QUEUE as usize,
        client_send_timeout_seconds: 3600,
        ..AppOptions::default()
    })
    .await;
    let (mut stalled, port) = stalled_client(&app).await;
    let count = Arc::<AtomicU64>::default();
    let pacer = tokio::spawn(read_until_end(
        connect_with(&app, &app.token, "").await,
        Arc::clone(&count),
    ));

    // Until the service gives up on the client that does not read.
    let mut published = 0;
    while warnings.naming(port).is_empty() {
        assert!(published < 8192, "the stalled client never lagged");
        publish_burst(&app, published, CHUNK, PADDING);
        published += CHUNK;
        wait_for_counts(&[Arc::clone(&count)], u64::from(published), "the pacer").await;
    }

    // Reading again, it gets an unbroken prefix of the messages, then the close frame.
    let mut seqs = Vec::new();
    let frame = loop {
        match next_frame(&mut stalled).await {
            Some(Ok(Message::Text(text))) => seqs.push(field_u64(&text, "seq").expect("a seq")),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(Some(frame)))) => break frame,
            other => panic!("a close frame was due, got {other:?}"),
        }
    };
    assert_eq!(u16::from(frame.code), 4008, "{frame:?}");
    assert!(frame.reason.contains("lagged"), "{frame:?}");
    assert!(
        matches!(
            next_frame(&mut stalled).await,
            None | Some(Ok(Message::Close(_)))
        ),
        "the connection ends after the close"
    );
    assert!((seqs.len() as u64) < u64::from(published));
    if let Some(&first) = seqs.first() {
        assert!(
            seqs.iter().copied().eq(first..first + seqs.len() as u64),
            "what the stalled client got has no gap"
        );
    }

    let lines = warnings.naming(port);
    assert_eq!(lines.len(), 1, "one warning for the client: {lines:#?}");
    assert!(lines[0].contains("lagged"), "{}", lines[0]);

    publish(&app, progress(END, 0, 0));
    assert_complete(&pacer.await.unwrap(), u64::from(published), "the pacer");
    app.stop().await;
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_closed_within_two_intervals() {
    const HEARTBEAT: Duration = Duration::from_secs(1);
    let app = spawn_app_with(AppOptions {
        heartbeat_seconds: HEARTBEAT.as_secs(),
        ..AppOptions::default()
    })
    .await;
    // The client library answers a ping when it reads: this one never reads.
    let (_silent, silent_port) = stalled_client(&app).await;
    let connected = Instant::now();
    // A peer that reads, and so answers, stays connected through more pings than that.
    let mut alive = connect_with(&app, &app.token, "").await;
    let alive = tokio::spawn(async move {
        let mut pings = 0;
        while pings < 4 {
            match next_frame(&mut alive).await {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("a ping was due, got {other:?}"),
            }
        }
        alive
    });

    let deadline = connected + 2 * HEARTBEAT + Duration::from_secs(2);
    while server_end(app_port(&app), silent_port).map(|(state, _)| state) == Some(TCP_ESTABLISHED) {
        assert!(
            Instant::now() < deadline,
            "the silent peer is still connected {:?} after it connected",
            connected.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        connected.elapsed() >= HEARTBEAT,
        "closed after {:?}, before it could answer a ping",
        connected.elapsed()
    );

    let mut alive = alive.await.expect("the answering peer got its pings");
    publish(&app, progress("still here", 0, 0));
    assert_eq!(next_json(&mut alive).await["data"]["job_id"], "still here");
    app.stop().await;
}

#[tokio::test]
async fn a_client_of_an_earlier_run_is_told_to_reload_after_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let database_url = match fresh_database().await {
        Some(url) => url,
        None => format!(
            "sqlite://{}?mode=rwc",
            directory.path().join("restart.db").display()
        ),
    };
    let options = || AppOptions {
        database_url: Some(database_url.clone()),
        ..AppOptions::default()
    };

    let before = spawn_app_with(options()).await;
    let mut socket = connect_with(&before, &before.token, "").await;
    let mut ids = Vec::new();
    for seed in 0..3 {
        let id = before.submit(small_image(seed)).await;
        before.wait_for_job(&id).await;
        ids.push(id);
    }
    let mut seen = Vec::new();
    while seen.last().is_none_or(|event: &Value| {
        event["data"]["job_id"] != ids[2].as_str() || event["type"] != "job.finished"
    }) {
        seen.push(next_json(&mut socket).await);
    }
    drop(socket);
    before.stop().await;

    // The new run holds the three rows again, under numbers of its own.
    let after = spawn_app_with(options()).await;
    let first_seen = seen[0]["seq"].as_u64().unwrap();
    let last_seen = seen.last().unwrap()["seq"].as_u64().unwrap();
    let mut sockets = Vec::new();
    for after_seq in [first_seen, last_seen] {
        sockets.push(connect_with(&after, &after.token, &format!("&after_seq={after_seq}")).await);
    }
    publish(&after, progress("live", 0, 0));
    let mut oldest = 0;
    for socket in &mut sockets {
        let notice = next_json(socket).await;
        assert_eq!(notice["type"], "reload", "{notice}");
        oldest = notice["data"]["oldest_seq"].as_u64().unwrap();
        let latest = notice["data"]["latest_seq"].as_u64().unwrap();
        assert!(
            oldest > last_seen,
            "the new run numbers past the old one: {notice}"
        );
        assert_eq!(latest - oldest + 1, 3, "the three rows refilled: {notice}");
        assert_eq!(notice["seq"], latest);

        let live = next_json(socket).await;
        assert_eq!(live["data"]["job_id"], "live");
        assert_eq!(live["seq"], latest + 1, "live messages follow the notice");
    }

    // The new run holds the three rows, in order, under its own numbers.
    let mut socket =
        connect_with(&after, &after.token, &format!("&after_seq={}", oldest - 1)).await;
    for id in &ids {
        let row = next_json(&mut socket).await;
        assert_eq!(row["type"], "telemetry.generation");
        assert_eq!(row["data"]["job_id"], id.as_str());
    }
    after.stop().await;
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed_or_a_reload_notice() {
    const QUEUE: u32 = 16;
    let app = spawn_app_with(AppOptions {
        client_queue: QUEUE as usize,
        ..AppOptions::default()
    })
    .await;
    // More than the channel holds, so that the oldest messages have fallen out.
    for step in 0..2 * QUEUE {
        publish(&app, progress("before", step, 0));
    }
    let mut socket = connect_with(&app, &app.token, "").await;
    publish_burst(&app, 0, 10, 0);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_json(&mut socket).await);
    }
    socket.close(None).await.unwrap();
    let last_seen = seen[3]["seq"].as_u64().unwrap();

    // Missed: steps 4..10 from before the client left, then 10..15 while it was away.
    publish_burst(&app, 10, 5, 0);
    let mut socket = connect_with(&app, &app.token, &format!("&after_seq={last_seen}")).await;
    for (offset, step) in (4..15).enumerate() {
        let event = next_json(&mut socket).await;
        assert_eq!(
            event["seq"].as_u64().unwrap(),
            last_seen + 1 + offset as u64
        );
        assert_eq!(event["data"]["step"], step);
    }
    // Nothing more than what was missed, then the live messages.
    publish(&app, progress("live", 15, 0));
    let live = next_json(&mut socket).await;
    assert_eq!(
        live["data"]["job_id"], "live",
        "no duplicate after the backlog"
    );
    let latest = live["seq"].as_u64().unwrap();

    // Caught up exactly: nothing to replay.
    let mut current = connect_with(&app, &app.token, &format!("&after_seq={latest}")).await;
    // The oldest still held: everything held is replayed.
    let oldest = latest + 1 - u64::from(QUEUE);
    let mut edge = connect_with(&app, &app.token, &format!("&after_seq={}", oldest - 1)).await;
    // One further back than what is held: reload.
    let mut stale = connect_with(&app, &app.token, &format!("&after_seq={}", oldest - 2)).await;
    // Ahead of the channel (a client of an earlier run of the service): reload.
    let mut ahead = connect_with(&app, &app.token, &format!("&after_seq={}", latest + 5)).await;
    publish(&app, progress("after", 16, 0));

    assert_eq!(next_json(&mut current).await["data"]["job_id"], "after");

    for seq in oldest..=latest {
        assert_eq!(next_json(&mut edge).await["seq"], seq);
    }
    assert_eq!(next_json(&mut edge).await["data"]["job_id"], "after");

    for (socket, reason) in [
        (&mut stale, "no longer held"),
        (&mut ahead, "past every message"),
    ] {
        let notice = next_json(socket).await;
        assert_eq!(notice["type"], "reload");
        assert_eq!(notice["channel"], "system");
        assert_eq!(
            notice["seq"], latest,
            "the notice stands for the newest message"
        );
        assert!(notice["emitted_at"].is_string());
        assert_eq!(notice["data"]["oldest_seq"], oldest);
        assert_eq!(notice["data"]["latest_seq"], latest);
        assert!(
            notice["data"]["reason"]
                .as_str()
                .is_some_and(|text| text.contains(reason)),
            "{notice}"
        );
        let next = next_json(socket).await;
        assert_eq!(
            next["data"]["job_id"], "after",
            "live messages follow the notice"
        );
        assert_eq!(next["seq"], latest + 1);
    }
    app.stop().await;
}

/// The status and JSON body of a refused upgrade.
async fn refused(request: tungstenite::handshake::client::Request) -> (u16, Value) {
    let error = connect_async(request).await.expect_err("refused");
    let tungstenite::Error::Http(response) = error else {
        panic!("refused before the upgrade, got {error:?}");
    };
    let body = response.body().as_deref().unwrap_or_default();
    (
        response.status().as_u16(),
        serde_json::from_slice(body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn bad_missing_and_expired_tokens_are_refused_before_the_upgrade() {
    let app = spawn_app_with(AppOptions::default()).await;
    let expired = app
        .keys
        .mint("operator-1", Role::Operator, chrono::Duration::seconds(-1))
        .unwrap();
    let foreign = AuthKeys::new(&secrecy::SecretString::from("another service's secret"))
        .unwrap()
        .mint("operator-1", Role::Operator, chrono::Duration::hours(1))
        .unwrap();
    let cases = [
        ("missing", app.ws_url.clone(), "bearer token"),
        (
            "garbage",
            format!("{}?token=garbage", app.ws_url),
            "malformed",
        ),
        (
            "signed elsewhere",
            format!("{}?token={foreign}", app.ws_url),
            "signature",
        ),
        (
            "expired",
            format!("{}?token={expired}", app.ws_url),
            "expired",
        ),
    ];
    for (case, url, reason) in cases {
        let (status, body) = refused(url.into_client_request().unwrap()).await;
        assert_eq!(status, 401, "{case}");
        assert_eq!(body["error"], "unauthorized", "{case}: {body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|message| message.contains(reason)),
            "{case}: {body}"
        );
    }

    let mut request = app.ws_url.clone().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {expired}").parse().unwrap(),
    );
    assert_eq!(refused(request).await.0, 401, "expired, in the header");
    app.stop().await;
}

#[tokio::test]
async fn a_token_that_expires_while_connected_ends_the_connection_with_4001() {
    let app = spawn_app_with(AppOptions::default()).await;
    let token = app
        .keys
        .mint("operator-1", Role::Operator, chrono::Duration::seconds(2))
        .unwrap();
    let mut socket = connect_with(&app, &token, "").await;
    publish(&app, progress("before expiry", 0, 0));
    assert_eq!(
        next_json(&mut socket).await["data"]["job_id"],
        "before expiry"
    );

    let frame = closing_frame(&mut socket).await;
    assert_eq!(u16::from(frame.code), 4001, "{frame:?}");
    assert!(
        matches!(
            next_frame(&mut socket).await,
            None | Some(Ok(Message::Close(_)))
        ),
        "the connection ends after the close"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_connected_client_gets_going_away_when_the_service_stops() {
    let app = spawn_app_with(AppOptions::default()).await;
    let mut socket = connect_with(&app, &app.token, "").await;
    publish(&app, progress("before stop", 0, 0));
    assert_eq!(
        next_json(&mut socket).await["data"]["job_id"],
        "before stop"
    );

    // Still on their way to the client when the stop begins: it gets every one before the
    // close.
    const BURST: u32 = 500;
    publish_burst(&app, 0, BURST, 4096);

    let client = tokio::spawn(async move {
        let mut steps = Vec::new();
        let frame = loop {
            match next_frame(&mut socket).await {
                Some(Ok(Message::Text(text))) => steps.push(field_u64(&text, "step").unwrap()),
                Some(Ok(Message::Close(Some(frame)))) => break frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("the server ended without a close frame: {other:?}"),
            }
        };
        // The client library answers the close; after it the stream ends cleanly, not with
        // a reset.
        let after = next_frame(&mut socket).await;
        (steps, frame, after)
    });
    app.stop().await;
    let (steps, frame, after) = client.await.unwrap();
    assert!(
        steps.iter().copied().eq(0..u64::from(BURST)),
        "got {} of the {BURST} messages before the close",
        steps.len()
    );
    assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
    assert!(
        matches!(after, None | Some(Ok(Message::Close(_)))),
        "a clean end after the close frame, got {after:?}"
    );
}

/// Every message a client gets until the service closes it, in order, and the close code.
async fn read_until_close(mut socket: Socket) -> (Vec<Value>, u16) {
    let mut received = Vec::new();
    loop {
        match next_frame(&mut socket).await {
            Some(Ok(Message::Text(text))) => received.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(Some(frame)))) => return (received, u16::from(frame.code)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("the server ended without a close frame, got {other:?}"),
        }
    }
}

/// Stops a service on `devices` while one job runs on each and two more wait, and checks what
/// a client of the channel is told before it is closed.
async fn a_stop_meets_running_and_queued_jobs(devices: &[&str]) {
    let app = spawn_app_with(AppOptions {
        devices: devices.iter().map(|name| name.to_string()).collect(),
        ..AppOptions::default()
    })
    .await;
    let mut socket = connect_with(&app, &app.token, "").await;
    let job = |steps: u32, seed: usize| serde_json::json!({"media_type": "image", "prompt": "a job the stop meets", "width": 32, "height": 32, "steps": steps, "seed": seed});
    let mut running = Vec::new();
    for seed in 0..devices.len() {
        running.push(app.submit(job(100, seed)).await);
    }
    let queued = [
        app.submit(job(100, 100)).await,
        app.submit(job(12, 101)).await,
    ];
    // Stopped once every long job is under way, well before any of them can end.
    let mut under_way = std::collections::HashSet::new();
    while under_way.len() < running.len() {
        let event = next_json(&mut socket).await;
        if event["type"] == "job.progress" {
            under_way.insert(event["data"]["job_id"].as_str().unwrap().to_owned());
        }
    }

    let client = tokio::spawn(read_until_close(socket));
    app.stop().await;
    let (received, close_code) = client.await.unwrap();
    let summary: Vec<String> = received
        .iter()
        .map(|event| format!("{} {}", event["type"], event["data"]["job_id"]))
        .collect();
    let position = |event_type: &str, job_id: &str| {
        received
            .iter()
            .position(|event| event["type"] == event_type && event["data"]["job_id"] == job_id)
            .unwrap_or_else(|| panic!("no {event_type} of {job_id} before the close: {summary:#?}"))
    };
    for id in &running {
        assert!(
            position("telemetry.generation", id) < position("job.finished", id),
            "a running job finishes: its row, then its end; {summary:#?}"
        );
    }
    for id in &queued {
        let failed = position("job.failed", id);
        assert!(
            position("telemetry.generation", id) < failed,
            "a queued job is recorded as failed: its row, then its end; {summary:#?}"
        );
        assert_eq!(
            received[failed]["data"]["error"], "the service stopped before the job ran",
            "{summary:#?}"
        );
    }
    assert_eq!(
        close_code, 1001,
        "closed after every job's end; {summary:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_publishes_the_end_of_every_job_before_going_away() {
    a_stop_meets_running_and_queued_jobs(&["cpu"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_publishes_the_end_of_every_job_on_every_device_before_going_away() {
    a_stop_meets_running_and_queued_jobs(&["cpu", "cpu"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seidra_generate_polls_the_job_when_the_channel_closes_before_it_ends() {
    let app = spawn_app_with(AppOptions::default()).await;
    let mut proxy =
        CuttableProxy::start(app.base_url.trim_start_matches("http://").to_owned()).await;
    let mut watch = connect_with(&app, &app.token, "").await;
    let url = format!("http://{}", proxy.address);
    let token = app.token.clone();
    // Long enough to be still running when the connection is cut.
    let cli = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_seidra"))
            .args(["generate", "--json", "--width", "64", "--height", "64"])
            .args([
                "--steps", "30", "--seed", "7", "--url", &url, "--token", &token,
            ])
            .arg("a job that outlives its channel")
            .output()
            .unwrap()
    });

    // A few steps into the job, long after the command had the answer to its submission,
    // the command's connections are cut, then let through again.
    loop {
        let event = next_json(&mut watch).await;
        if event["type"] == "job.progress" && event["data"]["step"].as_u64() >= Some(4) {
            break;
        }
    }
    proxy.cut().await;
    proxy.restore();

    let output = cli.await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("polling"),
        "the channel closed first: {stderr}"
    );
    let job: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["metrics"]["extra"]["seed"], 7);
    proxy.stop();
    app.stop().await;
}
