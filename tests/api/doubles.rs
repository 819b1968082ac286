//! Test doubles for GPU devices, run through the real actors, meter, sampler and storage.
//!
//! A [`FakeDevice`] is the shared memory of one device: a caching allocator (bytes in use,
//! bytes reserved from the driver), the driver's context, another process's memory, and a
//! clock of queued asynchronous work. The runtime [`FakeGpus::factory`] builds for a device
//! name is a [`FakeGenerator`], a probe and an NVML-like sampler over that same state, so
//! the service measures the double exactly as it measures a GPU.
//!
//! A job's behaviour is the script in its prompt: instructions separated by `;`.
//!
//! | instruction    | what the device does                                                 |
//! | -------------- | -------------------------------------------------------------------- |
//! | `alloc N`      | allocates N MiB for the job; freed when `generate` returns           |
//! | `free N`       | frees N MiB of the job's allocations now                             |
//! | `keep N`       | allocates N MiB that stay resident after the job (a cache)           |
//! | `release N`    | frees N MiB of what earlier jobs kept                                |
//! | `spike N`      | allocates N MiB and frees them before the next step (activations)    |
//! | `work MS`      | runs MS milliseconds on the device, blocking the host                |
//! | `async MS`     | queues MS milliseconds of work; only `synchronize()` waits for it    |
//! | `step`         | ends a denoising step: the observer is told, and may cancel          |
//! | `steps N MS`   | N steps of MS milliseconds each                                      |
//! | `other N`      | another process now holds N MiB on this device (0 releases them)     |
//! | `fail TEXT`    | the model fails: `GenerationError::Model(TEXT)`                      |
//! | `syncfail TEXT`| the job's `synchronize()` fails with TEXT (a device fault)           |
//! | `panic TEXT`   | the model panics with TEXT                                           |
//!
//! An allocation past the device's capacity fails with `GenerationError::OutOfMemory`, as a
//! real allocator does. Sizes are whole MiB, so the figures the service stores are exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use seidra::actors::{DeviceRuntime, RuntimeFactory};
use seidra::generation::GenerationRequest;
use seidra::measure::{
    AllocatorUsage, DeviceMemoryReading, DeviceMemorySampler, DeviceMemorySource, DeviceProbe,
    SyncError,
};
use seidra::model::{GenerationError, Generator, StepObserver};

use crate::helpers::AppOptions;

/// Bytes in one MiB.
pub const MIB: u64 = 1 << 20;

/// The period the CUDA build reads NVML at.
const SAMPLE_PERIOD: Duration = Duration::from_millis(10);

/// The name of the fake driver in `extra.device_memory.source`.
pub const FAKE_SOURCE: &str = "fake-nvml";

/// How a fake device is built.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// The device's name, e.g. `cuda:0`.
    pub name: String,
    /// Device memory, MiB.
    pub capacity_mib: u64,
    /// The driver context of this process, MiB: the driver counts it, the allocator does not.
    pub context_mib: u64,
    /// The model's weights, MiB, allocated when the runtime is built.
    pub weights_mib: u64,
    /// Whether the driver cannot see this process (a container without the host's process
    /// view): its readings then carry no figure for this process.
    pub process_hidden: bool,
}

impl DeviceSpec {
    /// An 8 GiB device with a 300 MiB context and 200 MiB of weights.
    pub fn new(name: &str) -> Self {
        DeviceSpec {
            name: name.to_owned(),
            capacity_mib: 8192,
            context_mib: 300,
            weights_mib: 200,
            process_hidden: false,
        }
    }
}

/// One device's memory at a moment, as its allocator and its driver see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryState {
    /// Bytes held by live tensors.
    pub in_use_bytes: u64,
    /// Bytes the allocator holds from the driver: in use, or cached for reuse.
    pub reserved_bytes: u64,
    /// This process's driver context.
    pub context_bytes: u64,
    /// Bytes other processes hold on the device.
    pub other_process_bytes: u64,
    /// The device's memory.
    pub capacity_bytes: u64,
}

