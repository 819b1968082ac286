//! `/metrics`: the Prometheus exposition, protected like `/api/system`.

use crate::helpers::{small_image, spawn_app};

#[tokio::test]
async fn metrics_count_committed_generations_and_need_the_operator_token() {
    let app = spawn_app().await;
    for seed in 0..2 {
        let id = app.submit(small_image(seed)).await;
        app.wait_for_job(&id).await;
    }
    let url = format!("{}/metrics", app.base_url);

    let refused = app.client.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let forbidden = app
        .client
        .get(&url)
        .bearer_auth(app.user_token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);

    let response = app
        .client
        .get(&url)
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let labels = r#"device="cpu",media_type="image",model="seidra-tiny-diffusion""#;
    assert!(
        text.contains(&format!(
            r#"seidra_generations_total{{{labels},status="succeeded"}} 2"#
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "seidra_generation_duration_seconds_count{{{labels}}} 2"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            r#"seidra_generation_duration_seconds_bucket{{{labels},le="3600"}} 2"#
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("seidra_generation_outputs_total{{{labels}}} 2")),
        "{text}"
    );
    app.stop().await;
}
