//! Prometheus metrics. Each server owns its recorder (not the process-global
//! one), so several servers can live in one process (tests, embedding).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use verdict_engine::scheduler::{SchedulerStats, SequenceTiming};

const REQUESTS: &str = "verdict_http_requests_total";
const REQUEST_DURATION: &str = "verdict_http_request_duration_seconds";
const PROMPT_TOKENS: &str = "verdict_prompt_tokens_total";
const REQUEST_ITEMS: &str = "verdict_request_sequences_total";
const QUEUE_TIME: &str = "verdict_queue_time_seconds";
const INFERENCE_TIME: &str = "verdict_inference_time_seconds";
const BATCH_SIZE: &str = "verdict_batch_size";
const BATCH_TOKENS: &str = "verdict_batch_tokens";
const QUEUE_DEPTH: &str = "verdict_queue_depth";
const RUNNING: &str = "verdict_running_sequences";
const BATCHES: &str = "verdict_batches_total";
const BATCHED_TOKENS: &str = "verdict_batched_tokens_total";
const LORA_REQUESTS: &str = "verdict_lora_requests_total";
const LORA_PROMPT_TOKENS: &str = "verdict_lora_prompt_tokens_total";

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The batch a sequence ran in, to count each batch once.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BatchKey {
    inference_time: Duration,
    size: usize,
    tokens: usize,
}

pub struct ServerMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    stats: Arc<SchedulerStats>,
    prompt_tokens: Counter,
    queue_time: Histogram,
    inference_time: Histogram,
    batch_size: Histogram,
    batch_tokens: Histogram,
    queue_depth: Gauge,
    running: Gauge,
    batches: Counter,
    batched_tokens: Counter,
    last_batch: Mutex<Option<BatchKey>>,
}

impl ServerMetrics {
    pub fn new(stats: Arc<SchedulerStats>) -> Self {
        let mut builder = PrometheusBuilder::new();
        for (name, buckets) in [
            (REQUEST_DURATION, SECONDS_BUCKETS),
            (QUEUE_TIME, SECONDS_BUCKETS),
            (INFERENCE_TIME, SECONDS_BUCKETS),
            (BATCH_SIZE, SIZE_BUCKETS),
            (BATCH_TOKENS, TOKEN_BUCKETS),
        ] {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                .expect("bucket lists are constant and non-empty");
        }
        let recorder = builder.build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(KeyName::from_const_str(name), unit, help.into());
        };
        describe(REQUESTS, None, "HTTP requests by route and status.");
        describe(
            REQUEST_DURATION,
            Some(Unit::Seconds),
            "Total request latency, from headers received to response ready.",
        );
        describe(PROMPT_TOKENS, None, "Prompt tokens processed.");
        describe(REQUEST_ITEMS, None, "Sequences submitted to the engine.");
        describe(
            QUEUE_TIME,
            Some(Unit::Seconds),
            "Time a sequence waited in the engine queue.",
        );
        describe(
            INFERENCE_TIME,
            Some(Unit::Seconds),
            "Forward-pass time per batch.",
        );
        describe(BATCH_SIZE, None, "Sequences per batch.");
        describe(BATCH_TOKENS, None, "Tokens per batch.");
        describe(QUEUE_DEPTH, None, "Sequences waiting in the engine queue.");
        describe(RUNNING, None, "Sequences in the batch now running.");
        describe(BATCHES, None, "Batches run.");
        describe(BATCHED_TOKENS, None, "Tokens run through the model.");
        describe(
            LORA_REQUESTS,
            None,
            "Requests served through each LoRA adapter.",
        );
        describe(
            LORA_PROMPT_TOKENS,
            None,
            "Prompt tokens served through each LoRA adapter.",
        );

        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let histogram = |name: &'static str| {
            recorder.register_histogram(&Key::from_static_name(name), &METADATA)
        };
        let gauge =
            |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &METADATA);
        ServerMetrics {
            handle: recorder.handle(),
            stats,
            prompt_tokens: counter(PROMPT_TOKENS),
            queue_time: histogram(QUEUE_TIME),
            inference_time: histogram(INFERENCE_TIME),
            batch_size: histogram(BATCH_SIZE),
            batch_tokens: histogram(BATCH_TOKENS),
            queue_depth: gauge(QUEUE_DEPTH),
            running: gauge(RUNNING),
            batches: counter(BATCHES),
            batched_tokens: counter(BATCHED_TOKENS),
            last_batch: Mutex::new(None),
            recorder,
        }
    }

    /// One finished HTTP request.
    pub fn observe_request(
        &self,
        route: &str,
        method: &str,
        status: u16,
        latency: Duration,
        sequences: usize,
        prompt_tokens: usize,
    ) {
        let labels = vec![
            Label::new("route", route.to_string()),
            Label::new("method", method.to_string()),
            Label::new("status", status.to_string()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
            .increment(1);
        self.recorder
            .register_histogram(
                &Key::from_parts(
                    REQUEST_DURATION,
                    vec![Label::new("route", route.to_string())],
                ),
                &METADATA,
            )
            .record(latency.as_secs_f64());
        if prompt_tokens > 0 {
            self.prompt_tokens.increment(prompt_tokens as u64);
        }
        if sequences > 0 {
            self.recorder
                .register_counter(
                    &Key::from_parts(REQUEST_ITEMS, vec![Label::new("route", route.to_string())]),
                    &METADATA,
                )
                .increment(sequences as u64);
        }
    }

    /// One request served through a LoRA adapter.
    pub fn observe_lora(&self, adapter: &str, prompt_tokens: usize) {
        let labels = || vec![Label::new("lora_name", adapter.to_string())];
        self.recorder
            .register_counter(&Key::from_parts(LORA_REQUESTS, labels()), &METADATA)
            .increment(1);
        self.recorder
            .register_counter(&Key::from_parts(LORA_PROMPT_TOKENS, labels()), &METADATA)
            .increment(prompt_tokens as u64);
    }

    /// One finished sequence. Runs on the engine thread.
    pub fn observe_sequence(&self, timing: &SequenceTiming) {
        self.queue_time.record(timing.queue_time.as_secs_f64());
        // The engine reports timing per sequence; the sequences of one batch
        // finish back to back with identical batch facts, so a change of those
        // facts marks a new batch and each batch is counted once.
        let key = BatchKey {
            inference_time: timing.inference_time,
            size: timing.batch_size,
            tokens: timing.batch_tokens,
        };
        let mut last = self.last_batch.lock().unwrap_or_else(|e| e.into_inner());
        if *last != Some(key) {
            *last = Some(key);
            self.inference_time
                .record(timing.inference_time.as_secs_f64());
            self.batch_size.record(timing.batch_size as f64);
            self.batch_tokens.record(timing.batch_tokens as f64);
        }
    }

    /// Prometheus text, with the scheduler's live counters read now.
    pub fn render(&self) -> String {
        self.queue_depth
            .set(self.stats.queued_sequences.load(Ordering::Relaxed) as f64);
        self.running
            .set(self.stats.running_sequences.load(Ordering::Relaxed) as f64);
        self.batches
            .absolute(self.stats.batches.load(Ordering::Relaxed));
        self.batched_tokens
            .absolute(self.stats.batched_tokens.load(Ordering::Relaxed));
        self.handle.render()
    }

    /// Drains histogram samples; without it they pile up between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}
