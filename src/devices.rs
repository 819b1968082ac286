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
        let gpus = gpu_names()?;
        if gpus.is_empty() {
            return Ok(vec!["cpu".to_owned()]);
        }
        return Ok(gpus);
    }
    check_list(requested, cfg!(feature = "cuda"), || Ok(gpu_names()?.len()))
}

/// Checks a list of device names against the build (`cuda_built`) and the number of GPUs
/// CUDA numbers (`gpu_count`, asked only when a GPU is named).
fn check_list(
    requested: &str,
    cuda_built: bool,
    gpu_count: impl Fn() -> anyhow::Result<usize>,
) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut gpus_taken = Vec::new();
    for name in requested.split(',').map(str::trim) {
        if name == "cpu" {
            names.push(name.to_owned());
            continue;
        }
        let Some(index) = name.strip_prefix("cuda:") else {
            anyhow::bail!("device `{name}` is not `cpu` or `cuda:<index>`");
        };
        let index: usize = index
            .parse()
            .with_context(|| format!("device `{name}`: the index is not a number"))?;
        if !cuda_built {
            anyhow::bail!("device `{name}` needs a build with the `cuda` feature");
        }
        let count = gpu_count()?;
        if index >= count {
            anyhow::bail!("device `{name}` does not exist: CUDA sees {count} GPU(s)");
        }
        // Two workers on one GPU would read the same allocator and driver, and each job's
        // figures would include the other's work; the CPU has no such shared figures.
        if gpus_taken.contains(&index) {
            anyhow::bail!(
                "the devices setting (`--devices` or SEIDRA_DEVICES) lists cuda:{index} twice: \
                 one worker per GPU"
            );
        }
        gpus_taken.push(index);
        // Rows name the device as CUDA does: `cuda:01` is `cuda:1`.
        names.push(format!("cuda:{index}"));
    }
    Ok(names)
}

/// `cuda:<i>` for every GPU CUDA will number, in a CUDA build; empty otherwise.
fn gpu_names() -> anyhow::Result<Vec<String>> {
    #[cfg(feature = "cuda")]
    {
        cuda::gpu_names()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Vec::new())
    }
}

