//! Finding the devices to run on and building each one's model and probes.
//!
//! GPUs are found through NVML before CUDA is touched: without a driver, burn's CUDA backend
//! panics on first use, while NVML answers with an error. A host without a usable GPU runs on
//! the CPU and says so once.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;

use crate::actors::{DeviceRuntime, RuntimeFactory};
use crate::measure::CpuProbe;
use crate::model::diffusion::DiffusionGenerator;

#[cfg(feature = "cuda")]
mod cuda;

/// The devices named in `--devices` (e.g. `cpu,cpu` or `cuda:0,cuda:2`), or every GPU found
/// when the list is `auto`, or the CPU when none is.
pub fn resolve(requested: &str) -> anyhow::Result<Vec<String>> {
    let requested = requested.trim();
    if requested.is_empty() || requested == "auto" {
        let gpus = gpu_names();
        if gpus.is_empty() {
            return Ok(vec!["cpu".to_owned()]);
        }
        return Ok(gpus);
    }
    let names: Vec<String> = requested
        .split(',')
        .map(|name| name.trim().to_owned())
        .collect();
    for name in &names {
        check_name(name)?;
    }
    Ok(names)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name == "cpu" {
        return Ok(());
    }
    let Some(index) = name.strip_prefix("cuda:") else {
        anyhow::bail!("device `{name}` is not `cpu` or `cuda:<index>`");
    };
    let index: u32 = index
        .parse()
        .with_context(|| format!("device `{name}`: the index is not a number"))?;
    if !cfg!(feature = "cuda") {
        anyhow::bail!("device `{name}` needs a build with the `cuda` feature");
    }
    let count = gpu_names().len() as u32;
    if index >= count {
        anyhow::bail!("device `{name}` does not exist: NVML sees {count} GPU(s)");
    }
    Ok(())
}

/// `cuda:<i>` for every GPU NVML reports, in a CUDA build; empty otherwise.
fn gpu_names() -> Vec<String> {
    #[cfg(feature = "cuda")]
    {
        cuda::gpu_names()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Vec::new()
    }
}

/// Builds the runtime of a device by name: the built-in model on the right backend, and the
/// probes that go with it.
pub fn factory(weights: Option<PathBuf>) -> RuntimeFactory {
    Arc::new(move |device: &str| -> anyhow::Result<DeviceRuntime> {
        match device {
            "cpu" => Ok(DeviceRuntime {
                generator: Box::new(
                    DiffusionGenerator::<NdArray>::new(NdArrayDevice::Cpu, weights.as_deref())
                        .map_err(|error| anyhow::anyhow!("{error}"))?,
                ),
                probe: Box::new(CpuProbe),
                sampler: None,
            }),
            #[cfg(feature = "cuda")]
            gpu if gpu.starts_with("cuda:") => cuda::runtime(gpu, weights.as_deref()),
            other => anyhow::bail!("device `{other}` is not available in this build"),
        }
    })
}
