//! `seidra generate`: submits a job to a running service, follows its progress on the channel
//! `system` with a progress bar, and prints the job's figures and files when it ends.
//!
//! The token goes in the `Authorization` header, never in a URL a proxy might log. When the
//! channel cannot be opened (a user token: the channel needs the operator role) or closes
//! before the job ends (the service stopping, the client lagging, or the connection lost), the
//! job is followed by polling `GET /api/jobs/{id}`. A token that expires ends the command,
//! since no read can succeed with it.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use seidra::api::websocket::CLOSE_TOKEN_EXPIRED;

/// How often a job is read while the channel is not there to follow it.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long polling goes on while the service cannot be reached before giving up.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(60);

type Channel =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What to generate, from the command line.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The service's base URL.
    #[arg(long, env = "SEIDRA_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A token; with the user role the job is followed by polling, since the channel needs the
    /// operator role.
    #[arg(long, env = "SEIDRA_TOKEN")]
    token: String,
    /// `image` or `video`.
    #[arg(long, default_value = "image")]
    media_type: String,
    /// The prompt.
    prompt: String,
    /// Width in pixels.
    #[arg(long)]
    width: Option<u32>,
    /// Height in pixels.
    #[arg(long)]
    height: Option<u32>,
    /// Denoising steps.
    #[arg(long)]
    steps: Option<u32>,
    /// Seed of the initial noise.
    #[arg(long)]
    seed: Option<u64>,
    /// Images of an image job.
    #[arg(long)]
    images: Option<u32>,
    /// Frames of a video job.
    #[arg(long)]
    frames: Option<u32>,
    /// Frames per second of a video job.
    #[arg(long)]
    fps: Option<u32>,
    /// The persona the job is for.
    #[arg(long)]
    persona_id: Option<String>,
    /// Print the job as JSON instead of a summary, and no progress bar.
    #[arg(long)]
    json: bool,
}

/// Submits the job, follows it, prints the outcome; fails when the job did not succeed.
pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/').to_owned();
    let mut body = json!({"media_type": args.media_type, "prompt": args.prompt});
    for (field, value) in [
        ("width", args.width.map(Value::from)),
        ("height", args.height.map(Value::from)),
        ("steps", args.steps.map(Value::from)),
        ("seed", args.seed.map(Value::from)),
        ("images", args.images.map(Value::from)),
        ("frames", args.frames.map(Value::from)),
        ("fps", args.fps.map(Value::from)),
        ("persona_id", args.persona_id.clone().map(Value::from)),
    ] {
        if let Some(value) = value {
            body[field] = value;
        }
    }

    // Subscribe before submitting so that no event of the job is missed.
    let mut request = format!("{}/api/system/ws", base.replacen("http", "ws", 1))
        .into_client_request()
        .context("the channel's URL")?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", args.token)
            .parse()
            .context("the token is not a valid header value")?,
    );
    let channel = tokio_tungstenite::connect_async(request).await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/api/jobs"))
        .bearer_auth(&args.token)
        .json(&body)
        .send()
        .await
        .context("submitting the job")?;
    if !response.status().is_success() {
        bail!(
            "the job was refused: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let accepted: Value = response.json().await?;
    let job_id = accepted["job_id"]
        .as_str()
        .context("no job_id in the answer")?
        .to_owned();

    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} steps ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("job {job_id} queued"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let followed = match channel {
        Ok((channel, _)) => follow_on_channel(channel, &job_id, &bar).await,
        Err(error) => Err(format!("could not be opened ({error})")),
    };
    let followed = match followed {
        Ok(followed) => followed,
        Err(why) => {
            bar.suspend(|| eprintln!("following job {job_id} by polling: the channel {why}"));
            bar.set_message(format!("job {job_id} (polling)"));
            wait_by_polling(&client, &base, &args.token, &job_id).await?
        }
    };
    if followed == Followed::TokenExpired {
        bar.abandon();
        bail!(
            "the token expired while job {job_id} was running; read it with a fresh token at {base}/api/jobs/{job_id}"
        );
    }
    bar.finish_and_clear();

    let job: Value = client
        .get(format!("{base}/api/jobs/{job_id}"))
        .bearer_auth(&args.token)
        .send()
        .await?
        .json()
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        print_summary(&base, &job);
    }
    if job["status"] != "succeeded" {
        bail!("job {job_id} ended {}", job["status"]);
    }
    Ok(())
}

