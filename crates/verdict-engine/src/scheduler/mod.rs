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

/// Live counters, for metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub queued_sequences: AtomicUsize,
    pub running_sequences: AtomicUsize,
    pub batches: AtomicU64,
    pub batched_tokens: AtomicU64,
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
                    continue; // the client has gone
                }
                tokens += len;
                items.push(next);
            }
            shared
                .stats
                .queued_sequences
                .store(q.heap.len(), AtomicOrdering::Relaxed);
            Batch { items, tokens }
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
    while let Ok(batch) = rx.recv() {
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
