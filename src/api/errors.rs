//! The JSON error body every failed request gets, and the conversion of poem's own errors
//! (bad parameters, missing tokens) into it.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::Object;
use poem_openapi::error::ParseParamError;
use poem_openapi::payload::Json;

use crate::api::telemetry;

/// What went wrong with a request.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `conflict`, `payload_too_large`, `unsupported_media_type`,
    /// `unavailable`, `internal`.
    pub error: String,
    /// What was wrong, naming the field or parameter.
    pub message: String,
}

impl ErrorBody {
    /// An error body with a code and a message.
    pub fn new(error: &str, message: impl Into<String>) -> Json<ErrorBody> {
        Json(ErrorBody {
            error: error.to_owned(),
            message: message.into(),
        })
    }
}

/// The code of a status.
fn code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        status if status.is_client_error() => "bad_request",
        _ => "internal",
    }
}

/// Turns any error poem raised before a handler answered into the JSON error body.
pub async fn to_json_error(error: poem::Error) -> Response {
    let status = error.status();
    if status.is_server_error() {
        tracing::error!(status = status.as_u16(), error = %error, "request failed");
    }
    let message = if status.is_server_error() {
        "internal error".to_owned()
    } else if let Some(parameter) = error.downcast_ref::<ParseParamError>() {
        name_allowed_values(parameter)
    } else {
        name_enum_fields(error.to_string())
    };
    let mut response = ErrorBody::new(code(status), message)
        .with_status(status)
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            poem::http::header::WWW_AUTHENTICATE,
            poem::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// The enums of request bodies, with the field that holds each and its values. poem-openapi
/// names the type, not the field, when a body holds an unknown enum value.
const BODY_ENUMS: [(&str, &str, &str); 2] = [
    ("SubmitJobBody", "media_type", "image, video"),
    ("ModelName", "model", "seidra-tiny-diffusion"),
];

fn name_enum_fields(message: String) -> String {
    for (type_name, field, values) in BODY_ENUMS {
        if message.contains(&format!("Expected input type \"{type_name}\"")) {
            return format!("{field}: expected one of {values}; {message}");
        }
    }
    message
}

/// A query parameter's name and what it allows. poem-openapi's own reason says neither
/// ("Expect a valid enumeration value.", "invalid digit found in string", or a validator's
/// regular expression), so it is kept only for a parameter this service does not describe.
fn name_allowed_values(error: &ParseParamError) -> String {
    let allowed = telemetry::QUERY_PARAMETERS
        .iter()
        .find(|(name, _)| *name == error.name)
        .map(|(_, allowed)| *allowed);
    match allowed {
        Some(allowed) => format!("{}: expected {allowed}", error.name),
        None => format!("{}: {}", error.name, error.reason),
    }
}
