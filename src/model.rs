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
        // cubecl writes "out-of-memory" and "OutOfMemory", the driver "CUDA_ERROR_OUT_OF_MEMORY".
        let spelled = message.to_lowercase().replace(['-', '_'], " ");
        if spelled.contains("out of memory")
            || spelled.contains("outofmemory")
            || spelled.contains("can't allocate")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_recognised_however_the_device_spells_it() {
        for message in [
            "the model panicked on cuda:0: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "called `Result::unwrap()` on an `Err` value: CUDA_ERROR_OUT_OF_MEMORY",
            "An out-of-memory error happened during launch\nCaused by:\n  pool exhausted",
            "OutOfMemory { reason: \"can't allocate 2 GiB\" }",
        ] {
            let error = GenerationError::from_device_message(message.to_owned());
            assert_eq!(error.kind(), "out_of_memory", "{message}");
            assert!(
                error.to_string().contains(message),
                "the message is kept: {error}"
            );
        }
        let error = GenerationError::from_device_message("illegal memory access".to_owned());
        assert_eq!(
            error,
            GenerationError::Model("illegal memory access".to_owned())
        );
    }
}
