//! The engine thread and its batch builder. Sequences queue by priority (lower
//! first), then arrival; the builder packs them up to the token and sequence
//! budgets and hands one batch ahead to the thread that owns the model, so the
//! next batch is ready while the current one runs.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{ModelRunner, PooledData, SequenceInput};
use crate::error::{EngineError, Result};

/// Per-sequence timing reported with each result.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SequenceTiming {
    /// From submission until its batch started running.
    pub queue_time: Duration,
    /// The forward pass of its batch.
    pub inference_time: Duration,
    /// Sequences in its batch.
    pub batch_size: usize,
    /// Tokens in its batch.
    pub batch_tokens: usize,
}

/// What a sequence's callback receives.
pub type SequenceResult = Result<(PooledData, SequenceTiming)>;

type Reply = Box<dyn FnOnce(SequenceResult) + Send>;

/// One sequence waiting for the model.
pub struct WorkItem {
    pub input: SequenceInput,
    /// Lower runs first.
    pub priority: i64,
    /// Set when the client has gone; the item is dropped instead of run.
    pub cancelled: Option<Arc<AtomicBool>>,
    pub reply: Reply,
}

impl WorkItem {
    pub fn new(input: SequenceInput, reply: impl FnOnce(SequenceResult) + Send + 'static) -> Self {
        WorkItem {
            input,
            priority: 0,
            cancelled: None,
            reply: Box::new(reply),
        }
    }
}

struct Queued {
    item: WorkItem,
    seq: u64,
    enqueued: Instant,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    // BinaryHeap pops the greatest: invert so the lowest (priority, seq) comes first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.item.priority, other.seq).cmp(&(self.item.priority, self.seq))
    }
}

/// Batch limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_queued_sequences: usize,
}

/// Live counters, for metrics and for admission decisions made by the caller.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub queued_sequences: AtomicUsize,
    pub running_sequences: AtomicUsize,
    pub batches: AtomicU64,
    pub batched_tokens: AtomicU64,
    /// Prompt tokens submitted and not finished yet (queued, prepared or running).
    pub pending_tokens: AtomicUsize,
    throughput: Mutex<Option<Throughput>>,
}

/// Tokens per second the model has been measured to run.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    tokens_per_second: f64,
    /// Measured on batches cut by a budget: the rate under load. Batches that
    /// emptied the queue (a lone short prompt) understate it and only count
    /// until a full batch has been seen.
    from_full_batches: bool,
}

impl SchedulerStats {
    /// The measured rate, once a batch has run; `None` before.
    pub fn throughput_tokens_per_second(&self) -> Option<f64> {
        self.throughput
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.tokens_per_second)
    }

    fn record_batch(&self, tokens: usize, elapsed: Duration, full: bool) {
        // Weight of the newest batch: a few batches follow a change of load.
        const NEW_WEIGHT: f64 = 0.3;
        let seconds = elapsed.as_secs_f64();
        if tokens == 0 || seconds <= 0.0 {
            return;
        }
        let observed = tokens as f64 / seconds;
        let mut slot = self.throughput.lock().unwrap_or_else(|e| e.into_inner());
        let next = match *slot {
            Some(old) if old.from_full_batches && !full => old,
            Some(old) if old.from_full_batches == full => Throughput {
                tokens_per_second: old.tokens_per_second * (1.0 - NEW_WEIGHT)
                    + observed * NEW_WEIGHT,
                from_full_batches: full,
            },
            _ => Throughput {
                tokens_per_second: observed,
                from_full_batches: full,
            },
        };
        *slot = Some(next);
    }
}

struct Shared {
    queue: Mutex<QueueState>,
    ready: Condvar,
    stats: Arc<SchedulerStats>,
    limits: BatchLimits,
}

struct QueueState {
    heap: BinaryHeap<Queued>,
    next_seq: u64,
    closed: bool,
}

struct Batch {
    items: Vec<Queued>,
    tokens: usize,
    /// Cut by a budget while more work waited (not by an empty queue).
    full: bool,
}

