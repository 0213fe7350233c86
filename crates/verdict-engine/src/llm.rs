//! The engine handle shared by the server and the offline API, and the offline
//! `Llm` API itself (vLLM's `LLM.classify / encode / score`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{self, task_list, EngineArgs, ModelInfo, PooledData, SequenceInput};
use crate::error::{EngineError, Result};
use crate::input::{InputProcessor, PairLimits, Prompt, TokenizeOptions};
use crate::lora::{LoraRef, LoraRegistry};
use crate::pooling::{PoolingTask, PoolingType, StepParams};
use crate::scheduler::{BatchLimits, Scheduler, SchedulerStats, SequenceResult, WorkItem};

/// A loaded model behind its scheduler: the one path every result takes.
pub struct Engine {
    info: Arc<ModelInfo>,
    processor: InputProcessor,
    scheduler: Scheduler,
    lora: Option<Arc<LoraRegistry>>,
}

impl Engine {
    pub fn new(args: &EngineArgs) -> Result<Self> {
        let loaded = engine::load(args)?;
        engine::warmup(&loaded.runner)?;
        let info = Arc::new(loaded.info);
        let limits = BatchLimits {
            max_num_batched_tokens: info.max_num_batched_tokens,
            max_num_seqs: info.max_num_seqs,
            max_queued_sequences: args.max_queued_sequences.max(1),
        };
        Ok(Engine {
            processor: InputProcessor::new(loaded.tokenizer, info.clone()),
            scheduler: Scheduler::start(loaded.runner, limits),
            info,
            lora: loaded.lora,
        })
    }

    /// The adapters, when LoRA is enabled.
    pub fn lora(&self) -> Option<&Arc<LoraRegistry>> {
        self.lora.as_ref()
    }

    /// The adapter for a LoRA request: the one loaded under its name, else loaded
    /// from its path now.
    pub fn lora_adapter(&self, request: &LoraRequest) -> Result<LoraRef> {
        let registry = self.lora.as_ref().ok_or_else(|| {
            EngineError::validation("LoRA is not enabled for this model (--enable-lora)")
        })?;
        if let Some(adapter) = registry.get(&request.name) {
            if adapter.info().path != request.path {
                return Err(EngineError::validation(format!(
                    "LoRA adapter '{}' is already loaded from {}",
                    request.name,
                    adapter.info().path.display()
                )));
            }
            return Ok(LoraRef(adapter));
        }
        registry.load(&request.name, &request.path)?;
        registry.get(&request.name).map(LoraRef).ok_or_else(|| {
            EngineError::NotFound(format!("LoRA adapter '{}' was unloaded", request.name))
        })
    }

    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    pub fn processor(&self) -> &InputProcessor {
        &self.processor
    }

