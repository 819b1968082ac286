//! The built-in denoising network: a small U-Net written with burn.
//!
//! Convolutional residual blocks with group normalisation at full, half and quarter
//! resolution, self-attention at the quarter resolution, a sinusoidal timestep embedding, and
//! a prompt embedding (hashed words, averaged) added to it. It predicts the noise in its
//! input, as DDPM-style models do.

use burn::config::Config;
use burn::module::Module;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Int, Tensor, TensorData};

/// Sizes of the network.
#[derive(Config, Debug)]
pub struct DenoiserConfig {
    /// Channels at full resolution; doubled at the lower ones.
    #[config(default = 16)]
    pub base_channels: usize,
    /// Width of the timestep and prompt embeddings.
    #[config(default = 64)]
    pub embed_dim: usize,
    /// Buckets words are hashed into.
    #[config(default = 4096)]
    pub vocabulary: usize,
    /// Groups of every group normalisation.
    #[config(default = 8)]
    pub groups: usize,
    /// Attention heads at the lowest resolution.
    #[config(default = 4)]
    pub heads: usize,
}

impl DenoiserConfig {
    /// Bytes the self-attention's score matrices take for `batch` images of `width`×`height`:
    /// every head compares every pixel of the quarter-resolution map with every other, and the
    /// scores and their softmax are alive together. It grows with the fourth power of the
    /// side and dwarfs every other tensor of a large job.
    pub fn attention_bytes(&self, batch: u32, width: u32, height: u32) -> u64 {
        let tokens = u64::from(width / 4) * u64::from(height / 4);
        let scores = u64::from(batch) * self.heads as u64 * tokens * tokens;
        2 * scores * std::mem::size_of::<f32>() as u64
    }
}

/// A residual block conditioned on the embedding.
#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    norm1: GroupNorm<B>,
    conv1: Conv2d<B>,
    embedding: Linear<B>,
    norm2: GroupNorm<B>,
    conv2: Conv2d<B>,
    skip: Option<Conv2d<B>>,
}

impl<B: Backend> ResBlock<B> {
    fn new(input: usize, output: usize, config: &DenoiserConfig, device: &B::Device) -> Self {
        ResBlock {
            norm1: GroupNormConfig::new(config.groups, input).init(device),
            conv1: conv3x3(input, output, 1, device),
            embedding: LinearConfig::new(config.embed_dim, output).init(device),
            norm2: GroupNormConfig::new(config.groups, output).init(device),
            conv2: conv3x3(output, output, 1, device),
            skip: (input != output)
                .then(|| Conv2dConfig::new([input, output], [1, 1]).init(device)),
        }
    }

    /// `x`: `[batch, input, height, width]`, `embedding`: `[batch, embed_dim]`
    /// → `[batch, output, height, width]`.
    pub fn forward(&self, x: Tensor<B, 4>, embedding: Tensor<B, 2>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let [batch, channels, _, _] = h.dims();
        let shift = self
            .embedding
            .forward(silu(embedding))
            .reshape([batch, channels, 1, 1]);
        let h = self.conv2.forward(silu(self.norm2.forward(h + shift)));
        let skip = match &self.skip {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}

/// Self-attention over the pixels of a feature map.
#[derive(Module, Debug)]
pub struct AttentionBlock<B: Backend> {
    norm: GroupNorm<B>,
    attention: MultiHeadAttention<B>,
}

impl<B: Backend> AttentionBlock<B> {
    /// `x`: `[batch, channels, height, width]` → the same shape.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, channels, height, width] = x.dims();
        let tokens = self
            .norm
            .forward(x.clone())
            .reshape([batch, channels, height * width])
            .swap_dims(1, 2);
        let context = self.attention.forward(MhaInput::self_attn(tokens)).context;
        x + context
            .swap_dims(1, 2)
            .reshape([batch, channels, height, width])
    }
}

/// The U-Net.
#[derive(Module, Debug)]
pub struct Denoiser<B: Backend> {
    conv_in: Conv2d<B>,
    time_mlp_in: Linear<B>,
    time_mlp_out: Linear<B>,
    words: Embedding<B>,
    prompt_projection: Linear<B>,
    down1: ResBlock<B>,
    downsample1: Conv2d<B>,
    down2: ResBlock<B>,
    downsample2: Conv2d<B>,
    middle1: ResBlock<B>,
    middle_attention: AttentionBlock<B>,
    middle2: ResBlock<B>,
    up2: ResBlock<B>,
    up1: ResBlock<B>,
    norm_out: GroupNorm<B>,
    conv_out: Conv2d<B>,
    embed_dim: usize,
}

impl DenoiserConfig {
    /// Builds the network with freshly drawn weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Denoiser<B> {
        let c = self.base_channels;
        let e = self.embed_dim;
        Denoiser {
            conv_in: conv3x3(3, c, 1, device),
            time_mlp_in: LinearConfig::new(e, e).init(device),
            time_mlp_out: LinearConfig::new(e, e).init(device),
            words: EmbeddingConfig::new(self.vocabulary, e).init(device),
            prompt_projection: LinearConfig::new(e, e).init(device),
            down1: ResBlock::new(c, c, self, device),
            downsample1: conv3x3(c, c, 2, device),
            down2: ResBlock::new(c, 2 * c, self, device),
            downsample2: conv3x3(2 * c, 2 * c, 2, device),
            middle1: ResBlock::new(2 * c, 2 * c, self, device),
            middle_attention: AttentionBlock {
                norm: GroupNormConfig::new(self.groups, 2 * c).init(device),
                attention: MultiHeadAttentionConfig::new(2 * c, self.heads)
                    .with_dropout(0.0)
                    .init(device),
            },
            middle2: ResBlock::new(2 * c, 2 * c, self, device),
            up2: ResBlock::new(4 * c, 2 * c, self, device),
            up1: ResBlock::new(3 * c, c, self, device),
            norm_out: GroupNormConfig::new(self.groups, c).init(device),
            conv_out: conv3x3(c, 3, 1, device),
            embed_dim: e,
        }
    }
}

