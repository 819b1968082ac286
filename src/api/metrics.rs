//! `GET /metrics`: the Prometheus text exposition, behind the operator token on the main
//! address, or open on a separate address when `metrics_address` is set.

use poem::http::StatusCode;
use poem::web::Data;
use poem::{IntoResponse, Request, Response, handler};

use crate::api::AppState;
use crate::api::auth::{bearer_token, verify_for_request};
use crate::api::errors::{ErrorBody, to_json_error};

/// The content type of the text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics` on the main address: needs an operator token.
#[handler]
pub async fn protected(request: &Request, Data(state): Data<&AppState>) -> Response {
    let Some(token) = bearer_token(request) else {
        return to_json_error(poem::Error::from_string(
            "a bearer token is needed",
            StatusCode::UNAUTHORIZED,
        ))
        .await;
    };
    match verify_for_request(&state.keys, token) {
        Ok(claims) if claims.is_operator() => exposition(state),
        Ok(_) => ErrorBody::new("forbidden", "/metrics needs a token with the operator role")
            .with_status(StatusCode::FORBIDDEN)
            .into_response(),
        Err(error) => to_json_error(error).await,
    }
}

/// `/metrics` on the separate metrics address: open.
#[handler]
pub fn open(Data(state): Data<&AppState>) -> Response {
    exposition(state)
}

fn exposition(state: &AppState) -> Response {
    state
        .metrics
        .encode()
        .with_content_type(TEXT_FORMAT)
        .into_response()
}