impl MemoryState {
    /// What the driver reports as used: every process, and the context.
    pub fn device_used_bytes(&self) -> u64 {
        self.context_bytes + self.reserved_bytes + self.other_process_bytes
    }

    /// What the driver reports for this process.
    pub fn process_bytes(&self) -> u64 {
        self.context_bytes + self.reserved_bytes
    }
}

struct DeviceState {
    memory: MemoryState,
    /// When the work queued so far will have finished.
    busy_until: Option<Instant>,
    /// What the next synchronisation fails with.
    sync_error: Option<String>,
    /// Readings the driver has answered.
    driver_reads: u64,
}

/// The shared state of one fake device; clones share it.
#[derive(Clone)]
pub struct FakeDevice {
    name: String,
    state: Arc<Mutex<DeviceState>>,
}

impl FakeDevice {
    fn new(spec: &DeviceSpec) -> Self {
        FakeDevice {
            name: spec.name.clone(),
            state: Arc::new(Mutex::new(DeviceState {
                memory: MemoryState {
                    capacity_bytes: spec.capacity_mib * MIB,
                    context_bytes: spec.context_mib * MIB,
                    ..MemoryState::default()
                },
                busy_until: None,
                sync_error: None,
                driver_reads: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's memory now.
    pub fn memory(&self) -> MemoryState {
        self.lock().memory
    }

    /// Takes bytes from the cache, or reserves more from the driver when the cache is short.
    pub fn allocate(&self, bytes: u64) -> Result<(), GenerationError> {
        let mut state = self.lock();
        let memory = &mut state.memory;
        let in_use = memory.in_use_bytes + bytes;
        let reserved = memory.reserved_bytes.max(in_use);
        let used = memory.context_bytes + reserved + memory.other_process_bytes;
        if used > memory.capacity_bytes {
            return Err(GenerationError::OutOfMemory(format!(
                "{}: tried to allocate {} MiB with {} MiB free",
                self.name,
                bytes / MIB,
                (memory.capacity_bytes - memory.device_used_bytes()) / MIB
            )));
        }
        memory.in_use_bytes = in_use;
        memory.reserved_bytes = reserved;
        Ok(())
    }

    /// Returns bytes to the allocator's cache; what it reserved stays reserved.
    pub fn free(&self, bytes: u64) {
        let mut state = self.lock();
        state.memory.in_use_bytes = state
            .memory
            .in_use_bytes
            .checked_sub(bytes)
            .expect("the double frees no more than was allocated");
    }

    /// Sets the memory another process holds on this device.
    pub fn set_other_process_mib(&self, mib: u64) {
        self.lock().memory.other_process_bytes = mib * MIB;
    }

    fn queue_work(&self, work: Duration) {
        let mut state = self.lock();
        let now = Instant::now();
        let from = state.busy_until.map_or(now, |until| until.max(now));
        state.busy_until = Some(from + work);
    }

    /// Waits for the queued work; answers the fault it ended with, if any.
    fn wait_idle(&self) -> Result<(), String> {
        let until = self.lock().busy_until.take();
        if let Some(until) = until {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        self.lock().sync_error.take().map_or(Ok(()), Err)
    }

    /// How many readings the driver (the sampler's source) has answered so far.
    pub fn driver_reads(&self) -> u64 {
        self.lock().driver_reads
    }
}

/// One call of `generate` on a fake device.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The device it ran on.
    pub device: String,
    /// The job's prompt (its script).
    pub prompt: String,
    /// When `generate` was called.
    pub started: Instant,
    /// When `generate` returned or unwound.
    pub returned: Instant,
}

type Journal = Arc<Mutex<Vec<RunRecord>>>;

/// One instruction of a job's script.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Alloc(u64),
    Free(u64),
    Keep(u64),
    Release(u64),
    Spike(u64),
    Work(Duration),
    Async(Duration),
    Steps(u32, Duration),
    Other(u64),
    Fail(String),
    SyncFail(String),
    Panic(String),
}

fn parse_script(prompt: &str) -> Result<Vec<Op>, String> {
    prompt
        .split(';')
        .map(str::trim)
        .filter(|instruction| !instruction.is_empty())
        .map(|instruction| {
            let (word, rest) = instruction
                .split_once(' ')
                .map_or((instruction, ""), |(word, rest)| (word, rest.trim()));
            let number = |text: &str| {
                text.parse::<u64>()
                    .map_err(|_| format!("`{instruction}`: `{text}` is not a number"))
            };
            let millis = |text: &str| number(text).map(Duration::from_millis);
            Ok(match word {
                "alloc" => Op::Alloc(number(rest)?),
                "free" => Op::Free(number(rest)?),
                "keep" => Op::Keep(number(rest)?),
                "release" => Op::Release(number(rest)?),
                "spike" => Op::Spike(number(rest)?),
                "work" => Op::Work(millis(rest)?),
                "async" => Op::Async(millis(rest)?),
                "step" => Op::Steps(1, Duration::ZERO),
                "steps" => {
                    let (count, each) = rest
                        .split_once(' ')
                        .ok_or_else(|| format!("`{instruction}`: steps N MS"))?;
                    Op::Steps(number(count)? as u32, millis(each.trim())?)
                }
                "other" => Op::Other(number(rest)?),
                "fail" => Op::Fail(rest.to_owned()),
                "syncfail" => Op::SyncFail(rest.to_owned()),
                "panic" => Op::Panic(rest.to_owned()),
                _ => {
                    return Err(format!(
                        "`{instruction}` is not an instruction of the double"
                    ));
                }
            })
        })
        .collect()
}

/// Memory a job allocated; freed when the job ends however it ends (return, error, panic),
/// as tensors are dropped.
struct JobMemory<'a> {
    device: &'a FakeDevice,
    bytes: u64,
}

impl JobMemory<'_> {
    fn allocate(&mut self, bytes: u64) -> Result<(), GenerationError> {
        self.device.allocate(bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    fn free(&mut self, bytes: u64) -> Result<(), GenerationError> {
        if bytes > self.bytes {
            return Err(GenerationError::InvalidParameters(format!(
                "free {}: the job holds {} MiB",
                bytes / MIB,
                self.bytes / MIB
            )));
        }
        self.device.free(bytes);
        self.bytes -= bytes;
        Ok(())
    }
}

impl Drop for JobMemory<'_> {
    fn drop(&mut self) {
        self.device.free(self.bytes);
    }
}

/// Records a run in the journal when `generate` returns or unwinds.
struct RunGuard<'a> {
    journal: &'a Journal,
    device: &'a str,
    prompt: &'a str,
    started: Instant,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(RunRecord {
                device: self.device.to_owned(),
                prompt: self.prompt.to_owned(),
                started: self.started,
                returned: Instant::now(),
            });
    }
}

/// A model whose every job follows the script in its prompt.
pub struct FakeGenerator {
    device: FakeDevice,
    weights_bytes: u64,
    kept_bytes: u64,
    journal: Journal,
}

impl FakeGenerator {
    fn load(device: FakeDevice, weights_mib: u64, journal: Journal) -> anyhow::Result<Self> {
        let weights_bytes = weights_mib * MIB;
        device
            .allocate(weights_bytes)
            .map_err(|error| anyhow::anyhow!("loading the weights: {error}"))?;
        Ok(FakeGenerator {
            device,
            weights_bytes,
            kept_bytes: 0,
            journal,
        })
    }

