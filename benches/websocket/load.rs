//! Load driver for the channel `system`, run by `benches/websocket/run.sh`.
//!
//! It makes a running service publish at a chosen rate by acting as another host on the
//! same PostgreSQL database: it announces committed rows of `generation_metrics` with
//! `NOTIFY seidra_generation`, exactly as another instance's writer does, and the service
//! relays each announced row to its clients as `telemetry.generation`. Its WebSocket clients
//! (tokio-tungstenite) measure the delay from each message's `emitted_at` to its receipt,
//! count what they get and check `seq` for gaps. It samples the service's CPU time and RSS
//! from `/proc/<pid>`.
//!
//! Two modes: `fanout` (many clients, one rate, a fixed time) and `max-rate` (one client,
//! rising rates, until it lags or misses a message).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use sea_orm::sqlx::{self, Connection, postgres::PgConnection};
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

/// The PostgreSQL channel on which instances announce committed rows.
const NOTIFY_CHANNEL: &str = "seidra_generation";
/// Announcements per second at most; higher rates put several rows in one announcement.
const TICKS_PER_SECOND: u32 = 100;

#[derive(Parser)]
struct Args {
    /// The channel's URL, `ws://127.0.0.1:PORT/api/system/ws`.
    #[arg(long)]
    url: String,
    /// An operator token.
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    token: String,
    /// The service's PostgreSQL database; its rows are announced.
    #[arg(long)]
    database_url: String,
    /// The service's process id, for CPU and RSS.
    #[arg(long)]
    service_pid: u32,
    /// Clock ticks per second of /proc/<pid>/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clock_ticks: u64,
    /// Rows an earlier run announced: the service publishes each row once, so they are
    /// skipped.
    #[arg(long, default_value_t = 0)]
    skip_rows: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Many clients, one publication rate, a fixed time.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Messages published per second.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// One client; each rate for `step_seconds`, rising until the client lags or misses one.
    MaxRate {
        /// Messages per second, in the order tried.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "100,500,1000,2000,5000,10000,20000,30000,50000"
        )]
        rates: Vec<u32>,
        #[arg(long, default_value_t = 5)]
        step_seconds: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut db = PgConnection::connect(&args.database_url)
        .await
        .context("connecting to the service's database")?;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM generation_metrics ORDER BY id")
        .fetch_all(&mut db)
        .await
        .context("reading the rows to announce")?;
    anyhow::ensure!(!ids.is_empty(), "generation_metrics has no row to announce");
    let mut publisher = Publisher {
        db,
        ids,
        next: args.skip_rows,
        instance: uuid::Uuid::new_v4(),
    };
    let probe = ProcessProbe::new(args.service_pid, args.clock_ticks);
    match args.mode {
        Mode::Fanout {
            clients,
            rate,
            seconds,
        } => {
            fanout(
                &args.url,
                &args.token,
                &mut publisher,
                &probe,
                clients,
                rate,
                seconds,
            )
            .await
        }
        Mode::MaxRate {
            rates,
            step_seconds,
        } => max_rate(&args.url, &args.token, &mut publisher, rates, step_seconds).await,
    }
}

/// Announces rows as another instance would.
struct Publisher {
    db: PgConnection,
    ids: Vec<i64>,
    next: usize,
    instance: uuid::Uuid,
}

impl Publisher {
    /// Announces `rate` rows a second for `duration`; answers how many it announced.
    async fn run(&mut self, rate: u32, duration: Duration) -> anyhow::Result<u64> {
        let ticks = rate.min(TICKS_PER_SECOND);
        let per_tick = (rate / ticks) as usize;
        let mut interval = tokio::time::interval(Duration::from_secs(1) / ticks);
        let total_ticks = u64::from(ticks) * duration.as_secs();
        // The service publishes each row once, as it must: a row announced again is not.
        let needed = self.next + total_ticks as usize * per_tick;
        anyhow::ensure!(
            needed <= self.ids.len(),
            "{needed} rows to announce, {} in the table: raise BENCH_ROWS",
            self.ids.len()
        );
        for _ in 0..total_ticks {
            interval.tick().await;
            let batch = self.ids[self.next..self.next + per_tick].to_vec();
            self.next += per_tick;
            let payload = json!({ "instance": self.instance, "ids": batch }).to_string();
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(payload)
                .execute(&mut self.db)
                .await
                .context("NOTIFY")?;
        }
        Ok(total_ticks * per_tick as u64)
    }
}

