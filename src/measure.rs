//! Measuring one generation on one device: inference time on a monotonic clock that stops
//! only after the device has finished, and the allocator's memory figures for the job.
//!
//! A [`DeviceProbe`] is the device as the meter sees it: it can wait for queued work and
//! report its allocator's bytes. The CPU probe has no device memory, so its figures are
//! `None` and end up NULL in the table. Device-level figures (NVML) come from a separate
//! sampler thread, see [`sampler`].

pub mod sampler;

use std::time::{Duration, Instant};

use thiserror::Error;

pub use sampler::{DeviceMemoryReading, DeviceMemorySampler, DeviceMemorySource, DeviceUsage};

/// Bytes in one MiB, the unit of every `vram_*_mb` column.
pub const BYTES_PER_MIB: f64 = 1_048_576.0;

/// The allocator's view of a device's memory at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorUsage {
    /// Bytes held by live tensors.
    pub in_use_bytes: u64,
    /// Bytes the allocator holds from the driver, in use or cached.
    pub reserved_bytes: u64,
}

/// A device could not finish its work.
#[derive(Debug, Error)]
#[error("device synchronisation failed: {0}")]
pub struct SyncError(pub String);

/// The device a generation runs on, as the meter sees it.
pub trait DeviceProbe: Send {
    /// Blocks until every piece of work queued on the device has finished.
    fn synchronize(&mut self) -> Result<(), SyncError>;

    /// The allocator's current figures, or `None` for a device without its own memory.
    fn allocator_usage(&mut self) -> Option<AllocatorUsage>;
}

/// The probe of the CPU device: work is done when the call returns, and there is no device
/// memory to report.
#[derive(Debug, Default)]
pub struct CpuProbe;

impl DeviceProbe for CpuProbe {
    fn synchronize(&mut self) -> Result<(), SyncError> {
        Ok(())
    }

    fn allocator_usage(&mut self) -> Option<AllocatorUsage> {
        None
    }
}

/// The allocator's figures for one job, in MiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VramFigures {
    /// In use at the end of the job.
    pub allocated_mib: f64,
    /// Held from the driver at the end of the job.
    pub reserved_mib: f64,
    /// The most in use at any sample of the job.
    pub peak_mib: f64,
    /// The peak minus what was in use at the start of the job.
    pub delta_mib: f64,
}

/// What the meter measured for one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Inference time, from the start of work to the device's last synchronisation.
    pub duration: Duration,
    /// Allocator figures, `None` on a device without its own memory.
    pub vram: Option<VramFigures>,
    /// Device-level figures from the sampler thread, when there is one.
    pub device_usage: Option<DeviceUsage>,
}

/// Times and samples one job. Create it right before the first piece of work is queued;
/// call [`JobMeter::sample`] after every step and [`JobMeter::finish`] after the last.
pub struct JobMeter<'a> {
    probe: &'a mut dyn DeviceProbe,
    sampler: Option<&'a DeviceMemorySampler>,
    started: Instant,
    baseline_in_use_bytes: Option<u64>,
    peak_in_use_bytes: Option<u64>,
}

impl<'a> JobMeter<'a> {
    /// Waits for the device to finish what earlier jobs left queued, then reads the memory
    /// baseline, resets the peak to it, and starts the clock.
    pub fn start(probe: &'a mut dyn DeviceProbe, sampler: Option<&'a DeviceMemorySampler>) -> Self {
        // A job that failed or was cancelled is abandoned without waiting for the device, so
        // its queued work may still be running; on this job's clock it would be counted as
        // this job's inference. Its fault, if any, belongs to that job, which already has its
        // failed row.
        if let Err(error) = probe.synchronize() {
            tracing::warn!(error = %error, "work left by an earlier job failed on the device");
        }
        let baseline = probe.allocator_usage().map(|usage| usage.in_use_bytes);
        if let Some(sampler) = sampler {
            sampler.begin_job();
        }
        JobMeter {
            probe,
            sampler,
            started: Instant::now(),
            baseline_in_use_bytes: baseline,
            peak_in_use_bytes: baseline,
        }
    }

    /// Records the allocator's bytes in use into the job's peak.
    // FIXME: the peak is sampled after each step, so memory a step allocates and frees within
    // itself (activations of a forward pass) is missed: `vram_peak_mb` and `vram_delta_mb` are
    // lower bounds on a GPU. cubecl 0.10 keeps no resettable peak counter to read instead.
    pub fn sample(&mut self) {
        if let Some(usage) = self.probe.allocator_usage() {
            self.peak_in_use_bytes =
                Some(self.peak_in_use_bytes.unwrap_or(0).max(usage.in_use_bytes));
        }
    }

    /// When the clock started: the device had finished earlier work and this job's began.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time since the start, for a job that ends early (failure or cancellation).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the clock of a job that ended without a result, so that the sampler thread goes
    /// idle again. The device is not waited for, since its work is being dropped; the next
    /// job's [`JobMeter::start`] waits for it instead, before its clock starts.
    pub fn abandon(self) -> Duration {
        let elapsed = self.started.elapsed();
        if let Some(sampler) = self.sampler {
            sampler.end_job();
        }
        elapsed
    }

    /// Waits for the device to finish, stops the clock, and takes the final figures.
    pub fn finish(mut self) -> Result<Measurement, SyncError> {
        if let Err(error) = self.probe.synchronize() {
            if let Some(sampler) = self.sampler {
                sampler.end_job();
            }
            return Err(error);
        }
        let duration = self.started.elapsed();

        self.sample();
        let end = self.probe.allocator_usage();
        let vram = end.map(|end| {
            let peak = self.peak_in_use_bytes.unwrap_or(end.in_use_bytes);
            let baseline = self.baseline_in_use_bytes.unwrap_or(0);
            VramFigures {
                allocated_mib: mib(end.in_use_bytes),
                reserved_mib: mib(end.reserved_bytes),
                peak_mib: mib(peak),
                delta_mib: mib(peak.saturating_sub(baseline)),
            }
        });
        let device_usage = self.sampler.map(DeviceMemorySampler::end_job);
        Ok(Measurement {
            duration,
            vram,
            device_usage,
        })
    }
}

/// Bytes to MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / BYTES_PER_MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with queued work: its allocator frees the work's memory only once
    /// synchronised.
    struct Busy {
        queued_bytes: u64,
        syncs: u32,
    }

    impl DeviceProbe for Busy {
        fn synchronize(&mut self) -> Result<(), SyncError> {
            self.syncs += 1;
            self.queued_bytes = 0;
            Ok(())
        }

        fn allocator_usage(&mut self) -> Option<AllocatorUsage> {
            Some(AllocatorUsage {
                in_use_bytes: (200 << 20) + self.queued_bytes,
                reserved_bytes: 1 << 30,
            })
        }
    }

    #[test]
    fn the_start_waits_for_earlier_work_before_reading_the_baseline() {
        let mut probe = Busy {
            queued_bytes: 500 << 20,
            syncs: 0,
        };
        let meter = JobMeter::start(&mut probe, None);
        let measurement = meter.finish().unwrap();
        let vram = measurement.vram.unwrap();
        assert_eq!(vram.peak_mib, 200.0, "the earlier work's memory is gone");
        assert_eq!(vram.delta_mib, 0.0);
        assert_eq!(probe.syncs, 2, "once at the start, once at the end");
    }
}