    fn run(
        &mut self,
        script: &[Op],
        observer: &mut dyn StepObserver,
    ) -> Result<(), GenerationError> {
        let total: u32 = script
            .iter()
            .map(|op| match op {
                Op::Steps(count, _) => *count,
                _ => 0,
            })
            .sum();
        let mut done = 0;
        let mut memory = JobMemory {
            device: &self.device,
            bytes: 0,
        };
        for op in script {
            match op {
                Op::Alloc(mib) => memory.allocate(mib * MIB)?,
                Op::Free(mib) => memory.free(mib * MIB)?,
                Op::Keep(mib) => {
                    self.device.allocate(mib * MIB)?;
                    self.kept_bytes += mib * MIB;
                }
                Op::Release(mib) => {
                    let bytes = (mib * MIB).min(self.kept_bytes);
                    self.device.free(bytes);
                    self.kept_bytes -= bytes;
                }
                Op::Spike(mib) => {
                    memory.allocate(mib * MIB)?;
                    memory.free(mib * MIB)?;
                }
                Op::Work(time) => std::thread::sleep(*time),
                Op::Async(time) => self.device.queue_work(*time),
                Op::Steps(count, each) => {
                    for _ in 0..*count {
                        std::thread::sleep(*each);
                        done += 1;
                        if observer.step_finished(done, total).is_break() {
                            return Err(GenerationError::Cancelled);
                        }
                    }
                }
                Op::Other(mib) => self.device.set_other_process_mib(*mib),
                Op::Fail(text) => return Err(GenerationError::Model(text.clone())),
                Op::SyncFail(text) => self.device.lock().sync_error = Some(text.clone()),
                Op::Panic(text) => panic!("{text}"),
            }
        }
        Ok(())
    }
}

impl Generator for FakeGenerator {
    fn generate(
        &mut self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<RgbImage>, GenerationError> {
        let journal = Arc::clone(&self.journal);
        let device = self.device.name.clone();
        let _run = RunGuard {
            journal: &journal,
            device: &device,
            prompt: &request.prompt,
            started: Instant::now(),
        };
        let script = parse_script(&request.prompt).map_err(GenerationError::InvalidParameters)?;
        self.run(&script, observer)?;

        let shade = (request.seed % 256) as u8;
        Ok((0..request.expected_outputs())
            .map(|_| RgbImage::from_pixel(request.width, request.height, Rgb([shade, 64, 128])))
            .collect())
    }
}

impl Drop for FakeGenerator {
    fn drop(&mut self) {
        self.device.free(self.weights_bytes + self.kept_bytes);
    }
}

/// The allocator and the device's queue, as the meter sees them.
struct FakeProbe {
    device: FakeDevice,
}

impl DeviceProbe for FakeProbe {
    fn synchronize(&mut self) -> Result<(), SyncError> {
        self.device.wait_idle().map_err(SyncError)
    }

