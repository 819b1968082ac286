//! Device-level memory sampling: one thread per device reads the driver's figures (NVML) at
//! a fixed rate while a job runs, and keeps the job's start, end and peak, and the rate it
//! achieved.
//!
//! These figures include other processes and the driver's own context, so they are stored
//! in `extra` beside the allocator's, never in place of them. Where the driver cannot see
//! this process's own usage (a container without the host's process view), the reading says
//! so with `process_bytes: None` rather than reporting 0.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::measure::mib;

/// One reading of a device's memory, as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemoryReading {
    /// Bytes used on the device by every process and the driver.
    pub used_bytes: u64,
    /// Bytes used by this process, or `None` where the driver cannot tell.
    pub process_bytes: Option<u64>,
}

/// Where device-level readings come from (NVML on a GPU host).
pub trait DeviceMemorySource: Send + 'static {
    /// Reads the device's memory, or `None` when the reading failed.
    fn read(&mut self) -> Option<DeviceMemoryReading>;

    /// Names the source in the stored figures, e.g. `nvml`.
    fn name(&self) -> &'static str;
}

/// Device-level figures for one job, stored under `extra.device_memory`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceUsage {
    /// Where the figures come from.
    pub source: &'static str,
    /// Device memory used at the job's start, in MiB.
    pub used_start_mib: Option<f64>,
    /// Device memory used at the job's end, in MiB.
    pub used_end_mib: Option<f64>,
    /// The most device memory used at any sample during the job, in MiB.
    pub used_peak_mib: Option<f64>,
    /// This process's own usage at its peak, in MiB; `None` when the driver cannot see it.
    pub process_peak_mib: Option<f64>,
    /// Whether the driver could see this process's own usage.
    pub process_visible: bool,
    /// How many readings the job's figures come from.
    pub samples: u64,
    /// Readings per second achieved between the job's first and last reading; `None` with
    /// fewer than two readings.
    pub samples_per_second: Option<f64>,
}

