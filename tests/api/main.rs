//! Integration tests: the real service on port 0 with a fresh database, driven over HTTP and
//! WebSocket as clients drive it.

mod asyncapi;
mod auth;
mod channel;
mod doubles;
mod fleet;
mod helpers;
mod jobs;
mod measurement;
mod metrics;
mod openapi;
mod outage;
mod rollup;
mod storage;
mod telemetry;
mod websocket;