    /// True while the engine threads run and accept work (`/health`).
    pub fn is_alive(&self) -> bool {
        self.scheduler.is_alive()
    }

    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.scheduler.stats()
    }

    /// Queues sequences; each callback runs on the engine thread when its result is ready.
    pub fn submit(&self, items: Vec<WorkItem>) -> Result<()> {
        self.scheduler.submit(items)
    }

    /// Runs sequences and blocks until all are done; results in input order.
    /// `on_done` is told how many have finished so far (for progress bars).
    pub fn run_blocking(
        &self,
        inputs: Vec<SequenceInput>,
        on_done: &dyn Fn(usize),
    ) -> Vec<Result<PooledData>> {
        let total = inputs.len();
        let mut inputs: Vec<Option<SequenceInput>> = inputs.into_iter().map(Some).collect();
        let prepare = move |i: usize| {
            inputs[i]
                .take()
                .ok_or_else(|| EngineError::Unavailable("input already queued".into()))
        };
        let request_ids = AtomicU64::new(0);
        let call = PendingCall::new(
            self,
            &request_ids,
            total,
            Box::new(prepare),
            InvalidPrompt::FailPrompt,
        );
        match wait_all(call, on_done) {
            Ok(outputs) => outputs.into_iter().map(|r| r.map(|o| o.outputs)).collect(),
            // Only `InvalidPrompt::FailCall` fails a whole call.
            Err(e) => {
                let msg = e.to_string();
                (0..total)
                    .map(|_| Err(EngineError::Unavailable(msg.clone())))
                    .collect()
            }
        }
    }

    /// Checks a requested pooling task against the model, with vLLM's messages.
    /// `online` selects the server's wording for the "switch task" hint.
    pub fn check_task(&self, task: PoolingTask, online: bool) -> Result<()> {
        let info = &self.info;
        if task == PoolingTask::Plugin {
            return Err(EngineError::validation(
                "No IOProcessor plugin installed. Please refer to the documentation and to the \
                 'prithvi_geospatial_mae_io_processor' offline inference example for more details.",
            ));
        }
        if task == info.task {
            return Ok(());
        }
        if !info.supported_tasks.contains(&task) {
            if !online {
                match task {
                    PoolingTask::Embed | PoolingTask::TokenEmbed => {
                        return Err(EngineError::validation(
                            "Embedding API is not supported by this model. Try converting the model using `--convert embed`.",
                        ))
                    }
                    PoolingTask::Classify | PoolingTask::TokenClassify => {
                        return Err(EngineError::validation(
                            "Classification API is not supported by this model. Try converting the model using `--convert classify`.",
                        ))
                    }
                    _ => {}
                }
            }
            return Err(EngineError::validation(format!(
                "Unsupported task: '{task}' Supported tasks: {}",
                task_list(&info.supported_tasks)
            )));
        }
        Err(EngineError::validation(if online {
            format!("Try switching the model's pooling_task via --pooler-config.task {task}.")
        } else {
            format!("Try switching the model's pooling_task via `PoolerConfig(task=\"{task}\")`")
        }))
    }

    /// STEP parameters are only for a model that pools with STEP (vLLM's check).
    pub fn check_step_params(&self, task: PoolingTask, step: &StepParams) -> Result<()> {
        if step.is_empty() {
            return Ok(());
        }
        if self.info.pooling == PoolingType::Step {
            return check_returned_token_ids(step, self.info.num_labels);
        }
        let names: Vec<String> = step.set_names().iter().map(|n| format!("'{n}'")).collect();
        Err(EngineError::validation(format!(
            "Task {task} only supports ['use_activation'] parameters, does not support [{}] parameters",
            names.join(", ")
        )))
    }

    /// Stops accepting work, finishes what is queued, and stops the engine threads.
    pub fn shutdown(self) {
        self.scheduler.shutdown();
    }
}

/// vLLM's `LoRARequest`: an adapter by name, loaded from `path` on first use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraRequest {
    pub name: String,
    pub path: std::path::PathBuf,
}

impl LoraRequest {
    /// A request named after the adapter's directory.
    pub fn from_path(path: impl Into<std::path::PathBuf>) -> Self {
        let path = path.into();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.to_string_lossy().into_owned());
        LoraRequest { name, path }
    }
}

/// Per-prompt pooling parameters (vLLM's `PoolingParams`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolingParams {
    /// None: the `--pooler-config` default, else true.
    pub use_activation: Option<bool>,
    /// Embedding-only; any value is rejected for classifiers.
    pub dimensions: Option<usize>,
    /// Scoring: cut queries / documents to this many tokens (0 = off).
    pub max_tokens_per_query: usize,
    pub max_tokens_per_doc: usize,
    /// STEP pooling's `step_tag_id` / `returned_token_ids` (STEP models only).
    pub step: StepParams,
}