    fn allocator_usage(&mut self) -> Option<AllocatorUsage> {
        let memory = self.device.memory();
        Some(AllocatorUsage {
            in_use_bytes: memory.in_use_bytes,
            reserved_bytes: memory.reserved_bytes,
        })
    }
}

/// The driver's view of the device, as the sampler thread reads it.
struct FakeDriver {
    device: FakeDevice,
    process_hidden: bool,
}

impl DeviceMemorySource for FakeDriver {
    fn read(&mut self) -> Option<DeviceMemoryReading> {
        let memory = {
            let mut state = self.device.lock();
            state.driver_reads += 1;
            state.memory
        };
        Some(DeviceMemoryReading {
            used_bytes: memory.device_used_bytes(),
            process_bytes: (!self.process_hidden).then(|| memory.process_bytes()),
        })
    }

    fn name(&self) -> &'static str {
        FAKE_SOURCE
    }
}

/// A host of fake GPUs: their shared state, and the factory the service builds them with.
#[derive(Clone)]
pub struct FakeGpus {
    specs: Vec<DeviceSpec>,
    devices: HashMap<String, FakeDevice>,
    journal: Journal,
    starts: Arc<Mutex<HashMap<String, u32>>>,
}

impl FakeGpus {
    /// Devices built from `specs`, in order.
    pub fn new(specs: Vec<DeviceSpec>) -> Self {
        let devices = specs
            .iter()
            .map(|spec| (spec.name.clone(), FakeDevice::new(spec)))
            .collect();
        FakeGpus {
            specs,
            devices,
            journal: Journal::default(),
            starts: Arc::default(),
        }
    }

