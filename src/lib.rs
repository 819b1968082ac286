//! SEIDRA runs image and video generation models on every device of a host, measures every
//! generation (inference time, device memory, throughput, queue wait, failures), stores one
//! row per generation in `generation_metrics`, and serves those figures over REST, a
//! WebSocket channel and the OpenAPI document that describes them.
//!
//! [`app`] wires everything together; [`actors`] is the runtime, [`model`] and [`measure`]
//! run and measure generations, [`storage`] keeps the rows, [`api`] serves them.

pub mod actors;
pub mod api;
pub mod app;
pub mod devices;
pub mod events;
pub mod generation;
pub mod logging;
pub mod measure;
pub mod metrics;
pub mod model;
pub mod settings;
pub mod storage;