/// Parameters for a call: none, one for all prompts, or one per prompt.
#[derive(Debug, Clone, Copy, Default)]
pub enum ParamsArg<'a> {
    #[default]
    Default,
    All(&'a PoolingParams),
    PerPrompt(&'a [PoolingParams]),
}

impl ParamsArg<'_> {
    fn expand(&self, n: usize) -> Result<Vec<PoolingParams>> {
        match self {
            ParamsArg::Default => Ok(vec![PoolingParams::default(); n]),
            ParamsArg::All(p) => Ok(vec![(*p).clone(); n]),
            ParamsArg::PerPrompt(ps) if ps.len() == n => Ok(ps.to_vec()),
            ParamsArg::PerPrompt(ps) => Err(EngineError::validation(format!(
                "The lengths of prompts ({n}) and params ({}) must be the same.",
                ps.len()
            ))),
        }
    }
}

/// vLLM's `PoolingRequestOutput`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolingRequestOutput {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    /// Prefix-cache hits; verdict has no prefix cache, so always 0.
    pub num_cached_tokens: usize,
    pub finished: bool,
    pub outputs: PooledData,
}

/// vLLM's `ClassificationRequestOutput`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationRequestOutput {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub num_cached_tokens: usize,
    pub finished: bool,
    pub probs: Vec<f32>,
}

impl ClassificationRequestOutput {
    pub fn num_classes(&self) -> usize {
        self.probs.len()
    }
}

/// vLLM's `ScoringRequestOutput`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoringRequestOutput {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub score: f32,
}

/// The offline API: load once, classify many.
pub struct Llm {
    engine: Engine,
    next_request_id: AtomicU64,
}