/// How following a job ended.
#[derive(Debug, PartialEq, Eq)]
enum Followed {
    /// The job ended.
    JobEnded,
    /// The token expired: it can read nothing more.
    TokenExpired,
}

/// Shows the job's progress until it ends or the token expires; why not, when the channel
/// closes first.
async fn follow_on_channel(
    mut channel: Channel,
    job_id: &str,
    bar: &ProgressBar,
) -> Result<Followed, String> {
    while let Some(message) = channel.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(Some(frame))) if u16::from(frame.code) == CLOSE_TOKEN_EXPIRED => {
                return Ok(Followed::TokenExpired);
            }
            Ok(Message::Close(frame)) => {
                return Err(frame.map_or_else(
                    || "closed with no close code".to_owned(),
                    |frame| format!("closed with {} {}", u16::from(frame.code), frame.reason),
                ));
            }
            Ok(_) => continue,
            Err(error) => return Err(format!("was lost: {error}")),
        };
        let Ok(event) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if event["data"]["job_id"] != job_id {
            continue;
        }
        match event["type"].as_str() {
            Some("job.started") => bar.set_message(format!(
                "job {job_id} on {}",
                event["data"]["device"].as_str().unwrap_or("?")
            )),
            Some("job.progress") => {
                bar.set_length(event["data"]["steps"].as_u64().unwrap_or(0));
                bar.set_position(event["data"]["step"].as_u64().unwrap_or(0));
            }
            Some("job.finished" | "job.failed" | "job.cancelled") => return Ok(Followed::JobEnded),
            _ => {}
        }
    }
    Err("ended".to_owned())
}

/// Reads the job until it has ended or the token has expired. A service that cannot be
/// reached is tried again for `UNREACHABLE_LIMIT`; another answer than the job ends the wait.
async fn wait_by_polling(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    job_id: &str,
) -> anyhow::Result<Followed> {
    let mut unreachable_since = None;
    loop {
        let answer = client
            .get(format!("{base}/api/jobs/{job_id}"))
            .bearer_auth(token)
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => {
                unreachable_since = None;
                let job: Value = response.json().await.context("reading the job")?;
                if matches!(
                    job["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                ) {
                    return Ok(Followed::JobEnded);
                }
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                // The service's 401 says why; only an expired token is worth a new one.
                if status == reqwest::StatusCode::UNAUTHORIZED && text.contains("expired") {
                    return Ok(Followed::TokenExpired);
                }
                bail!("reading job {job_id}: {status} {text}");
            }
            Err(error) => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > UNREACHABLE_LIMIT {
                    return Err(error).context(format!("reading job {job_id}"));
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn print_summary(base: &str, job: &Value) {
    let m = &job["metrics"];
    println!(
        "job {} {}",
        job["job_id"].as_str().unwrap_or("?"),
        job["status"].as_str().unwrap_or("?")
    );
    println!(
        "  device            {}",
        m["device"].as_str().unwrap_or("?")
    );
    println!("  outputs           {}", m["outputs"]);
    println!("  duration_seconds  {}", m["duration_seconds"]);
    println!("  throughput        {}", m["throughput"]);
    println!("  queue_wait_seconds {}", m["queue_wait_seconds"]);
    println!("  vram_peak_mb      {}", m["vram_peak_mb"]);
    if let Some(error) = m["extra"]["error"].as_object() {
        println!("  error             {} {}", error["kind"], error["message"]);
    }
    for file in job["files"].as_array().into_iter().flatten() {
        println!(
            "  file              {base}{}",
            file["url"].as_str().unwrap_or("")
        );
    }
}
