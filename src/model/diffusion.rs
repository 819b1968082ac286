//! The built-in generator: the [`Denoiser`] driven by a deterministic DDIM sampler.
//!
//! Images of one job are denoised as one batch. Video frames are one batch too, each frame
//! starting from noise interpolated (spherically) between two seeded noise images, so that
//! neighbouring frames stay close. The same request and seed give the same pixels.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Mutex;

use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use image::RgbImage;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::generation::{GenerationRequest, MediaType};
use crate::model::network::{Denoiser, DenoiserConfig, word_ids};
use crate::model::{GenerationError, Generator, StepObserver};

/// The name the built-in model is known by.
pub const BUILTIN_MODEL: &str = "seidra-tiny-diffusion";

/// The samplers the built-in model knows.
pub const SCHEDULERS: [&str; 1] = ["ddim"];

/// Seed of the built-in weights when no weights file is given.
pub const WEIGHTS_SEED: u64 = 0x005E_1D2A;

/// Diffusion steps of the training schedule the sampler walks down.
const TRAINING_STEPS: usize = 1000;

/// Backends draw initial weights from one process-wide generator; building two models at
/// once would interleave their draws.
static WEIGHT_INIT: Mutex<()> = Mutex::new(());

/// The built-in model on one device of backend `B`.
pub struct DiffusionGenerator<B: Backend> {
    network: Denoiser<B>,
    vocabulary: usize,
    device: B::Device,
    alphas_cumprod: Vec<f32>,
}

impl<B: Backend> DiffusionGenerator<B> {
    /// Builds the model on `device`, with weights from `weights` (a burn `.mpk` record) or
    /// drawn from [`WEIGHTS_SEED`].
    pub fn new(device: B::Device, weights: Option<&Path>) -> Result<Self, GenerationError> {
        let config = DenoiserConfig::new();
        let network = {
            let _guard = WEIGHT_INIT.lock().unwrap_or_else(|e| e.into_inner());
            B::seed(&device, WEIGHTS_SEED);
            let network = config.init::<B>(&device);
            // Parameters are drawn lazily; drawing them all now, in declaration order, keeps
            // the weights the same from run to run.
            let _ = network.num_params();
            network
        };
        let network = match weights {
            Some(path) => network
                .load_file(
                    path.to_path_buf(),
                    &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
                    &device,
                )
                .map_err(|error| {
                    GenerationError::Model(format!("weights file {}: {error}", path.display()))
                })?,
            None => network,
        };
        Ok(DiffusionGenerator {
            network,
            vocabulary: config.vocabulary,
            device,
            alphas_cumprod: alphas_cumprod(),
        })
    }

    /// Checks what the model itself cannot do, beyond the API's range checks.
    fn check(&self, request: &GenerationRequest) -> Result<(), GenerationError> {
        if !SCHEDULERS.contains(&request.scheduler.as_str()) {
            return Err(GenerationError::InvalidParameters(format!(
                "scheduler `{}` is not supported; the built-in model samples with {}",
                request.scheduler,
                SCHEDULERS.join(", ")
            )));
        }
        if let Some(lora) = request.loras.first() {
            return Err(GenerationError::InvalidParameters(format!(
                "lora `{}` is not available: the built-in model has no adapters",
                lora.name
            )));
        }
        if !request.width.is_multiple_of(4) || !request.height.is_multiple_of(4) {
            return Err(GenerationError::InvalidParameters(
                "width and height must be multiples of 4".to_owned(),
            ));
        }
        Ok(())
    }

    fn initial_noise(&self, request: &GenerationRequest) -> Tensor<B, 4> {
        let (width, height) = (request.width as usize, request.height as usize);
        let pixels = 3 * width * height;
        let mut rng = StdRng::seed_from_u64(request.seed);
        let mut draw = || -> Vec<f32> {
            (0..pixels)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect()
        };

        let (batch, data) = match request.media_type {
            MediaType::Image => {
                let batch = request.images as usize;
                (batch, (0..batch).flat_map(|_| draw()).collect::<Vec<f32>>())
            }
            MediaType::Video => {
                let (from, to) = (draw(), draw());
                let frames = request.frames as usize;
                let data = (0..frames)
                    .flat_map(|k| {
                        let t = if frames > 1 {
                            k as f32 / (frames - 1) as f32
                        } else {
                            0.0
                        };
                        slerp(&from, &to, t)
                    })
                    .collect();
                (frames, data)
            }
        };
        Tensor::from_data(
            TensorData::new(data, [batch, 3, height, width]),
            &self.device,
        )
    }
}