impl Llm {
    pub fn new(args: EngineArgs) -> Result<Self> {
        Ok(Llm {
            engine: Engine::new(&args)?,
            next_request_id: AtomicU64::new(0),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn info(&self) -> &ModelInfo {
        self.engine.info()
    }

    /// Probability vectors, one per prompt, in input order.
    pub fn classify(
        &self,
        prompts: &[Prompt],
        params: ParamsArg,
        tokenization: &TokenizeOptions,
    ) -> Result<Vec<ClassificationRequestOutput>> {
        self.classify_with_lora(prompts, params, tokenization, None)
    }

    /// `classify` through a LoRA adapter (`None`: the base model).
    pub fn classify_with_lora(
        &self,
        prompts: &[Prompt],
        params: ParamsArg,
        tokenization: &TokenizeOptions,
        lora: Option<&LoraRequest>,
    ) -> Result<Vec<ClassificationRequestOutput>> {
        self.encode_with_lora(
            prompts,
            params,
            Some(PoolingTask::Classify),
            tokenization,
            lora,
        )?
        .into_iter()
        .map(into_classification)
        .collect()
    }

    /// Pooled outputs for a task; fails as a whole on the first invalid prompt (as vLLM).
    pub fn encode(
        &self,
        prompts: &[Prompt],
        params: ParamsArg,
        task: Option<PoolingTask>,
        tokenization: &TokenizeOptions,
    ) -> Result<Vec<PoolingRequestOutput>> {
        self.encode_with_lora(prompts, params, task, tokenization, None)
    }

    /// `encode` through a LoRA adapter (`None`: the base model).
    pub fn encode_with_lora(
        &self,
        prompts: &[Prompt],
        params: ParamsArg,
        task: Option<PoolingTask>,
        tokenization: &TokenizeOptions,
        lora: Option<&LoraRequest>,
    ) -> Result<Vec<PoolingRequestOutput>> {
        let call = self.start_encode_with_lora(
            prompts,
            params,
            task,
            tokenization,
            InvalidPrompt::FailCall,
            lora,
        )?;
        wait_all(call, &|_| {})?.into_iter().collect()
    }

    /// Like `encode`, but a bad prompt fails only itself: one result per prompt.
    /// Call-level problems (no prompts, wrong task, params length) still fail the call.
    pub fn encode_each(
        &self,
        prompts: &[Prompt],
        params: ParamsArg,
        task: Option<PoolingTask>,
        tokenization: &TokenizeOptions,
        lora: Option<&LoraRequest>,
        on_done: &dyn Fn(usize),
    ) -> Result<Vec<Result<PoolingRequestOutput>>> {
        let call = self.start_encode_with_lora(
            prompts,
            params,
            task,
            tokenization,
            InvalidPrompt::FailPrompt,
            lora,
        )?;
        wait_all(call, on_done)
    }

    /// Starts an `encode` call without waiting for it: the caller drives it with
    /// [`PendingCall::wait`] (to show progress or stop it between waits).
    pub fn start_encode<'a>(
        &'a self,
        prompts: &'a [Prompt],
        params: ParamsArg,
        task: Option<PoolingTask>,
        tokenization: &'a TokenizeOptions,
        invalid: InvalidPrompt,
    ) -> Result<PendingCall<'a>> {
        self.start_encode_with_lora(prompts, params, task, tokenization, invalid, None)
    }

    /// `start_encode` through a LoRA adapter (`None`: the base model).
    pub fn start_encode_with_lora<'a>(
        &'a self,
        prompts: &'a [Prompt],
        params: ParamsArg,
        task: Option<PoolingTask>,
        tokenization: &'a TokenizeOptions,
        invalid: InvalidPrompt,
        lora: Option<&LoraRequest>,
    ) -> Result<PendingCall<'a>> {
        let task = task.ok_or_else(|| {
            EngineError::validation(
                "pooling_task required for `LLM.encode`.\nPlease use one of the more specific methods or set the \
                 pooling_task when using `LLM.encode`:\n  - For classification: use `LLM.classify(...)` or \
                 `pooling_task=\"classify\"`.\n  - For token classification: use `pooling_task=\"token_classify\"`.",
            )
        })?;
        self.engine.check_task(task, false)?;
        if prompts.is_empty() {
            return Err(EngineError::validation("You must pass at least one prompt"));
        }
        let params = params.expand(prompts.len())?;
        let lora = lora.map(|r| self.engine.lora_adapter(r)).transpose()?;
        let default_act = self.info().default_use_activation;
        let engine = &self.engine;
        let prepare = move |i: usize| -> Result<SequenceInput> {
            let pp = &params[i];
            check_params(pp)?;
            engine.check_step_params(task, &pp.step)?;
            let t = engine.processor().process(&prompts[i], tokenization)?;
            Ok(
                SequenceInput::new(t, pp.use_activation.unwrap_or(default_act))
                    .with_step(pp.step.clone())
                    .with_lora(lora.clone()),
            )
        };
        Ok(PendingCall::new(
            &self.engine,
            &self.next_request_id,
            prompts.len(),
            Box::new(prepare),
            invalid,
        ))
    }

    /// Cross-encoder scores for 1:1, 1:N or N:N text pairs (num_labels == 1 only).
    pub fn score(
        &self,
        data_1: &[String],
        data_2: &[String],
        params: Option<&PoolingParams>,
        tokenization: &TokenizeOptions,
    ) -> Result<Vec<ScoringRequestOutput>> {
        self.score_with_lora(data_1, data_2, params, tokenization, None)
    }

    /// `score` through a LoRA adapter (`None`: the base model); the adapter's head,
    /// when it brings one, must have one label.
    pub fn score_with_lora(
        &self,
        data_1: &[String],
        data_2: &[String],
        params: Option<&PoolingParams>,
        tokenization: &TokenizeOptions,
        lora: Option<&LoraRequest>,
    ) -> Result<Vec<ScoringRequestOutput>> {
        let call = self.start_score_with_lora(data_1, data_2, params, tokenization, lora)?;
        into_scores(wait_all(call, &|_| {})?)
    }

    /// Starts a `score` call without waiting for it (see [`Llm::start_encode`]);
    /// [`into_scores`] turns its outputs into scores.
    pub fn start_score<'a>(
        &'a self,
        data_1: &'a [String],
        data_2: &'a [String],
        params: Option<&PoolingParams>,
        tokenization: &'a TokenizeOptions,
    ) -> Result<PendingCall<'a>> {
        self.start_score_with_lora(data_1, data_2, params, tokenization, None)
    }

    /// `start_score` through a LoRA adapter (`None`: the base model).
    pub fn start_score_with_lora<'a>(
        &'a self,
        data_1: &'a [String],
        data_2: &'a [String],
        params: Option<&PoolingParams>,
        tokenization: &'a TokenizeOptions,
        lora: Option<&LoraRequest>,
    ) -> Result<PendingCall<'a>> {
        let info = self.info();
        if info.task != PoolingTask::Classify {
            return Err(EngineError::validation(
                "This model does not support the Scoring API.",
            ));
        }
        let lora = lora.map(|r| self.engine.lora_adapter(r)).transpose()?;
        let num_labels = lora
            .as_ref()
            .map_or(info.num_labels, |a| a.info().num_labels);
        if num_labels != 1 {
            return Err(EngineError::validation(
                "Scoring API is only enabled for num_labels == 1.",
            ));
        }
        let pairs = pair_up(data_1, data_2)?;
        let params = params.cloned().unwrap_or_default();
        check_params(&params)?;
        self.engine
            .check_step_params(PoolingTask::Classify, &params.step)?;
        let limits = PairLimits {
            max_tokens_per_query: params.max_tokens_per_query,
            max_tokens_per_doc: params.max_tokens_per_doc,
            score_template: None,
        };
        let use_activation = params
            .use_activation
            .unwrap_or(self.info().default_use_activation);
        let engine = &self.engine;
        let total = pairs.len();
        let prepare = move |i: usize| -> Result<SequenceInput> {
            let (q, d) = pairs[i];
            let t = engine
                .processor()
                .process_pair(q, d, tokenization, &limits)?;
            Ok(SequenceInput::new(t, use_activation)
                .with_step(params.step.clone())
                .with_lora(lora.clone()))
        };
        Ok(PendingCall::new(
            &self.engine,
            &self.next_request_id,
            total,
            Box::new(prepare),
            InvalidPrompt::FailCall,
        ))
    }
}

