//! Generation models and what a device worker needs to run one: the [`Generator`] trait the
//! GPU worker drives, the errors a generation can end with, and the built-in burn model.

pub mod diffusion;
pub mod encode;
pub mod network;

use std::ops::ControlFlow;

use image::RgbImage;
use thiserror::Error;

use crate::generation::GenerationRequest;

/// Why a generation produced nothing.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum GenerationError {
    /// The model rejects the request's parameters.
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    /// The device ran out of memory.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The model failed.
    #[error("model error: {0}")]
    Model(String),
    /// A client cancelled the job.
    #[error("cancelled")]
    Cancelled,
}

impl GenerationError {
    /// A device's error message as an error of the right kind: out-of-memory when the device
    /// says so, a model error otherwise.
    // FIXME: cubecl reports allocation failures as text (or panics); the kind is read from the
    // message, so a reworded message would be recorded as `model_error`.
    pub fn from_device_message(message: String) -> Self {
        let lower = message.to_lowercase();
        if lower.contains("out of memory")
            || lower.contains("outofmemory")
            || lower.contains("can't allocate")
        {
            GenerationError::OutOfMemory(message)
        } else {
            GenerationError::Model(message)
        }
    }

    /// The error's kind, stored in `extra.error.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            GenerationError::InvalidParameters(_) => "invalid_parameters",
            GenerationError::OutOfMemory(_) => "out_of_memory",
            GenerationError::Model(_) => "model_error",
            GenerationError::Cancelled => "cancelled",
        }
    }
}

/// Told after every denoising step; answering `Break` stops the generation as cancelled.
pub trait StepObserver {
    /// `done` of `total` steps of the whole job have finished (all images or frames).
    fn step_finished(&mut self, done: u32, total: u32) -> ControlFlow<()>;
}

/// A model bound to one device. It runs on the device's worker thread, never on the async
/// executor.
pub trait Generator: Send {
    /// Produces the request's images (image job) or frames (video job), in order.
    fn generate(
        &mut self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, GenerationError>;
}