impl<B: Backend> Generator for DiffusionGenerator<B> {
    fn generate(
        &mut self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, GenerationError> {
        self.check(request)?;

        let mut x = self.initial_noise(request);
        let [batch, _, _, _] = x.dims();
        let ids = word_ids(&request.prompt, self.vocabulary);
        let count = ids.len();
        let words = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.repeat(batch), [batch, count]),
            &self.device,
        );

        let steps = request.steps as usize;
        let timesteps: Vec<usize> = (0..steps)
            .map(|i| (TRAINING_STEPS - 1) * (steps - i) / steps)
            .collect();
        for (i, &t) in timesteps.iter().enumerate() {
            let alpha = self.alphas_cumprod[t];
            let alpha_next = timesteps
                .get(i + 1)
                .map_or(1.0, |&next| self.alphas_cumprod[next]);
            let noise = self.network.forward(x.clone(), t as f32, words.clone());
            let predicted = (x - noise.clone().mul_scalar((1.0 - alpha).sqrt()))
                .div_scalar(alpha.sqrt())
                .clamp(-1.0, 1.0);
            x = predicted.mul_scalar(alpha_next.sqrt())
                + noise.mul_scalar((1.0 - alpha_next).sqrt());
            if observer
                .step_finished(i as u32 + 1, steps as u32)
                .is_break()
            {
                return Err(GenerationError::Cancelled);
            }
        }

        let data = x
            .try_into_data()
            .map_err(|error| {
                GenerationError::from_device_message(format!(
                    "reading the result failed: {error:?}"
                ))
            })?
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|error| {
                GenerationError::Model(format!("reading the result failed: {error:?}"))
            })?;
        Ok(to_images(&data, batch, request.width, request.height))
    }
}

/// The cumulative products of `1 - beta` of a linear beta schedule (1e-4 to 0.02).
fn alphas_cumprod() -> Vec<f32> {
    let mut product = 1.0f64;
    (0..TRAINING_STEPS)
        .map(|i| {
            let beta = 1e-4 + (0.02 - 1e-4) * i as f64 / (TRAINING_STEPS - 1) as f64;
            product *= 1.0 - beta;
            product as f32
        })
        .collect()
}

/// Spherical interpolation between two noise images, which keeps the noise's scale.
fn slerp(from: &[f32], to: &[f32], t: f32) -> Vec<f32> {
    let dot: f32 = from.iter().zip(to).map(|(a, b)| a * b).sum();
    let norms = from.iter().map(|a| a * a).sum::<f32>().sqrt()
        * to.iter().map(|b| b * b).sum::<f32>().sqrt();
    let theta = (dot / norms).clamp(-1.0, 1.0).acos();
    if theta.abs() < 1e-4 {
        return from.to_vec();
    }
    let (wa, wb) = (
        ((1.0 - t) * theta).sin() / theta.sin(),
        (t * theta).sin() / theta.sin(),
    );
    from.iter().zip(to).map(|(a, b)| wa * a + wb * b).collect()
}

/// `[batch, 3, height, width]` values in [-1, 1] to RGB images.
fn to_images(data: &[f32], batch: usize, width: u32, height: u32) -> Vec<RgbImage> {
    let plane = (width * height) as usize;
    (0..batch)
        .map(|b| {
            let image = &data[b * 3 * plane..(b + 1) * 3 * plane];
            RgbImage::from_fn(width, height, |x, y| {
                let at = (y * width + x) as usize;
                let channel = |c: usize| {
                    ((image[c * plane + at].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                };
                image::Rgb([channel(0), channel(1), channel(2)])
            })
        })
        .collect()
}

impl<B: Backend> std::fmt::Debug for DiffusionGenerator<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiffusionGenerator")
            .field("model", &BUILTIN_MODEL)
            .finish()
    }
}

/// An observer that never stops the generation; for benchmarks and tests.
pub struct RunToEnd;

impl StepObserver for RunToEnd {
    fn step_finished(&mut self, _done: u32, _total: u32) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}
