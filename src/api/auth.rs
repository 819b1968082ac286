//! JWT bearer tokens: minting, checking, and the security scheme of every `/api` route.
//!
//! A token names a user (`sub`) and a role. `/api/system` needs the operator role. Without a
//! configured secret, the service creates one in its data directory on first start.

use std::path::Path;

use anyhow::Context;
use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::api::AppState;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads telemetry and every job.
    Operator,
    /// Submits and reads their own jobs.
    User,
}

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// What the token allows.
    pub role: Role,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
}

/// Keys made from the signing secret.
#[derive(Clone)]
pub struct AuthKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl AuthKeys {
    /// Keys for an HMAC-SHA256 secret.
    pub fn new(secret: &SecretString) -> anyhow::Result<Self> {
        let bytes = secret.expose_secret().as_bytes();
        Ok(AuthKeys {
            encoding: EncodingKey::from_secret(bytes).context("the JWT secret is unusable")?,
            decoding: DecodingKey::from_secret(bytes).context("the JWT secret is unusable")?,
        })
    }

    /// Mints a token for `user` with `role`, valid for `ttl`.
    pub fn mint(&self, user: &str, role: Role, ttl: chrono::Duration) -> anyhow::Result<String> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user.to_owned(),
            role,
            iat: now,
            exp: now + ttl.num_seconds(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .context("signing the token failed")
    }

    /// Checks a token's signature and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map(|data| data.claims)
    }
}

/// The configured secret, or the one stored in `data_dir`, created there on first start.
pub fn load_or_create_secret(
    configured: Option<&SecretString>,
    data_dir: &Path,
) -> anyhow::Result<SecretString> {
    if let Some(secret) = configured {
        return Ok(secret.clone());
    }
    let path = data_dir.join("jwt-secret");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        return Ok(SecretString::from(existing.trim().to_owned()));
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(path = %path.display(), "created a JWT secret");
    Ok(SecretString::from(secret))
}

/// A JWT in the `Authorization: Bearer` header.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerAuth(pub Claims);

async fn check_bearer(request: &Request, bearer: Bearer) -> poem::Result<Claims> {
    let state = request
        .data::<AppState>()
        .ok_or_else(|| poem::Error::from_status(poem::http::StatusCode::INTERNAL_SERVER_ERROR))?;
    verify_for_request(&state.keys, &bearer.token)
}

/// Checks a token from a request; a bad one is a 401 that says why.
pub fn verify_for_request(keys: &AuthKeys, token: &str) -> poem::Result<Claims> {
    let claims = keys.verify(token).map_err(|error| {
        let reason = match error.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired",
            jsonwebtoken::errors::ErrorKind::InvalidSignature => "the token's signature is invalid",
            _ => "the token is malformed",
        };
        poem::Error::from_string(reason, poem::http::StatusCode::UNAUTHORIZED)
    })?;
    // The subject becomes the rows' `user_id`: one that no filter can select, or that
    // PostgreSQL cannot store, would lose the jobs' rows.
    check_subject(&claims.sub).map_err(|reason| {
        poem::Error::from_string(
            format!("the token's subject: {reason}"),
            poem::http::StatusCode::UNAUTHORIZED,
        )
    })?;
    Ok(claims)
}

/// Whether `subject` can be a token's user: 1 to 256 characters, none of them NUL.
pub fn check_subject(subject: &str) -> Result<(), String> {
    let length = subject.chars().count();
    if !(1..=256).contains(&length) {
        return Err(format!("{length} characters; a user is 1 to 256"));
    }
    if subject.contains('\0') {
        return Err("a user has no NUL character".to_owned());
    }
    Ok(())
}

impl Claims {
    /// Whether the token carries the operator role.
    pub fn is_operator(&self) -> bool {
        self.role == Role::Operator
    }
}

/// The token of an `Authorization: Bearer` header, if the request has one.
pub fn bearer_token(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(poem::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
}