#[derive(Default)]
struct Session {
    start: Option<DeviceMemoryReading>,
    last: Option<DeviceMemoryReading>,
    peak_used_bytes: Option<u64>,
    peak_process_bytes: Option<u64>,
    process_visible: bool,
    samples: u64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl Session {
    fn record(&mut self, reading: Option<DeviceMemoryReading>, at: Instant) {
        let Some(reading) = reading else { return };
        self.samples += 1;
        self.first_at.get_or_insert(at);
        self.last_at = Some(at);
        self.start.get_or_insert(reading);
        self.last = Some(reading);
        self.peak_used_bytes = Some(self.peak_used_bytes.unwrap_or(0).max(reading.used_bytes));
        if let Some(process) = reading.process_bytes {
            self.process_visible = true;
            self.peak_process_bytes = Some(self.peak_process_bytes.unwrap_or(0).max(process));
        }
    }
}

struct State {
    session: Option<Session>,
    stopping: bool,
}

struct Shared {
    source: Mutex<Box<dyn DeviceMemorySource>>,
    state: Mutex<State>,
    wake: Condvar,
    name: &'static str,
}

impl Shared {
    fn read_into_session(&self) {
        let reading = self
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read();
        let at = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(session) = state.session.as_mut() {
            session.record(reading, at);
        }
    }
}

/// A sampler thread for one device. It sleeps while no job runs on the device.
pub struct DeviceMemorySampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceMemorySampler {
    /// Starts the thread; it reads `source` every `period` while a job runs.
    pub fn spawn(source: Box<dyn DeviceMemorySource>, period: Duration, device: &str) -> Self {
        let shared = Arc::new(Shared {
            name: source.name(),
            source: Mutex::new(source),
            state: Mutex::new(State {
                session: None,
                stopping: false,
            }),
            wake: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("memory-sampler-{device}"))
            .spawn(move || sample_loop(&thread_shared, period))
            .expect("the OS refused to start a sampler thread");
        DeviceMemorySampler {
            shared,
            thread: Some(thread),
        }
    }

    /// Starts a job's figures with a reading taken now, and wakes the thread.
    pub fn begin_job(&self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .session = Some(Session::default());
        self.shared.read_into_session();
        self.shared.wake.notify_one();
    }

    /// Takes a last reading, ends the job's figures, and lets the thread sleep.
    pub fn end_job(&self) -> DeviceUsage {
        self.shared.read_into_session();
        let session = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .session
            .take()
            .unwrap_or_default();
        let samples_per_second = match (session.first_at, session.last_at) {
            (Some(first), Some(last)) if last > first => {
                Some((session.samples - 1) as f64 / (last - first).as_secs_f64())
            }
            _ => None,
        };
        DeviceUsage {
            source: self.shared.name,
            used_start_mib: session.start.map(|r| mib(r.used_bytes)),
            used_end_mib: session.last.map(|r| mib(r.used_bytes)),
            used_peak_mib: session.peak_used_bytes.map(mib),
            process_peak_mib: session.peak_process_bytes.map(mib),
            process_visible: session.process_visible,
            samples: session.samples,
            samples_per_second,
        }
    }
}

impl Drop for DeviceMemorySampler {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopping = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sample_loop(shared: &Shared, period: Duration) {
    loop {
        {
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            while state.session.is_none() && !state.stopping {
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.stopping {
                return;
            }
        }

        // Readings are scheduled on a deadline, so the time a reading takes (an NVML call can
        // take milliseconds) does not lower the rate.
        let mut tick = Instant::now();
        loop {
            shared.read_into_session();
            tick = next_tick(tick, period, Instant::now());
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            while state.session.is_some() && !state.stopping {
                let left = tick.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = shared
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if state.session.is_none() || state.stopping {
                break;
            }
        }
    }
}

/// The instant of the reading after the one scheduled at `scheduled`: one `period` later, or,
/// when readings have fallen behind (`now` is past that), the first tick of the same grid
/// still ahead. Missed ticks are skipped rather than read in a burst, which would count
/// readings without adding information.
fn next_tick(scheduled: Instant, period: Duration, now: Instant) -> Instant {
    let next = scheduled + period;
    if next > now || period.is_zero() {
        return next;
    }
    let missed = (now - scheduled).as_nanos() / period.as_nanos();
    scheduled + period.mul_f64((missed + 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Scripted(Arc<AtomicU64>, Option<u64>);

    impl DeviceMemorySource for Scripted {
        fn read(&mut self) -> Option<DeviceMemoryReading> {
            Some(DeviceMemoryReading {
                used_bytes: self.0.load(Ordering::SeqCst),
                process_bytes: self.1,
            })
        }

        fn name(&self) -> &'static str {
            "scripted"
        }
    }

    #[test]
    fn ticks_follow_a_fixed_grid_and_skip_the_ones_already_missed() {
        let start = Instant::now();
        let period = Duration::from_millis(10);
        let at = |millis: u64| start + Duration::from_millis(millis);

        // A reading that took 3 ms does not push the schedule back.
        assert_eq!(next_tick(start, period, at(3)), at(10));
        assert_eq!(next_tick(at(10), period, at(19)), at(20));
        // A reading that ended on the next tick, or 25 ms late, goes to the next tick ahead.
        assert_eq!(next_tick(at(20), period, at(30)), at(40));
        assert_eq!(next_tick(at(20), period, at(55)), at(60));
    }

    #[test]
    fn the_rate_achieved_is_recorded_with_the_count() {
        let used = Arc::new(AtomicU64::new(100 << 20));
        let sampler = DeviceMemorySampler::spawn(
            Box::new(Scripted(Arc::clone(&used), Some(1 << 20))),
            Duration::from_millis(10),
            "test",
        );

        sampler.begin_job();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let samples = sampler
                .shared
                .state
                .lock()
                .unwrap()
                .session
                .as_ref()
                .unwrap()
                .samples;
            assert!(Instant::now() < deadline, "only {samples} readings in 10 s");
            if samples >= 30 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let usage = sampler.end_job();

        assert!(usage.samples >= 31, "{usage:?}");
        let rate = usage.samples_per_second.expect("a rate from 31 readings");
        // 100 Hz asked; a loaded machine may delay the thread, so only a floor far below it.
        assert!(rate >= 20.0, "{rate} readings per second");
        assert!(
            rate <= 150.0,
            "no bursts of catch-up readings: {rate} per second"
        );
    }

    #[test]
    fn a_job_keeps_its_own_peak_and_hidden_process_usage_is_reported_as_unknown() {
        let used = Arc::new(AtomicU64::new(100 << 20));
        let sampler = DeviceMemorySampler::spawn(
            Box::new(Scripted(Arc::clone(&used), None)),
            Duration::from_millis(1),
            "test",
        );

        sampler.begin_job();
        used.store(900 << 20, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let seen = sampler
                .shared
                .state
                .lock()
                .unwrap()
                .session
                .as_ref()
                .unwrap()
                .peak_used_bytes;
            if seen == Some(900 << 20) || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        used.store(200 << 20, Ordering::SeqCst);
        let first = sampler.end_job();
        assert_eq!(first.used_start_mib, Some(100.0));
        assert_eq!(first.used_peak_mib, Some(900.0));
        assert_eq!(first.used_end_mib, Some(200.0));
        assert_eq!(first.process_peak_mib, None);
        assert!(!first.process_visible);

        sampler.begin_job();
        let second = sampler.end_job();
        assert_eq!(
            second.used_peak_mib,
            Some(200.0),
            "the peak is reset at each job"
        );
    }
}