/// Handle to the engine threads. Dropping it finishes queued work and stops them.
pub struct Scheduler {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Scheduler {
    pub fn start(runner: ModelRunner, limits: BatchLimits) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(QueueState {
                heap: BinaryHeap::new(),
                next_seq: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            stats: Arc::new(SchedulerStats::default()),
            limits,
        });
        // Capacity 1: exactly one batch is prepared ahead of the running one.
        let (tx, rx) = sync_channel::<Batch>(1);
        let builder_shared = shared.clone();
        let builder = std::thread::Builder::new()
            .name("verdict-batcher".into())
            .spawn(move || build_batches(&builder_shared, tx))
            .expect("spawning the batch builder thread");
        let exec_stats = shared.stats.clone();
        let executor = std::thread::Builder::new()
            .name("verdict-engine".into())
            .spawn(move || run_batches(&runner, rx, &exec_stats))
            .expect("spawning the engine thread");
        Scheduler {
            shared,
            threads: vec![builder, executor],
        }
    }

    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.shared.stats.clone()
    }

    pub fn limits(&self) -> BatchLimits {
        self.shared.limits
    }

    /// True while the batching and engine threads run and take work.
    pub fn is_alive(&self) -> bool {
        let open = !self
            .shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed;
        open && self.threads.iter().all(|t| !t.is_finished())
    }

    /// Queues all items or none: when the queue cannot take them all the call
    /// fails with `Unavailable` and no callback runs.
    pub fn submit(&self, items: Vec<WorkItem>) -> Result<()> {
        let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.closed {
            return Err(EngineError::Unavailable(
                "the engine is shutting down".into(),
            ));
        }
        if q.heap.len() + items.len() > self.shared.limits.max_queued_sequences {
            return Err(EngineError::Unavailable(format!(
                "the server is overloaded: {} sequences are already queued (limit {})",
                q.heap.len(),
                self.shared.limits.max_queued_sequences
            )));
        }
        let tokens: usize = items.iter().map(|item| item.input.ids.len()).sum();
        self.shared
            .stats
            .pending_tokens
            .fetch_add(tokens, AtomicOrdering::Relaxed);
        let now = Instant::now();
        for item in items {
            let seq = q.next_seq;
            q.next_seq += 1;
            q.heap.push(Queued {
                item,
                seq,
                enqueued: now,
            });
        }
        self.shared
            .stats
            .queued_sequences
            .store(q.heap.len(), AtomicOrdering::Relaxed);
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Stops accepting work, lets queued work finish, and joins the threads.
    pub fn shutdown(mut self) {
        self.close_and_join();
    }

    fn close_and_join(&mut self) {
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.closed = true;
        }
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.close_and_join();
    }
}

fn build_batches(shared: &Shared, tx: SyncSender<Batch>) {
    crate::priority::lower_current_thread();
    loop {
        let batch = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while q.heap.is_empty() && !q.closed {
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.heap.is_empty() {
                return; // closed and drained
            }
            let mut items = Vec::new();
            let mut tokens = 0usize;
            while let Some(top) = q.heap.peek() {
                let len = top.item.input.ids.len();
                if !items.is_empty()
                    && (tokens + len > shared.limits.max_num_batched_tokens
                        || items.len() >= shared.limits.max_num_seqs)
                {
                    break;
                }
                let Some(next) = q.heap.pop() else { break };
                if next
                    .item
                    .cancelled
                    .as_ref()
                    .is_some_and(|c| c.load(AtomicOrdering::Relaxed))
                {
                    // The client has gone.
                    shared
                        .stats
                        .pending_tokens
                        .fetch_sub(len, AtomicOrdering::Relaxed);
                    continue;
                }
                tokens += len;
                items.push(next);
            }
            shared
                .stats
                .queued_sequences
                .store(q.heap.len(), AtomicOrdering::Relaxed);
            let full = !q.heap.is_empty();
            Batch {
                items,
                tokens,
                full,
            }
        };
        if batch.items.is_empty() {
            continue;
        }
        if tx.send(batch).is_err() {
            return;
        }
    }
}

