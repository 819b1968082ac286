//! What measuring a generation costs: the built-in model on the CPU, run with and without
//! the meter (a [`JobMeter`] sampled after every step on a probe that reports allocator
//! figures as a GPU's does, and a [`DeviceMemorySampler`] thread on a cheap source at the
//! CUDA build's 10 ms period), and the sampler thread's own CPU time, idle and during a job.
//!
//! `cargo bench --bench measurement` prints criterion's figures, then an interleaved A/B run
//! of the same two cases with the overhead in percent, then the meter's own cost per job
//! (start, a sample per step, finish, around no work) as a share of a generation, then the
//! sampler's CPU cost.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use criterion::Criterion;
use image::RgbImage;
use seidra::generation::{GenerationRequest, MediaType};
use seidra::measure::{
    AllocatorUsage, DeviceMemoryReading, DeviceMemorySampler, DeviceMemorySource, DeviceProbe,
    JobMeter, Measurement, SyncError,
};
use seidra::model::diffusion::{BUILTIN_MODEL, DiffusionGenerator, RunToEnd};
use seidra::model::{Generator, StepObserver};

/// The CUDA build reads NVML at this period.
const SAMPLE_PERIOD: Duration = Duration::from_millis(10);

/// A/B pairs in the interleaved comparison.
const PAIRS: usize = 60;

/// How long the sampler's CPU time is read over, idle and busy.
const CPU_WINDOW: Duration = Duration::from_secs(5);

/// A device-memory source that costs next to nothing, so that what is measured is the
/// sampler's own machinery (thread wake-ups, locks), not a driver call.
struct CheapSource {
    reads: Arc<AtomicU64>,
}

impl DeviceMemorySource for CheapSource {
    fn read(&mut self) -> Option<DeviceMemoryReading> {
        let reads = self.reads.fetch_add(1, Ordering::Relaxed);
        Some(DeviceMemoryReading {
            used_bytes: (512 << 20) + (reads & 0xff),
            process_bytes: Some(256 << 20),
        })
    }

    fn name(&self) -> &'static str {
        "bench"
    }
}

/// A probe with allocator figures that move at every read, so that the meter's per-step
/// sample does the bookkeeping it does on a GPU (the CPU's own probe reports none).
#[derive(Default)]
struct AllocatorProbe {
    reads: u64,
}

impl DeviceProbe for AllocatorProbe {
    fn synchronize(&mut self) -> Result<(), SyncError> {
        Ok(())
    }

    fn allocator_usage(&mut self) -> Option<AllocatorUsage> {
        self.reads += 1;
        Some(AllocatorUsage {
            in_use_bytes: (64 << 20) + (self.reads % 7) * (1 << 20),
            reserved_bytes: 256 << 20,
        })
    }
}

/// Samples the meter after every step, as the device worker's observer does.
struct Metered<'a, 'm> {
    meter: &'a mut JobMeter<'m>,
}

impl StepObserver for Metered<'_, '_> {
    fn step_finished(&mut self, _done: u32, _total: u32) -> std::ops::ControlFlow<()> {
        self.meter.sample();
        std::ops::ControlFlow::Continue(())
    }
}

/// One 32×32 image in 4 steps.
fn small_request() -> GenerationRequest {
    GenerationRequest {
        media_type: MediaType::Image,
        prompt: "a lighthouse at dusk".to_owned(),
        model_name: BUILTIN_MODEL.to_owned(),
        width: 32,
        height: 32,
        steps: 4,
        seed: 7,
        images: 1,
        frames: 0,
        fps: 0,
        scheduler: "ddim".to_owned(),
        loras: Vec::new(),
    }
}

struct Bench {
    generator: DiffusionGenerator<NdArray>,
    probe: AllocatorProbe,
    sampler: DeviceMemorySampler,
    request: GenerationRequest,
}

impl Bench {
    fn new() -> Self {
        Bench {
            generator: DiffusionGenerator::new(NdArrayDevice::Cpu, None)
                .expect("the built-in model builds"),
            probe: AllocatorProbe::default(),
            sampler: DeviceMemorySampler::spawn(
                Box::new(CheapSource {
                    reads: Arc::default(),
                }),
                SAMPLE_PERIOD,
                "bench",
            ),
            request: small_request(),
        }
    }

    fn unmeasured(&mut self) -> Vec<RgbImage> {
        self.generator
            .generate(&self.request, &mut RunToEnd)
            .expect("the generation succeeds")
    }

    fn measured(&mut self) -> (Vec<RgbImage>, Measurement) {
        let mut meter = JobMeter::start(&mut self.probe, Some(&self.sampler));
        let images = self
            .generator
            .generate(&self.request, &mut Metered { meter: &mut meter })
            .expect("the generation succeeds");
        let measurement = meter.finish().expect("the CPU always synchronises");
        (images, measurement)
    }
}

