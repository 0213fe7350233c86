//! Getting a request's prompts through the engine: tokenization on a worker
//! pool off the async runtime, admission by expected queue wait, submission as
//! separate sequences, results reassembled in input order, and queued work
//! dropped when the client goes.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use verdict_engine::scheduler::{SequenceTiming, WorkItem};
use verdict_engine::tokenize::TokenizedPrompt;
use verdict_engine::{Engine, PooledData, SequenceInput};

use crate::error::ApiError;
use crate::metrics::ServerMetrics;

type Job = Box<dyn FnOnce() + Send>;

/// Threads for a request's blocking work (tokenizing; fetching and decoding
/// media), so the async runtime never blocks on it.
pub struct TokenizerPool {
    sender: Mutex<mpsc::Sender<Job>>,
    workers: usize,
    /// Jobs queued or running, and how many may be before `run` refuses more.
    pending: Arc<AtomicUsize>,
    max_pending: Option<usize>,
}

/// Counts a job as pending until it is dropped (run or discarded).
struct PendingJob(Arc<AtomicUsize>);

impl Drop for PendingJob {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TokenizerPool {
    /// `workers == 0` means one per core; threads are named `<name>-<i>`.
    /// With `max_pending`, `run` answers 503 while that many jobs are waiting or running.
    pub fn new(name: &str, workers: usize, max_pending: Option<usize>) -> std::io::Result<Self> {
        let workers = if workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            workers
        };
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..workers {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    verdict_engine::priority::lower_current_thread();
                    loop {
                        // Hold the lock only to take a job, not while running it.
                        let job = {
                            let rx = receiver.lock().unwrap_or_else(|e| e.into_inner());
                            rx.recv()
                        };
                        match job {
                            // A panicking job must not take the worker with it; its
                            // caller sees the dropped reply channel as an error.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                            }
                            Err(_) => return, // the pool is gone
                        }
                    }
                })?;
        }
        Ok(TokenizerPool {
            sender: Mutex::new(sender),
            workers,
            pending: Arc::new(AtomicUsize::new(0)),
            max_pending,
        })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Runs `f` on a worker and waits for its result without blocking the runtime.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ApiError> {
        let waiting = self.pending.fetch_add(1, Ordering::Relaxed);
        let pending = PendingJob(self.pending.clone());
        if self.max_pending.is_some_and(|max| waiting >= max) {
            return Err(ApiError::unavailable(
                "Too many requests with images or videos are being processed; retry later.",
            ));
        }
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _pending = pending;
            let _ = tx.send(f());
        });
        self.sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| ApiError::unavailable("the tokenizer pool has stopped"))?;
        rx.await
            .map_err(|_| ApiError::internal("tokenization failed unexpectedly"))
    }

    /// Tokenizes many items in parallel chunks; results in input order, and
    /// the first failure (in input order) fails the request, as in vLLM.
    pub async fn tokenize_all<T, F>(
        &self,
        engine: &Arc<Engine>,
        items: Vec<T>,
        tokenize: F,
    ) -> Result<Vec<TokenizedPrompt>, ApiError>
    where
        T: Send + 'static,
        F: Fn(&Engine, T) -> verdict_engine::Result<TokenizedPrompt> + Send + Sync + 'static,
    {
        // Small requests stay in one job: a hop between threads costs more than they do.
        const MIN_CHUNK: usize = 16;
        let n = items.len();
        let chunk = n.div_ceil(self.workers).max(MIN_CHUNK);
        let tokenize = Arc::new(tokenize);
        let mut pending = Vec::with_capacity(n.div_ceil(chunk));
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let part: Vec<T> = items.by_ref().take(chunk).collect();
            let engine = engine.clone();
            let tokenize = tokenize.clone();
            pending.push(self.run(move || {
                let mut out = Vec::with_capacity(part.len());
                for item in part {
                    // Stop at the first failure: the request fails anyway.
                    let result = tokenize(&engine, item);
                    let failed = result.is_err();
                    out.push(result);
                    if failed {
                        break;
                    }
                }
                out
            }));
        }
        let mut prompts = Vec::with_capacity(n);
        // Chunks are awaited in order; each was already queued, so they run in parallel.
        for chunk in pending {
            for result in chunk.await? {
                prompts.push(result?);
            }
        }
        Ok(prompts)
    }
}