fn run_batches(runner: &ModelRunner, rx: Receiver<Batch>, stats: &SchedulerStats) {
    crate::priority::lower_current_thread();
    while let Ok(mut batch) = rx.recv() {
        // Sequences cancelled while their batch waited for the model are dropped
        // here too, so a cancelled call stops after at most the running batch.
        let prepared_tokens = batch.tokens;
        batch.items.retain(|q| {
            !q.item
                .cancelled
                .as_ref()
                .is_some_and(|c| c.load(AtomicOrdering::Relaxed))
        });
        batch.tokens = batch.items.iter().map(|q| q.item.input.ids.len()).sum();
        stats
            .pending_tokens
            .fetch_sub(prepared_tokens - batch.tokens, AtomicOrdering::Relaxed);
        if batch.items.is_empty() {
            continue;
        }
        let started = Instant::now();
        let n = batch.items.len();
        stats.running_sequences.store(n, AtomicOrdering::Relaxed);
        let (meta, inputs): (Vec<_>, Vec<SequenceInput>) = batch
            .items
            .into_iter()
            .map(|q| ((q.item.reply, q.enqueued), q.item.input))
            .unzip();
        let result = run_guarded(runner, &inputs);
        let inference_time = started.elapsed();
        stats.batches.fetch_add(1, AtomicOrdering::Relaxed);
        stats
            .batched_tokens
            .fetch_add(batch.tokens as u64, AtomicOrdering::Relaxed);
        stats.running_sequences.store(0, AtomicOrdering::Relaxed);
        // A failed batch is retried below, one sequence at a time; its time says nothing of the rate.
        if result.is_ok() {
            stats.record_batch(batch.tokens, inference_time, batch.full);
        }
        let timing = |enqueued: Instant| SequenceTiming {
            queue_time: started.saturating_duration_since(enqueued),
            inference_time,
            batch_size: n,
            batch_tokens: batch.tokens,
        };
        match result {
            Ok(outputs) => {
                for ((reply, enqueued), out) in meta.into_iter().zip(outputs) {
                    reply(Ok((out, timing(enqueued))));
                }
            }
            // A failed batch is retried one sequence at a time, so one bad
            // sequence cannot take the answers of the others with it.
            Err(e) if n > 1 => {
                tracing::warn!(error = %e, sequences = n, "batch failed; retrying its sequences one by one");
                for ((reply, enqueued), input) in meta.into_iter().zip(inputs) {
                    let single = run_guarded(runner, std::slice::from_ref(&input));
                    reply(single.and_then(|mut v| {
                        v.pop().map(|out| (out, timing(enqueued))).ok_or_else(|| {
                            EngineError::Tensor(candle_core::Error::Msg("empty result".into()))
                        })
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "sequence failed");
                if let Some((reply, _)) = meta.into_iter().next() {
                    reply(Err(e));
                }
            }
        }
        stats
            .pending_tokens
            .fetch_sub(batch.tokens, AtomicOrdering::Relaxed);
    }
}

/// Runs a batch; a panic inside the model becomes this batch's error instead
/// of taking the engine thread (and every later request) down with it.
fn run_guarded(runner: &ModelRunner, inputs: &[SequenceInput]) -> Result<Vec<PooledData>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.run(inputs))).unwrap_or_else(
        |panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(EngineError::Tensor(candle_core::Error::Msg(format!(
                "the model failed on this batch: {what}"
            ))))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_prefers_full_batches() {
        let stats = SchedulerStats::default();
        assert_eq!(stats.throughput_tokens_per_second(), None);
        // A lone short prompt: a first, low estimate.
        stats.record_batch(10, Duration::from_millis(10), false);
        assert_eq!(stats.throughput_tokens_per_second(), Some(1000.0));
        // The first full batch replaces it.
        stats.record_batch(8000, Duration::from_millis(100), true);
        assert_eq!(stats.throughput_tokens_per_second(), Some(80_000.0));
        // Later partial batches no longer pull it down.
        stats.record_batch(10, Duration::from_millis(10), false);
        assert_eq!(stats.throughput_tokens_per_second(), Some(80_000.0));
        // Full batches move it by a weighted average.
        stats.record_batch(4000, Duration::from_millis(100), true);
        let rate = stats.throughput_tokens_per_second().unwrap();
        assert!(
            (rate - (0.7 * 80_000.0 + 0.3 * 40_000.0)).abs() < 1e-6,
            "{rate}"
        );
    }
}