/// What a prompt that fails tokenization or validation does to its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidPrompt {
    /// The call fails with that prompt's error (vLLM's `LLM`).
    FailCall,
    /// Only that prompt fails; the others still run.
    FailPrompt,
}

type PrepareFn<'a> = Box<dyn FnMut(usize) -> Result<SequenceInput> + Send + 'a>;

/// Prompts prepared and queued per submission: small enough that tokenizing
/// overlaps the model, large enough that queue locking stays negligible.
const SUBMIT_BATCH: usize = 256;
/// Most sequences one call keeps queued, so concurrent calls share the queue.
const MAX_IN_FLIGHT: usize = 8192;

/// An offline call in progress. Prompts are tokenized only as the queue has room
/// (so tokenizing overlaps the model and the queue limit holds), and the caller
/// waits in slices, free to report progress or stop the call between them.
/// Dropping it unfinished drops its queued work.
pub struct PendingCall<'a> {
    engine: &'a Engine,
    request_ids: &'a AtomicU64,
    prepare: PrepareFn<'a>,
    invalid: InvalidPrompt,
    total: usize,
    /// The next prompt to prepare.
    next: usize,
    done: usize,
    in_flight: usize,
    max_in_flight: usize,
    ids: Vec<Vec<u32>>,
    results: Vec<Option<Result<PooledData>>>,
    tx: mpsc::Sender<(usize, SequenceResult)>,
    rx: mpsc::Receiver<(usize, SequenceResult)>,
    cancelled: Arc<AtomicBool>,
    /// The error that failed the whole call (`InvalidPrompt::FailCall`).
    failure: Option<EngineError>,
}

