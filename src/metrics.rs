//! Prometheus metrics of committed generations, in the text exposition format.
//!
//! They are recorded as each row is published, so they count exactly the rows in the table.
//! Labels come from validated values only (media type, a loaded model, a configured device,
//! a status), never from free user input.

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, Opts, Registry, TextEncoder,
};

use crate::events::GenerationItem;

/// Buckets of inference time, in seconds: sub-second images up to hour-long videos.
pub const DURATION_BUCKETS_SECONDS: [f64; 16] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0,
];

/// The service's metrics and the registry that exposes them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    duration: HistogramVec,
    queue_wait: HistogramVec,
    outputs: CounterVec,
    generations: CounterVec,
    vram_peak: GaugeVec,
    vram_allocated: GaugeVec,
    vram_reserved: GaugeVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let labels = ["media_type", "model", "device"];
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS_SECONDS.to_vec());
            let histogram = HistogramVec::new(opts, &labels).expect("a valid histogram");
            registry
                .register(Box::new(histogram.clone()))
                .expect("a unique name");
            histogram
        };
        let gauge = |name: &str, help: &str| {
            let gauge = GaugeVec::new(Opts::new(name, help), &["device"]).expect("a valid gauge");
            registry
                .register(Box::new(gauge.clone()))
                .expect("a unique name");
            gauge
        };
        let duration = histogram(
            "seidra_generation_duration_seconds",
            "Inference time of succeeded generations, device synchronised.",
        );
        let queue_wait = histogram(
            "seidra_generation_queue_wait_seconds",
            "Time between submission and the start of work on the device.",
        );
        let outputs = CounterVec::new(
            Opts::new(
                "seidra_generation_outputs_total",
                "Images and frames produced.",
            ),
            &labels,
        )
        .expect("a valid counter");
        registry
            .register(Box::new(outputs.clone()))
            .expect("a unique name");
        let generations = CounterVec::new(
            Opts::new(
                "seidra_generations_total",
                "Committed generations by status.",
            ),
            &["media_type", "model", "device", "status"],
        )
        .expect("a valid counter");
        registry
            .register(Box::new(generations.clone()))
            .expect("a unique name");
        Metrics {
            duration,
            queue_wait,
            outputs,
            generations,
            vram_peak: gauge(
                "seidra_gpu_vram_peak_mib",
                "Peak allocator MiB in use of the device's last generation.",
            ),
            vram_allocated: gauge(
                "seidra_gpu_vram_allocated_mib",
                "Allocator MiB in use at the end of the device's last generation.",
            ),
            vram_reserved: gauge(
                "seidra_gpu_vram_reserved_mib",
                "Allocator MiB reserved at the end of the device's last generation.",
            ),
            registry,
        }
    }

    /// Records a committed row.
    pub fn record(&self, item: &GenerationItem) {
        let labels = [
            item.media_type.as_str(),
            item.model_name.as_str(),
            item.device.as_str(),
        ];
        self.generations
            .with_label_values(&[labels[0], labels[1], labels[2], item.status.as_str()])
            .inc();
        self.queue_wait
            .with_label_values(&labels)
            .observe(item.queue_wait_seconds);
        if item.status != "succeeded" {
            return;
        }
        self.duration
            .with_label_values(&labels)
            .observe(item.duration_seconds);
        self.outputs
            .with_label_values(&labels)
            .inc_by(f64::from(item.outputs));
        let device = [item.device.as_str()];
        for (gauge, value) in [
            (&self.vram_peak, item.vram_peak_mb),
            (&self.vram_allocated, item.vram_allocated_mb),
            (&self.vram_reserved, item.vram_reserved_mb),
        ] {
            if let Some(value) = value {
                gauge.with_label_values(&device).set(value);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into memory does not fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