impl<B: Backend> Denoiser<B> {
    /// Predicts the noise in `x`.
    ///
    /// `x`: `[batch, 3, height, width]` with height and width multiples of 4;
    /// `timestep`: the diffusion step, the same for the whole batch;
    /// `words`: `[batch, words]` hashed word ids → `[batch, 3, height, width]`.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        timestep: f32,
        words: Tensor<B, 2, Int>,
    ) -> Tensor<B, 4> {
        let device = x.device();
        let [batch, _, height, width] = x.dims();

        let time = timestep_embedding::<B>(timestep, batch, self.embed_dim, &device);
        let time = self
            .time_mlp_out
            .forward(silu(self.time_mlp_in.forward(time)));
        let [_, word_count] = words.dims();
        let prompt = self
            .words
            .forward(words)
            .sum_dim(1)
            .reshape([batch, self.embed_dim])
            .div_scalar(word_count as f32);
        let embedding = time + self.prompt_projection.forward(prompt);

        let h = self.conv_in.forward(x);
        let skip1 = self.down1.forward(h, embedding.clone());
        let h = self.downsample1.forward(skip1.clone());
        let skip2 = self.down2.forward(h, embedding.clone());
        let h = self.downsample2.forward(skip2.clone());

        let h = self.middle1.forward(h, embedding.clone());
        let h = self.middle_attention.forward(h);
        let h = self.middle2.forward(h, embedding.clone());

        let h = upsample(h, [height / 2, width / 2]);
        let h = self
            .up2
            .forward(Tensor::cat(vec![h, skip2], 1), embedding.clone());
        let h = upsample(h, [height, width]);
        let h = self.up1.forward(Tensor::cat(vec![h, skip1], 1), embedding);
        self.conv_out.forward(silu(self.norm_out.forward(h)))
    }
}

fn conv3x3<B: Backend>(
    input: usize,
    output: usize,
    stride: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([input, output], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

fn upsample<B: Backend>(x: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest))
}

/// The sinusoidal embedding of a timestep: `[batch, dim]`.
fn timestep_embedding<B: Backend>(
    timestep: f32,
    batch: usize,
    dim: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let row: Vec<f32> = (0..dim)
        .map(|i| {
            let frequency = (-(10_000f32.ln()) * (i % half) as f32 / half as f32).exp();
            let angle = timestep * frequency;
            if i < half { angle.sin() } else { angle.cos() }
        })
        .collect();
    let data: Vec<f32> = row.iter().copied().cycle().take(batch * dim).collect();
    Tensor::from_data(TensorData::new(data, [batch, dim]), device)
}

/// Hashes a prompt's words into ids below `vocabulary` (FNV-1a, stable across runs and
/// platforms). An empty prompt is one id, so the mean is always defined.
pub fn word_ids(prompt: &str, vocabulary: usize) -> Vec<i64> {
    let ids: Vec<i64> = prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .take(64)
        .map(|word| {
            let hash = word
                .to_lowercase()
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            (hash % vocabulary as u64) as i64
        })
        .collect();
    if ids.is_empty() { vec![0] } else { ids }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn the_network_keeps_the_shape_of_its_input() {
        let device = Default::default();
        let config = DenoiserConfig::new()
            .with_base_channels(8)
            .with_embed_dim(16);
        let network = config.init::<NdArray>(&device);
        let x = Tensor::<NdArray, 4>::zeros([2, 3, 16, 24], &device);
        let ids = word_ids("a red fox", config.vocabulary);
        let count = ids.len();
        let words = Tensor::<NdArray, 2, Int>::from_data(
            TensorData::new([ids.clone(), ids].concat(), [2, count]),
            &device,
        );
        assert_eq!(network.forward(x, 500.0, words).dims(), [2, 3, 16, 24]);
    }

    #[test]
    fn word_ids_ignore_case_and_punctuation() {
        assert_eq!(word_ids("Red, fox!", 4096), word_ids("red fox", 4096));
        assert_eq!(word_ids("", 4096), vec![0]);
    }
}