impl<'a> PendingCall<'a> {
    fn new(
        engine: &'a Engine,
        request_ids: &'a AtomicU64,
        total: usize,
        prepare: PrepareFn<'a>,
        invalid: InvalidPrompt,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let queue_limit = engine.scheduler.limits().max_queued_sequences;
        PendingCall {
            engine,
            request_ids,
            prepare,
            invalid,
            total,
            next: 0,
            done: 0,
            in_flight: 0,
            max_in_flight: (queue_limit / 2).clamp(1, MAX_IN_FLIGHT),
            ids: vec![Vec::new(); total],
            results: (0..total).map(|_| None).collect(),
            tx,
            rx,
            cancelled: Arc::new(AtomicBool::new(false)),
            failure: None,
        }
    }

    /// Prompts in the call.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Prompts finished so far (run or failed).
    pub fn done(&self) -> usize {
        self.done
    }

    pub fn is_finished(&self) -> bool {
        self.done == self.total || self.failure.is_some() || self.cancelled.load(Ordering::Relaxed)
    }

    /// Stops the call: queued sequences are dropped instead of run, and
    /// `finish` reports the unfinished prompts as cancelled.
    pub fn cancel(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Makes progress for up to `timeout`: queues prompts as there is room and
    /// collects results. True once the call is finished.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            while !self.is_finished()
                && self.in_flight < self.max_in_flight
                && self.next < self.total
            {
                self.submit_some();
                self.collect_ready();
                if Instant::now() >= deadline {
                    return self.is_finished();
                }
            }
            if self.is_finished() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, r)) => {
                    self.record(i, r);
                    self.collect_ready();
                }
                Err(_) => {
                    if !self.engine.is_alive() {
                        self.fail_unfinished("the engine stopped");
                    }
                    return self.is_finished();
                }
            }
        }
    }

    /// One result per prompt, in input order; fails as a whole with the first
    /// invalid prompt's error under `InvalidPrompt::FailCall`.
    pub fn finish(mut self) -> Result<Vec<Result<PoolingRequestOutput>>> {
        if let Some(e) = self.failure.take() {
            return Err(e);
        }
        let request_ids = self.request_ids;
        let ids = std::mem::take(&mut self.ids);
        let results = std::mem::take(&mut self.results);
        Ok(results
            .into_iter()
            .zip(ids)
            .map(|(r, prompt_token_ids)| {
                let data = r.unwrap_or_else(|| {
                    Err(EngineError::Unavailable("the call was cancelled".into()))
                })?;
                Ok(PoolingRequestOutput {
                    request_id: request_ids.fetch_add(1, Ordering::Relaxed).to_string(),
                    prompt_token_ids,
                    num_cached_tokens: 0,
                    finished: true,
                    outputs: data,
                })
            })
            .collect())
    }

    /// Prepares and queues up to `SUBMIT_BATCH` prompts.
    fn submit_some(&mut self) {
        let room = (self.max_in_flight - self.in_flight).min(SUBMIT_BATCH);
        let mut items = Vec::with_capacity(room);
        while items.len() < room && self.next < self.total {
            let i = self.next;
            self.next += 1;
            match (self.prepare)(i) {
                Ok(input) => {
                    self.ids[i] = input.ids.clone();
                    let tx = self.tx.clone();
                    let mut item = WorkItem::new(input, move |r| {
                        let _ = tx.send((i, r));
                    });
                    item.cancelled = Some(self.cancelled.clone());
                    items.push(item);
                }
                Err(e) => match self.invalid {
                    InvalidPrompt::FailCall => {
                        self.failure = Some(e);
                        self.cancel();
                        return;
                    }
                    InvalidPrompt::FailPrompt => {
                        self.results[i] = Some(Err(e));
                        self.done += 1;
                    }
                },
            }
        }
        let n = items.len();
        if n == 0 {
            return;
        }
        match self.engine.scheduler.submit(items) {
            Ok(()) => self.in_flight += n,
            Err(e) => {
                // Nothing of these was queued; what is still to come cannot be either.
                self.fail_unfinished(&e.to_string());
            }
        }
    }

    fn collect_ready(&mut self) {
        while let Ok((i, r)) = self.rx.try_recv() {
            self.record(i, r);
        }
    }

    fn record(&mut self, i: usize, r: SequenceResult) {
        if self.results[i].is_none() {
            self.results[i] = Some(r.map(|(data, _)| data));
            self.done += 1;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Fails every prompt without a result yet.
    fn fail_unfinished(&mut self, msg: &str) {
        for slot in self.results.iter_mut().filter(|s| s.is_none()) {
            *slot = Some(Err(EngineError::Unavailable(msg.to_string())));
        }
        self.next = self.total;
        self.done = self.total;
        self.cancel();
    }
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// Waits for a whole call, telling `on_done` how many prompts have finished.
fn wait_all(
    mut call: PendingCall<'_>,
    on_done: &dyn Fn(usize),
) -> Result<Vec<Result<PoolingRequestOutput>>> {
    let mut reported = 0;
    loop {
        let finished = call.wait(Duration::from_millis(200));
        if call.done() != reported {
            reported = call.done();
            on_done(reported);
        }
        if finished {
            return call.finish();
        }
    }
}

/// The probability vectors of a `classify` call.
pub fn into_classification(o: PoolingRequestOutput) -> Result<ClassificationRequestOutput> {
    match o.outputs {
        PooledData::Vector(probs) => Ok(ClassificationRequestOutput {
            request_id: o.request_id,
            prompt_token_ids: o.prompt_token_ids,
            num_cached_tokens: 0,
            finished: true,
            probs,
        }),
        PooledData::Matrix(_) => Err(EngineError::validation(
            "pooled_data should be a 1-D probability vector",
        )),
    }
}

/// The scores of a `score` call; fails on the first failed pair.
pub fn into_scores(
    outputs: Vec<Result<PoolingRequestOutput>>,
) -> Result<Vec<ScoringRequestOutput>> {
    outputs
        .into_iter()
        .map(|r| {
            let r = r?;
            match r.outputs {
                PooledData::Vector(v) if v.len() == 1 => Ok(ScoringRequestOutput {
                    request_id: r.request_id,
                    prompt_token_ids: r.prompt_token_ids,
                    score: v[0],
                }),
                _ => Err(EngineError::validation(
                    "pooled_data should be a scalar score",
                )),
            }
        })
        .collect()
}

/// `returned_token_ids` must name columns of the head (vocabulary ids for an LM head).
pub(crate) fn check_returned_token_ids(step: &StepParams, columns: usize) -> Result<()> {
    match step
        .returned_token_ids
        .iter()
        .flatten()
        .find(|&&c| c as usize >= columns)
    {
        Some(bad) => Err(EngineError::validation_param(
            format!(
                "returned_token_ids entry {bad} is out of range (the head has {columns} outputs)"
            ),
            "returned_token_ids",
        )),
        None => Ok(()),
    }
}

fn check_params(p: &PoolingParams) -> Result<()> {
    if p.dimensions.is_some() {
        return Err(EngineError::validation(
            "Task 'classify' only supports ['use_activation'] parameters, does not support ['dimensions'] parameters",
        ));
    }
    Ok(())
}

/// vLLM's 1:1 / 1:N / N:N pairing of score inputs.
pub fn pair_up<'a>(a: &'a [String], b: &'a [String]) -> Result<Vec<(&'a str, &'a str)>> {
    if a.is_empty() {
        return Err(EngineError::validation(
            "At least one text element must be given",
        ));
    }
    if b.is_empty() {
        return Err(EngineError::validation(
            "At least one text_pair element must be given",
        ));
    }
    if a.len() == 1 {
        Ok(b.iter().map(|d| (a[0].as_str(), d.as_str())).collect())
    } else if a.len() == b.len() {
        Ok(a.iter()
            .zip(b)
            .map(|(q, d)| (q.as_str(), d.as_str()))
            .collect())
    } else {
        Err(EngineError::validation(
            "Input lengths must be either 1:1, 1:N or N:N",
        ))
    }
}
