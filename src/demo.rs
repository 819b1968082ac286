//! `seidra serve --demo`: a short workload submitted through the service's own API, so a new
//! user sees real rows in the endpoint, and the commands to look at them.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use seidra::api::auth::{AuthKeys, Role};
use serde_json::{Value, json};

pub async fn run(address: SocketAddr, keys: &AuthKeys) -> anyhow::Result<()> {
    let token = keys.mint("demo", Role::Operator, chrono::Duration::hours(24))?;
    let base = format!("http://{address}");
    println!("\nSEIDRA is listening on {base}");
    println!("operator token (24 h), for the commands below:\n  export TOKEN={token}\n");
    println!(
        "try:\n  curl -s -H \"Authorization: Bearer $TOKEN\" '{base}/api/system/telemetry/generation?minutes=60'"
    );
    println!("  websocat \"ws://{address}/api/system/ws?token=$TOKEN\"");
    println!("  API documentation: {base}/docs\n");

    let client = reqwest::Client::new();
    let jobs = [
        json!({"media_type": "image", "prompt": "a lighthouse at dusk", "seed": 1, "persona_id": "demo-persona"}),
        json!({"media_type": "image", "prompt": "a red fox in snow", "seed": 2, "images": 2}),
        json!({"media_type": "image", "prompt": "an orchard in spring", "seed": 3, "width": 96, "height": 64}),
        json!({"media_type": "video", "prompt": "waves on a shore", "seed": 4, "frames": 8, "fps": 8}),
    ];
    let mut ids = Vec::new();
    for body in &jobs {
        let accepted: Value = client
            .post(format!("{base}/api/jobs"))
            .bearer_auth(&token)
            .json(body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.push(accepted["job_id"].as_str().context("no job_id")?.to_owned());
    }
    for id in ids {
        loop {
            let job: Value = client
                .get(format!("{base}/api/jobs/{id}"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            if let Some(metrics) = job.get("metrics").filter(|m| !m.is_null()) {
                println!(
                    "demo job {id}: {} {} in {:.2} s on {} ({} output(s), files: {})",
                    metrics["status"].as_str().unwrap_or("?"),
                    metrics["media_type"].as_str().unwrap_or("?"),
                    metrics["duration_seconds"].as_f64().unwrap_or(0.0),
                    metrics["device"].as_str().unwrap_or("?"),
                    metrics["outputs"],
                    job["files"]
                        .as_array()
                        .map(|f| f
                            .iter()
                            .filter_map(|f| f["url"].as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default(),
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    println!("\nthe demo workload is done; the service keeps running (Ctrl-C stops it)");
    Ok(())
}