/// What one client has received so far.
#[derive(Default)]
struct ClientStats {
    received: AtomicU64,
    gaps: AtomicU64,
    last_seq: AtomicU64,
    close_code: AtomicU32,
    /// Microseconds from `emitted_at` to receipt, in order of receipt.
    latencies_us: Mutex<Vec<u32>>,
    /// When the latest message came, as microseconds since the driver started.
    last_receipt_us: AtomicU64,
    /// `emitted_at` of every message in microseconds since the epoch, when asked for.
    emissions_us: Option<Mutex<Vec<i64>>>,
}

/// Reads the channel until `stop` changes or the server closes; records into `stats`.
async fn run_client(
    url: String,
    stats: Arc<ClientStats>,
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) {
    let mut socket = socket;
    loop {
        let frame = tokio::select! {
            frame = socket.next() => frame,
            _ = stop.changed() => return,
        };
        match frame {
            Some(Ok(Message::Text(text))) => {
                let now = Utc::now();
                let Some((seq, emitted_at)) = seq_and_emission(&text) else {
                    continue;
                };
                let latency = (now - emitted_at).num_microseconds().unwrap_or(0).max(0);
                let last = stats.last_seq.swap(seq, Ordering::Relaxed);
                if last != 0 && seq != last + 1 {
                    stats
                        .gaps
                        .fetch_add(seq.saturating_sub(last + 1), Ordering::Relaxed);
                }
                stats
                    .latencies_us
                    .lock()
                    .unwrap()
                    .push(u32::try_from(latency).unwrap_or(u32::MAX));
                if let Some(emissions) = &stats.emissions_us {
                    emissions
                        .lock()
                        .unwrap()
                        .push(emitted_at.timestamp_micros());
                }
                stats.received.fetch_add(1, Ordering::Relaxed);
                stats
                    .last_receipt_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |frame| u16::from(frame.code));
                stats.close_code.store(u32::from(code), Ordering::Relaxed);
                eprintln!("{url}: closed with {code}");
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                eprintln!("{url}: {error}");
                stats.close_code.store(1006, Ordering::Relaxed);
                return;
            }
            None => {
                stats.close_code.store(1006, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// `seq` and `emitted_at` of a message, read without parsing its `data`.
fn seq_and_emission(text: &str) -> Option<(u64, DateTime<Utc>)> {
    let seq_at = text.rfind("\"seq\":")? + "\"seq\":".len();
    let seq: String = text[seq_at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let emitted_at = text.rfind("\"emitted_at\":\"")? + "\"emitted_at\":\"".len();
    let end = emitted_at + text[emitted_at..].find('"')?;
    let emitted_at = DateTime::parse_from_rfc3339(&text[emitted_at..end]).ok()?;
    Some((seq.parse().ok()?, emitted_at.with_timezone(&Utc)))
}

/// Connects `count` clients, 50 at a time; they keep every emission time if `emissions`.
async fn connect_clients(
    url: &str,
    token: &str,
    count: usize,
    emissions: bool,
    started: Instant,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<(Arc<ClientStats>, tokio::task::JoinHandle<()>)>> {
    let address = format!("{url}?token={token}");
    let sockets: Vec<_> = futures_util::stream::iter(0..count)
        .map(|_| connect_async(address.clone()))
        .buffer_unordered(50)
        .collect()
        .await;
    let mut clients = Vec::with_capacity(count);
    for (index, socket) in sockets.into_iter().enumerate() {
        let (socket, _) = socket.with_context(|| format!("connecting client {index}"))?;
        let stats = Arc::new(ClientStats {
            emissions_us: emissions.then(Mutex::default),
            ..ClientStats::default()
        });
        let task = tokio::spawn(run_client(
            format!("client {index}"),
            Arc::clone(&stats),
            socket,
            started,
            stop.clone(),
        ));
        clients.push((stats, task));
    }
    Ok(clients)
}

/// Many clients, one rate.
async fn fanout(
    url: &str,
    token: &str,
    publisher: &mut Publisher,
    probe: &ProcessProbe,
    clients: usize,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (stop_tx, stop) = watch::channel(false);
    let connected = connect_clients(url, token, clients, false, started, &stop).await?;
    eprintln!(
        "connected {clients} clients in {:.1} s; service RSS {} MiB",
        started.elapsed().as_secs_f64(),
        probe.rss_kib().unwrap_or(0) / 1024
    );
    let total_received = || {
        connected
            .iter()
            .map(|(stats, _)| stats.received.load(Ordering::Relaxed))
            .sum::<u64>()
    };

    let sampling = probe.sample_every(Duration::from_secs(1));
    let before = probe.cpu_seconds().unwrap_or(0.0);
    let own = ProcessProbe::own(probe.clock_ticks);
    let own_before = own.cpu_seconds().unwrap_or(0.0);
    let machine_before = machine_busy_seconds(probe.clock_ticks);
    let window_start = Instant::now();
    let received_before = total_received();
    let published = publisher.run(rate, Duration::from_secs(seconds)).await?;
    let window = window_start.elapsed().as_secs_f64();
    let received_in_window = total_received() - received_before;
    let cpu = probe.cpu_seconds().unwrap_or(0.0) - before;
    let own_cpu = own.cpu_seconds().unwrap_or(0.0) - own_before;
    let (machine_cpu, interrupts_cpu) = machine_busy_seconds(probe.clock_ticks)
        .zip(machine_before)
        .map_or((0.0, 0.0), |(after, before)| {
            (after.0 - before.0, after.1 - before.1)
        });
    let rss = sampling.finish().await;

    // Whatever is still in flight arrives within a few seconds, or is missing.
    let expected = published * clients as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    let drain_start = Instant::now();
    while total_received() < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain = drain_start.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let mut latencies = Vec::new();
    let (mut gaps, mut closed, mut short) = (0, 0, 0);
    for (stats, task) in connected {
        let _ = task.await;
        gaps += stats.gaps.load(Ordering::Relaxed);
        closed += u64::from(stats.close_code.load(Ordering::Relaxed) != 0);
        short += u64::from(stats.received.load(Ordering::Relaxed) < published);
        latencies.extend(stats.latencies_us.lock().unwrap().iter().copied());
    }
    let received = latencies.len() as u64;
    latencies.sort_unstable();

    let summary = json!({
        "mode": "fanout",
        "clients": clients,
        "rate_per_second": rate,
        "seconds": seconds,
        "published": published,
        "expected_deliveries": expected,
        "delivered": received,
        "clients_missing_messages": short,
        "clients_closed": closed,
        "seq_gaps": gaps,
        "delivered_per_second_in_window": received_in_window as f64 / window,
        // How long the last deliveries took to arrive after the last publication.
        "drain_seconds": drain,
        "latency_ms": {
            "p50": percentile_ms(&latencies, 50.0),
            "p90": percentile_ms(&latencies, 90.0),
            "p99": percentile_ms(&latencies, 99.0),
            "p999": percentile_ms(&latencies, 99.9),
            "max": percentile_ms(&latencies, 100.0),
        },
        "service_cpu_percent_of_one_core": 100.0 * cpu / window,
        "service_rss_mib": {
            "mean": rss.mean_kib / 1024.0,
            "max": rss.max_kib as f64 / 1024.0,
            "hwm": probe.hwm_kib().unwrap_or(0) as f64 / 1024.0,
        },
        "driver_cpu_percent_of_one_core": 100.0 * own_cpu / window,
        // The whole machine (service, driver, PostgreSQL, kernel, anything else), and its
        // time in interrupts (part of loopback TCP), in the same unit.
        "machine_cpu_percent_of_one_core": 100.0 * machine_cpu / window,
        "interrupts_cpu_percent_of_one_core": 100.0 * interrupts_cpu / window,
        "cores": std::thread::available_parallelism().map_or(0, usize::from),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// One client, rising rates.
async fn max_rate(
    url: &str,
    token: &str,
    publisher: &mut Publisher,
    rates: Vec<u32>,
    step_seconds: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (stop_tx, stop) = watch::channel(false);
    let mut connected = connect_clients(url, token, 1, true, started, &stop).await?;
    let (stats, task) = connected.pop().expect("one client");
    let mut steps = Vec::new();
    let mut best = None;
    for rate in rates {
        let received_before = stats.received.load(Ordering::Relaxed);
        let gaps_before = stats.gaps.load(Ordering::Relaxed);
        let latencies_before = stats.latencies_us.lock().unwrap().len();
        let step_start_us = started.elapsed().as_micros() as u64;
        let published = publisher
            .run(rate, Duration::from_secs(step_seconds))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.received.load(Ordering::Relaxed) - received_before < published
            && stats.close_code.load(Ordering::Relaxed) == 0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let received = stats.received.load(Ordering::Relaxed) - received_before;
        let gaps = stats.gaps.load(Ordering::Relaxed) - gaps_before;
        let close_code = stats.close_code.load(Ordering::Relaxed);
        let busy_seconds = (stats.last_receipt_us.load(Ordering::Relaxed))
            .saturating_sub(step_start_us) as f64
            / 1e6;
        let mut latencies = stats.latencies_us.lock().unwrap()[latencies_before..].to_vec();
        latencies.sort_unstable();
        let emissions = stats.emissions_us.as_ref().expect("kept");
        let emissions = emissions.lock().unwrap()[latencies_before..].to_vec();
        let emitted_seconds = match (emissions.first(), emissions.last()) {
            (Some(first), Some(last)) => (last - first) as f64 / 1e6,
            _ => 0.0,
        };
        // The service's own rate of publication: below the asked rate, the bottleneck is
        // upstream of the channel (the announcements, the relay's reads), not the client.
        let emitted_per_second = received as f64 / emitted_seconds.max(1e-6);
        let delivered_per_second = received as f64 / busy_seconds.max(1e-6);
        let complete = received == published && gaps == 0 && close_code == 0;
        let limited_by = if close_code != 0 {
            "client closed (4008: lagged)"
        } else if !complete {
            "messages missing"
        } else if emitted_per_second < 0.95 * f64::from(rate) {
            "publication"
        } else if delivered_per_second < 0.95 * f64::from(rate) {
            "delivery"
        } else {
            "none"
        };
        let step = json!({
            "rate_per_second": rate,
            "published": published,
            "received": received,
            "seq_gaps": gaps,
            "close_code": close_code,
            "emitted_per_second": emitted_per_second,
            "delivered_per_second": delivered_per_second,
            "latency_ms": {
                "p50": percentile_ms(&latencies, 50.0),
                "p99": percentile_ms(&latencies, 99.0),
                "max": percentile_ms(&latencies, 100.0),
            },
            "complete": complete,
            "limited_by": limited_by,
        });
        eprintln!("{step}");
        steps.push(step);
        if !complete {
            break;
        }
        let received_per_second = delivered_per_second.min(emitted_per_second);
        best = Some(best.map_or(received_per_second, |best: f64| {
            best.max(received_per_second)
        }));
        if limited_by != "none" {
            // Asking for more would not publish more.
            break;
        }
    }
    let _ = stop_tx.send(true);
    let _ = task.await;
    let summary = json!({
        "mode": "max-rate",
        // The most messages a second the client received, every one, without being closed.
        "highest_rate_received_in_full_per_second": best,
        "stopped_by": steps.last().map(|step| step["limited_by"].clone()),
        "steps": steps,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// CPU seconds the whole machine has spent busy (all but idle and iowait), and the part of
/// them in interrupts, from /proc/stat. Loopback TCP's receive path runs in softirq, which a
/// kernel with IRQ time accounting counts apart from any process.
fn machine_busy_seconds(clock_ticks: u64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    let idle = ticks.get(3)? + ticks.get(4)?;
    let interrupts = ticks.get(5)? + ticks.get(6)?;
    // guest and guest_nice are already counted in user and nice.
    let total: u64 = ticks.iter().take(8).sum();
    let seconds = |ticks: u64| ticks as f64 / clock_ticks as f64;
    Some((seconds(total - idle), seconds(interrupts)))
}

/// The nearest-rank percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u32], percent: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((percent / 100.0) * sorted_us.len() as f64).ceil() as usize;
    Some(f64::from(sorted_us[rank.clamp(1, sorted_us.len()) - 1]) / 1000.0)
}

/// CPU time and memory of a process, from /proc.
#[derive(Clone)]
struct ProcessProbe {
    path: String,
    clock_ticks: u64,
}

/// RSS readings taken while a phase ran.
struct RssSummary {
    mean_kib: f64,
    max_kib: u64,
}

/// A sampler running in the background until `finish`.
struct Sampling {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl Sampling {
    async fn finish(self) -> RssSummary {
        let _ = self.stop.send(true);
        let readings = self.task.await.unwrap_or_default();
        let max_kib = readings.iter().copied().max().unwrap_or(0);
        let mean_kib = readings.iter().sum::<u64>() as f64 / readings.len().max(1) as f64;
        RssSummary { mean_kib, max_kib }
    }
}

impl ProcessProbe {
    fn new(pid: u32, clock_ticks: u64) -> Self {
        ProcessProbe {
            path: format!("/proc/{pid}"),
            clock_ticks,
        }
    }

    fn own(clock_ticks: u64) -> Self {
        ProcessProbe {
            path: "/proc/self".to_owned(),
            clock_ticks,
        }
    }

    /// User plus system CPU seconds so far.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("{}/stat", self.path)).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) as f64 / self.clock_ticks as f64)
    }

    fn status_kib(&self, key: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("{}/status", self.path)).ok()?;
        let line = status.lines().find(|line| line.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    fn hwm_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    fn sample_every(&self, period: Duration) -> Sampling {
        let (stop, mut stopped) = watch::channel(false);
        let probe = self.clone();
        let task = tokio::spawn(async move {
            let mut readings = Vec::new();
            let mut interval = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = interval.tick() => readings.extend(probe.rss_kib()),
                    _ = stopped.changed() => return readings,
                }
            }
        });
        Sampling { stop, task }
    }
}