/// Before any batch has been measured, at most this many full batches
/// (`max_num_batched_tokens`) of work may wait ahead of a new request.
const UNMEASURED_BATCHES_AHEAD: usize = 2;

/// Refuses new work (503 + `Retry-After`) when the work already queued would
/// keep it waiting longer than `max_wait`: the tokens not yet finished divided
/// by the engine's measured throughput. An idle engine takes any request.
pub fn admit(engine: &Engine, max_wait: Option<Duration>) -> Result<(), ApiError> {
    let Some(max_wait) = max_wait else {
        return Ok(());
    };
    let stats = engine.stats();
    let pending = stats.pending_tokens.load(Ordering::Relaxed);
    if pending == 0 {
        return Ok(());
    }
    let wait_s = match stats.throughput_tokens_per_second() {
        Some(tokens_per_second) => pending as f64 / tokens_per_second,
        None => {
            let budget = engine.info().max_num_batched_tokens * UNMEASURED_BATCHES_AHEAD;
            if pending <= budget {
                return Ok(());
            }
            // Unmeasured: assume the budget takes the whole allowed wait.
            max_wait.as_secs_f64() * pending as f64 / budget as f64
        }
    };
    let max_wait_s = max_wait.as_secs_f64();
    if wait_s <= max_wait_s {
        return Ok(());
    }
    let retry_after = (wait_s - max_wait_s).ceil() as u64;
    Err(ApiError::unavailable(format!(
        "The server is overloaded: the work queued would keep this request waiting about {wait_s:.1} s \
         (limit {max_wait_s} s, --max-queue-wait). Retry later."
    ))
    .with_retry_after(retry_after))
}

/// Sets the shared flag when dropped: a handler future dropped because its
/// client disconnected marks its queued sequences so the engine skips them,
/// and stops its media fetching and decoding.
pub(crate) struct CancelOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One sequence's pooled output and its prompt length.
pub struct SequenceOutput {
    pub data: PooledData,
    pub prompt_tokens: usize,
}

/// Submits the sequences (all or none) and waits for all of them.
pub async fn run_sequences(
    engine: &Engine,
    metrics: &Arc<ServerMetrics>,
    inputs: Vec<SequenceInput>,
    priority: i64,
) -> Result<Vec<SequenceOutput>, ApiError> {
    let n = inputs.len();
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel_guard = CancelOnDrop(cancelled.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
        usize,
        verdict_engine::Result<(PooledData, SequenceTiming)>,
    )>();
    let mut lengths = Vec::with_capacity(n);
    let items: Vec<WorkItem> = inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            lengths.push(input.ids.len());
            let tx = tx.clone();
            let metrics = metrics.clone();
            let mut item = WorkItem::new(input, move |result| {
                if let Ok((_, timing)) = &result {
                    metrics.observe_sequence(timing);
                }
                let _ = tx.send((i, result));
            });
            item.priority = priority;
            item.cancelled = Some(cancelled.clone());
            item
        })
        .collect();
    // Only the work items hold senders now: if the engine drops them unanswered, recv ends.
    drop(tx);
    engine.submit(items)?;

    let mut outputs: Vec<Option<PooledData>> = (0..n).map(|_| None).collect();
    let mut received = 0;
    while received < n {
        let Some((i, result)) = rx.recv().await else {
            return Err(ApiError::unavailable(
                "the engine stopped before the request finished",
            ));
        };
        // An error returns at once; the guard then cancels what is still queued.
        let (data, _) = result?;
        if let Some(slot) = outputs.get_mut(i) {
            *slot = Some(data);
        }
        received += 1;
    }
    outputs
        .into_iter()
        .zip(lengths)
        .map(|(data, prompt_tokens)| {
            data.map(|data| SequenceOutput {
                data,
                prompt_tokens,
            })
            .ok_or_else(|| ApiError::internal("a sequence result is missing"))
        })
        .collect()
}