    /// One device of each name, with [`DeviceSpec::new`]'s figures.
    pub fn named(names: &[&str]) -> Self {
        Self::new(names.iter().map(|name| DeviceSpec::new(name)).collect())
    }

    /// A device's shared state.
    pub fn device(&self, name: &str) -> &FakeDevice {
        &self.devices[name]
    }

    /// A device's spec.
    pub fn spec(&self, name: &str) -> &DeviceSpec {
        self.specs
            .iter()
            .find(|spec| spec.name == name)
            .expect("a device of this host")
    }

    /// How many times the service built the device's runtime (1, plus one per restart).
    pub fn starts(&self, name: &str) -> u32 {
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// Every `generate` call so far, in the order they ended.
    pub fn runs(&self) -> Vec<RunRecord> {
        self.journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The runs of the job whose prompt is `prompt`.
    pub fn runs_of(&self, prompt: &str) -> Vec<RunRecord> {
        self.runs()
            .into_iter()
            .filter(|run| run.prompt == prompt)
            .collect()
    }

    /// Builds a device's runtime on the real worker thread: model, probe and sampler.
    pub fn factory(&self) -> RuntimeFactory {
        let gpus = self.clone();
        Arc::new(move |name: &str| -> anyhow::Result<DeviceRuntime> {
            let device = gpus
                .devices
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("device `{name}` is not a fake GPU"))?
                .clone();
            *gpus
                .starts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(name.to_owned())
                .or_default() += 1;
            let generator = FakeGenerator::load(
                device.clone(),
                gpus.spec(name).weights_mib,
                Arc::clone(&gpus.journal),
            )?;
            Ok(DeviceRuntime {
                generator: Box::new(generator),
                probe: Box::new(FakeProbe {
                    device: device.clone(),
                }),
                sampler: Some(DeviceMemorySampler::spawn(
                    Box::new(FakeDriver {
                        device,
                        process_hidden: gpus.spec(name).process_hidden,
                    }),
                    SAMPLE_PERIOD,
                    name,
                )),
            })
        })
    }

    /// Options that start the service on these devices.
    pub fn app_options(&self) -> AppOptions {
        AppOptions {
            devices: self.specs.iter().map(|spec| spec.name.clone()).collect(),
            factory: Some(self.factory()),
            ..AppOptions::default()
        }
    }
}

#[test]
fn scripts_parse_and_a_typo_is_named() {
    assert_eq!(
        parse_script("alloc 64; step; steps 3 20; async 2000; fail boom; other 0"),
        Ok(vec![
            Op::Alloc(64),
            Op::Steps(1, Duration::ZERO),
            Op::Steps(3, Duration::from_millis(20)),
            Op::Async(Duration::from_secs(2)),
            Op::Fail("boom".to_owned()),
            Op::Other(0),
        ])
    );
    let error = parse_script("alloc 64; allocate 3").unwrap_err();
    assert!(error.contains("allocate 3"), "{error}");
}

#[test]
fn the_allocator_reuses_its_cache_before_reserving_more() {
    let gpus = FakeGpus::named(&["cuda:0"]);
    let device = gpus.device("cuda:0");
    device.allocate(100 * MIB).unwrap();
    device.free(100 * MIB);
    device.allocate(64 * MIB).unwrap();
    let memory = device.memory();
    assert_eq!(memory.in_use_bytes, 64 * MIB);
    assert_eq!(memory.reserved_bytes, 100 * MIB, "served from the cache");
    assert_eq!(memory.device_used_bytes(), (300 + 100) * MIB);

    let error = device.allocate(8192 * MIB).unwrap_err();
    assert_eq!(error.kind(), "out_of_memory");
    assert_eq!(
        device.memory(),
        memory,
        "a failed allocation changes nothing"
    );
}