/// The NVML index of each CUDA ordinal, in order. CUDA numbers only the GPUs listed in
/// `CUDA_VISIBLE_DEVICES` (`visible`), in the order listed, each entry an index in PCI order
/// or a `GPU-` UUID, possibly shortened; without that variable it numbers every GPU in PCI
/// order, as NVML does. `nvml_uuids` holds each NVML device's UUID, by NVML index.
///
/// An entry that matches no GPU, or more than one, is refused: the figures of a job would
/// otherwise be read from another GPU than the one it ran on.
pub fn cuda_to_nvml(visible: Option<&str>, nvml_uuids: &[String]) -> anyhow::Result<Vec<u32>> {
    let Some(visible) = visible else {
        return Ok((0..nvml_uuids.len() as u32).collect());
    };
    let mut indexes = Vec::new();
    for entry in visible.split(',').map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        let index = if let Ok(index) = entry.parse::<u32>() {
            if index as usize >= nvml_uuids.len() {
                anyhow::bail!(
                    "CUDA_VISIBLE_DEVICES entry `{entry}`: NVML sees {} GPU(s)",
                    nvml_uuids.len()
                );
            }
            index
        } else if entry.starts_with("GPU-") {
            let matching: Vec<u32> = (0..nvml_uuids.len() as u32)
                .filter(|&index| nvml_uuids[index as usize].starts_with(entry))
                .collect();
            match matching[..] {
                [index] => index,
                [] => anyhow::bail!("CUDA_VISIBLE_DEVICES entry `{entry}` matches no GPU's UUID"),
                _ => anyhow::bail!(
                    "CUDA_VISIBLE_DEVICES entry `{entry}` matches several GPUs' UUIDs"
                ),
            }
        } else {
            anyhow::bail!(
                "CUDA_VISIBLE_DEVICES entry `{entry}` is not a GPU index or a `GPU-` UUID \
                 (MIG instances are not supported)"
            );
        };
        if indexes.contains(&index) {
            anyhow::bail!("CUDA_VISIBLE_DEVICES lists GPU {index} twice (as `{entry}`)");
        }
        indexes.push(index);
    }
    Ok(indexes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn uuids() -> Vec<String> {
        [
            "GPU-8932f937-aaaa",
            "GPU-0a1b2c3d-bbbb",
            "GPU-0a1bffff-cccc",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn without_the_cuda_feature_auto_is_the_cpu_and_a_gpu_is_refused() {
        assert_eq!(resolve("auto").unwrap(), ["cpu"]);
        assert_eq!(resolve("").unwrap(), ["cpu"]);
        let error = resolve("cuda:0").unwrap_err().to_string();
        assert!(error.contains("`cuda` feature"), "{error}");
    }

    #[test]
    fn names_are_checked_and_a_gpu_listed_twice_is_refused() {
        let two_gpus = || Ok(2);
        assert_eq!(
            check_list("cpu, cpu", true, two_gpus).unwrap(),
            ["cpu", "cpu"]
        );
        assert_eq!(
            check_list("cuda:1,cpu,cuda:0", true, two_gpus).unwrap(),
            ["cuda:1", "cpu", "cuda:0"]
        );
        assert_eq!(
            check_list(" cuda:01 ", true, two_gpus).unwrap(),
            ["cuda:1"],
            "named as CUDA names it"
        );
        let error = format!("{:#}", check_list("cuda:x", true, two_gpus).unwrap_err());
        assert!(
            error.contains("`cuda:x`") && error.contains("not a number"),
            "{error}"
        );
        let error = check_list("gpu0", true, two_gpus).unwrap_err().to_string();
        assert!(error.contains("`gpu0`"), "{error}");
        let error = check_list("cuda:2", true, two_gpus)
            .unwrap_err()
            .to_string();
        assert!(error.contains("CUDA sees 2 GPU(s)"), "{error}");
        for twice in ["cuda:0,cuda:0", "cuda:1, cpu, cuda:01"] {
            let error = check_list(twice, true, two_gpus).unwrap_err().to_string();
            assert!(
                error.contains("--devices") && error.contains("twice"),
                "{twice}: {error}"
            );
        }
        let error = check_list("cuda:0", false, two_gpus)
            .unwrap_err()
            .to_string();
        assert!(error.contains("`cuda` feature"), "{error}");
    }

    #[test]
    fn cuda_ordinals_follow_the_visible_list() {
        let uuids = uuids();
        assert_eq!(cuda_to_nvml(None, &uuids).unwrap(), [0, 1, 2]);
        assert_eq!(cuda_to_nvml(Some("2,0"), &uuids).unwrap(), [2, 0]);
        assert_eq!(
            cuda_to_nvml(Some("GPU-0a1bffff-cccc, GPU-8932"), &uuids).unwrap(),
            [2, 0],
            "full and shortened UUIDs"
        );
        assert_eq!(
            cuda_to_nvml(Some("1,GPU-8932f937"), &uuids).unwrap(),
            [1, 0]
        );
        assert!(
            cuda_to_nvml(Some(""), &uuids).unwrap().is_empty(),
            "none visible"
        );
    }

    #[test]
    fn a_visible_entry_that_cannot_be_matched_is_refused() {
        let uuids = uuids();
        for (visible, says) in [
            ("3", "NVML sees 3 GPU(s)"),
            ("GPU-ffff", "matches no GPU"),
            ("GPU-0a1b", "matches several"),
            ("MIG-1234", "not a GPU index"),
            ("-1", "not a GPU index"),
            ("0,GPU-8932", "twice"),
        ] {
            let error = cuda_to_nvml(Some(visible), &uuids).unwrap_err().to_string();
            assert!(error.contains("CUDA_VISIBLE_DEVICES"), "{error}");
            assert!(error.contains(says), "{visible}: {error}");
        }
    }
}
