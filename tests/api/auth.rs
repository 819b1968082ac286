//! Tokens: missing, malformed, expired, wrongly signed, and without the operator role.

use jsonwebtoken::{EncodingKey, Header};
use seidra::api::auth::{Claims, Role};

use crate::helpers::spawn_app;

#[tokio::test]
async fn requests_without_a_valid_token_get_401_and_without_the_role_403() {
    let app = spawn_app().await;
    let now = chrono::Utc::now().timestamp();
    let expired = app
        .keys
        .mint("operator-1", Role::Operator, chrono::Duration::seconds(-60))
        .unwrap();
    let wrongly_signed = jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub: "x".into(),
            role: Role::Operator,
            iat: now,
            exp: now + 600,
        },
        &EncodingKey::from_secret(b"another secret").unwrap(),
    )
    .unwrap();

    for (token, what) in [
        (None, "missing"),
        (Some("not-a-jwt"), "malformed"),
        (Some(expired.as_str()), "expired"),
        (Some(wrongly_signed.as_str()), "wrongly signed"),
    ] {
        let response = app.telemetry_response("", token).await;
        assert_eq!(response.status(), 401, "{what} token");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    }

    // Signed with the service's own secret, but for a user no row can be stored for.
    for (subject, what) in [("", "empty"), ("a\0b", "NUL")] {
        let token = app
            .keys
            .mint(subject, Role::Operator, chrono::Duration::hours(1))
            .unwrap();
        let response = app.telemetry_response("", Some(&token)).await;
        assert_eq!(response.status(), 401, "{what} subject");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|message| message.contains("subject")),
            "{what}: {body}"
        );
    }

    let response = app
        .telemetry_response("", Some(&app.user_token("alice")))
        .await;
    assert_eq!(response.status(), 403);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");

    let response = app
        .client
        .post(format!("{}/api/jobs", app.base_url))
        .json(&crate::helpers::small_image(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "job routes need a token too");
    app.stop().await;
}
