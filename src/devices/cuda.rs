//! CUDA devices, in a build with the `cuda` feature: found through NVML, run with burn's CUDA
//! backend, measured from cubecl's allocator (bytes in use and reserved) and NVML (device
//! memory used, by every process, and by this one where the driver can see it).
//!
//! cubecl keeps one memory pool per stream and one stream per OS thread, so the allocator
//! is read on the device's worker thread, the thread that runs the model.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use burn::backend::Cuda;
use burn::backend::cuda::CudaDevice;
use burn::cubecl::Runtime;
use burn::cubecl::cuda::CudaRuntime;
use burn::tensor::backend::Backend;
use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

use crate::actors::DeviceRuntime;
use crate::devices::cuda_to_nvml;
use crate::measure::{
    AllocatorUsage, DeviceMemoryReading, DeviceMemorySampler, DeviceMemorySource, DeviceProbe,
    SyncError,
};
use crate::model::diffusion::DiffusionGenerator;

/// NVML is read at this period while a job runs (100 Hz).
const SAMPLE_PERIOD: Duration = Duration::from_millis(10);

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| match Nvml::init() {
        Ok(nvml) => Some(nvml),
        Err(error) => {
            tracing::info!(error = %error, "no NVIDIA driver found through NVML; running on the CPU");
            None
        }
    })
    .as_ref()
}

/// The NVML index of each CUDA ordinal, read once; empty without a driver.
fn nvml_indexes() -> anyhow::Result<&'static [u32]> {
    static INDEXES: OnceLock<Result<Vec<u32>, String>> = OnceLock::new();
    INDEXES
        .get_or_init(|| {
            let Some(nvml) = nvml() else {
                return Ok(Vec::new());
            };
            map_ordinals(nvml).map_err(|error| format!("{error:#}"))
        })
        .as_deref()
        .map_err(|error| anyhow::anyhow!("{error}"))
}

fn map_ordinals(nvml: &Nvml) -> anyhow::Result<Vec<u32>> {
    // NVML numbers GPUs in PCI order; index entries of CUDA_VISIBLE_DEVICES, and CUDA's own
    // ordinals, follow CUDA_DEVICE_ORDER, which the service sets to PCI order when unset.
    let order = std::env::var("CUDA_DEVICE_ORDER").unwrap_or_default();
    if order != "PCI_BUS_ID" {
        anyhow::bail!(
            "CUDA_DEVICE_ORDER is `{order}`: set it to PCI_BUS_ID, so that CUDA numbers GPUs \
             as NVML does"
        );
    }
    let count = nvml.device_count().context("counting GPUs through NVML")?;
    let uuids = (0..count)
        .map(|index| {
            nvml.device_by_index(index)
                .and_then(|device| device.uuid())
                .with_context(|| format!("reading the UUID of NVML GPU {index}"))
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    cuda_to_nvml(visible.as_deref(), &uuids)
}

/// `cuda:<i>` for every GPU CUDA numbers (those of `CUDA_VISIBLE_DEVICES` when it is set);
/// an error when an entry of that list matches no GPU NVML sees.
pub fn gpu_names() -> anyhow::Result<Vec<String>> {
    Ok((0..nvml_indexes()?.len())
        .map(|ordinal| format!("cuda:{ordinal}"))
        .collect())
}

/// The model, the allocator probe and an NVML sampler for `cuda:<i>`.
pub fn runtime(name: &str, weights: Option<&Path>) -> anyhow::Result<DeviceRuntime> {
    let ordinal: usize = name
        .strip_prefix("cuda:")
        .and_then(|index| index.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("device `{name}` is not `cuda:<index>`"))?;
    if nvml().is_none() {
        anyhow::bail!("device `{name}`: no NVIDIA driver");
    }
    // The driver's figures must come from the GPU CUDA runs this device's jobs on.
    let nvml_index = *nvml_indexes()?
        .get(ordinal)
        .ok_or_else(|| anyhow::anyhow!("device `{name}` is not among the GPUs CUDA sees"))?;
    let device = CudaDevice::new(ordinal);
    let generator = DiffusionGenerator::<Cuda>::new(device.clone(), weights)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok(DeviceRuntime {
        generator: Box::new(generator),
        probe: Box::new(CudaProbe { device }),
        sampler: Some(DeviceMemorySampler::spawn(
            Box::new(NvmlSource { index: nvml_index }),
            SAMPLE_PERIOD,
            name,
        )),
    })
}

struct CudaProbe {
    device: CudaDevice,
}

impl DeviceProbe for CudaProbe {
    fn synchronize(&mut self) -> Result<(), SyncError> {
        <Cuda as Backend>::sync(&self.device).map_err(|error| SyncError(format!("{error:?}")))
    }

    fn allocator_usage(&mut self) -> Option<AllocatorUsage> {
        let usage = CudaRuntime::client(&self.device).memory_usage().ok()?;
        Some(AllocatorUsage {
            in_use_bytes: usage.bytes_in_use,
            reserved_bytes: usage.bytes_reserved,
        })
    }
}

struct NvmlSource {
    /// NVML's index of the device, which differs from the CUDA ordinal when
    /// `CUDA_VISIBLE_DEVICES` is set.
    index: u32,
}

impl DeviceMemorySource for NvmlSource {
    fn read(&mut self) -> Option<DeviceMemoryReading> {
        let device = nvml()?.device_by_index(self.index).ok()?;
        let used_bytes = device.memory_info().ok()?.used;
        let pid = std::process::id();
        // In a container without the host's process view the driver lists host PIDs (or
        // nothing): this process is then not found, and its usage is reported as unknown.
        let process_bytes = device
            .running_compute_processes()
            .ok()
            .and_then(|processes| processes.into_iter().find(|p| p.pid == pid))
            .and_then(|process| match process.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => Some(bytes),
                UsedGpuMemory::Unavailable => None,
            });
        Some(DeviceMemoryReading {
            used_bytes,
            process_bytes,
        })
    }

    fn name(&self) -> &'static str {
        "nvml"
    }
}