fn criterion_benches(c: &mut Criterion, bench: &mut Bench) {
    let mut group = c.benchmark_group("generate_32x32_4_steps");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("measurement_off", |b| {
        b.iter(|| black_box(bench.unmeasured()))
    });
    group.bench_function("measurement_on", |b| b.iter(|| black_box(bench.measured())));
    group.finish();

    // The meter alone, around no work: a start (baseline, sampler wakes up) and a finish
    // (synchronise, last reading, sampler goes idle).
    c.bench_function("meter_start_finish_empty_job", |b| {
        b.iter(|| {
            let meter = JobMeter::start(&mut bench.probe, Some(&bench.sampler));
            black_box(meter.finish().expect("the probe always synchronises"))
        })
    });
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// Runs the two cases in alternating order so that drift (thermal, other processes) falls on
/// both, and prints the overhead of measuring.
fn interleaved_overhead(bench: &mut Bench) {
    let (mut off, mut on, mut differences) = (Vec::new(), Vec::new(), Vec::new());
    for pair in 0..PAIRS {
        let time = |bench: &mut Bench, measured: bool| {
            let started = Instant::now();
            if measured {
                black_box(bench.measured());
            } else {
                black_box(bench.unmeasured());
            }
            started.elapsed().as_secs_f64()
        };
        let (a, b) = if pair % 2 == 0 {
            let a = time(bench, false);
            (a, time(bench, true))
        } else {
            let b = time(bench, true);
            (time(bench, false), b)
        };
        off.push(a);
        on.push(b);
        differences.push(b - a);
    }
    let count = differences.len() as f64;
    let mean = differences.iter().sum::<f64>() / count;
    let variance = differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (count - 1.0);
    let standard_error = (variance / count).sqrt();
    let (off_median, on_median) = (median(&mut off), median(&mut on));
    let difference_median = median(&mut differences);
    let mut spread: Vec<f64> = differences
        .iter()
        .map(|d| (d - difference_median).abs())
        .collect();
    let spread = median(&mut spread);
    println!();
    println!("interleaved A/B, {PAIRS} pairs, 32x32 image, 4 steps, NdArray on the CPU:");
    println!("  measurement off: median {:.2} ms", off_median * 1e3);
    println!("  measurement on:  median {:.2} ms", on_median * 1e3);
    println!(
        "  overhead: median paired difference {:+.3} ms = {:+.2} % (median absolute deviation of the differences {:.3} ms = {:.2} %)",
        difference_median * 1e3,
        100.0 * difference_median / off_median,
        spread * 1e3,
        100.0 * spread / off_median,
    );
    println!(
        "  mean paired difference {:+.3} ms = {:+.2} % +/- {:.2} % (one standard error)",
        mean * 1e3,
        100.0 * mean / off_median,
        100.0 * standard_error / off_median,
    );
    meter_cost_alone(bench, off_median);
}

/// The meter's whole cost for one job of the bench's request, around no work: what it adds
/// to a generation however noisy the generation's own time is.
fn meter_cost_alone(bench: &mut Bench, generation_seconds: f64) {
    const JOBS: u32 = 20_000;
    let steps = bench.request.steps;
    let started = Instant::now();
    for _ in 0..JOBS {
        let mut meter = JobMeter::start(&mut bench.probe, Some(&bench.sampler));
        for _ in 0..steps {
            meter.sample();
        }
        black_box(meter.finish().expect("the probe always synchronises"));
    }
    let per_job = started.elapsed().as_secs_f64() / f64::from(JOBS);
    println!(
        "  the meter alone (start, {steps} samples, finish), {JOBS} jobs: {:.2} us a job = {:.3} % of the generation's median",
        per_job * 1e6,
        100.0 * per_job / generation_seconds,
    );
}

/// CPU time a thread has run, in nanoseconds, from `/proc/self/task/<tid>/schedstat`.
fn thread_cpu_ns(tid: &str) -> Option<u64> {
    let schedstat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    schedstat.split_whitespace().next()?.parse().ok()
}

fn task_ids() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The sampler thread's CPU time while no job runs and while one does, over a fixed window.
fn sampler_cpu_cost() {
    let before = task_ids();
    let reads = Arc::new(AtomicU64::new(0));
    let sampler = DeviceMemorySampler::spawn(
        Box::new(CheapSource {
            reads: Arc::clone(&reads),
        }),
        SAMPLE_PERIOD,
        "cpu-cost",
    );
    let tid = task_ids()
        .into_iter()
        .find(|tid| !before.contains(tid))
        .expect("the sampler thread appears in /proc/self/task");
    let Some(start) = thread_cpu_ns(&tid) else {
        println!("sampler CPU cost: /proc/self/task/{tid}/schedstat is not readable here");
        return;
    };

    std::thread::sleep(CPU_WINDOW);
    let idle_ns = thread_cpu_ns(&tid).unwrap_or(start) - start;

    let busy_start = thread_cpu_ns(&tid).unwrap_or(0);
    let reads_start = reads.load(Ordering::Relaxed);
    sampler.begin_job();
    std::thread::sleep(CPU_WINDOW);
    let usage = sampler.end_job();
    let busy_ns = thread_cpu_ns(&tid).unwrap_or(busy_start) - busy_start;
    let busy_reads = reads.load(Ordering::Relaxed) - reads_start;

    let window = CPU_WINDOW.as_secs_f64();
    println!();
    println!(
        "sampler thread, period {} ms, cheap source, {} s windows:",
        SAMPLE_PERIOD.as_millis(),
        window
    );
    println!(
        "  idle (no job): {:.3} ms CPU = {:.4} % of one core",
        idle_ns as f64 / 1e6,
        100.0 * idle_ns as f64 / 1e9 / window
    );
    println!(
        "  during a job:  {:.3} ms CPU = {:.4} % of one core, {} readings ({} in the job's figures), {:.1} us CPU per reading",
        busy_ns as f64 / 1e6,
        100.0 * busy_ns as f64 / 1e9 / window,
        busy_reads,
        usage.samples,
        busy_ns as f64 / 1e3 / busy_reads.max(1) as f64
    );
}

fn main() {
    let mut bench = Bench::new();
    let mut criterion = Criterion::default().configure_from_args();
    criterion_benches(&mut criterion, &mut bench);
    criterion.final_summary();

    // `cargo bench -- <filter>` runs criterion's subset only; the summaries need every case.
    if std::env::args().skip(1).any(|arg| !arg.starts_with('-')) {
        return;
    }
    interleaved_overhead(&mut bench);
    sampler_cpu_cost();
}
