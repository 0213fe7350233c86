//! Loading a checkpoint into a runnable classifier, and running packed batches through it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use serde_json::Value;

use crate::checkpoint::{resolve_model_dir, HfConfig, ModelFiles, Weights};
use crate::error::{EngineError, Result};
use crate::lora::{self, BatchAdapters, LoraLimits, LoraModuleArg, LoraRef, LoraRegistry};
use crate::models::qwen2_5_vl::VlTokens;
use crate::models::Family;
use crate::models::{
    load_model, ArchInfo, ArchKind, Backbone, PackedBatch, RewardKind, TokenClassifierSpec,
    TokenMethod,
};
use crate::multimodal::{
    MediaPolicy, VisionProcessor, VisualInput, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS,
};
use crate::pooling::{
    pool_sequences, Activation, Calibration, ClassifierHead, PoolerConfig, PoolingTask,
    PoolingType, StepParams,
};
use crate::tokenize::{TextTokenizer, TokenizedPrompt};

/// `--runner`: what kind of model runner to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runner {
    #[default]
    Auto,
    Pooling,
    Generate,
}

/// `--convert`: how to adapt a generative checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Convert {
    #[default]
    Auto,
    None,
    Classify,
    Embed,
}

/// `--dtype` for the backbone (heads always run in fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeArg {
    #[default]
    Auto,
    Float32,
    Float16,
    BFloat16,
}

impl DTypeArg {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => DTypeArg::Auto,
            "float32" | "float" | "fp32" => DTypeArg::Float32,
            "float16" | "half" | "fp16" => DTypeArg::Float16,
            "bfloat16" | "bf16" => DTypeArg::BFloat16,
            _ => return None,
        })
    }
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// CUDA device 0 when this is a CUDA build and a GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceArg {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(DeviceArg::Auto),
            "cpu" => Some(DeviceArg::Cpu),
            "cuda" => Some(DeviceArg::Cuda(0)),
            _ => s.strip_prefix("cuda:")?.parse().ok().map(DeviceArg::Cuda),
        }
    }

    fn device(&self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda(n) => Device::new_cuda(*n).map_err(|e| {
                EngineError::Config(format!(
                    "cannot open CUDA device {n}: {e} (is this a CUDA build?)"
                ))
            }),
            DeviceArg::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// Everything needed to build an engine; the CLI flags map onto these fields.
#[derive(Debug, Clone)]
pub struct EngineArgs {
    /// A checkpoint directory or an `org/name` id in the Hugging Face cache.
    pub model: String,
    /// Tokenizer directory or id, when it is not next to the weights.
    pub tokenizer: Option<String>,
    pub revision: Option<String>,
    pub runner: Runner,
    pub convert: Convert,
    pub pooler_config: PoolerConfig,
    pub hf_overrides: Option<Value>,
    pub max_model_len: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub dtype: DTypeArg,
    pub device: DeviceArg,
    /// A Jinja chat template (file path or the template text).
    pub chat_template: Option<String>,
    /// Names the model answers to; the first is echoed. Defaults to `model`.
    pub served_model_name: Vec<String>,
    /// Sequences allowed to wait in the queue before requests are refused.
    pub max_queued_sequences: usize,
    /// Hosts image/video URLs may come from (`--allowed-media-domains`); `None` allows any.
    pub allowed_media_domains: Option<Vec<String>>,
    /// Local media files are read only under this directory (`--allowed-local-media-path`).
    pub allowed_local_media_path: Option<PathBuf>,
    /// Most images / videos one prompt may carry (`--limit-mm-per-prompt`).
    pub limit_mm_per_prompt: MediaLimits,
    /// Fetch media from loopback, private, link-local and metadata addresses
    /// (`--allow-private-media-hosts`); refused by default.
    pub allow_private_media_hosts: bool,
    /// Deadline for all of one request's media fetches (`--media-fetch-timeout`).
    pub media_fetch_timeout: Duration,
    /// Decoded pixels per image or video frame (`--max-image-pixels`).
    pub max_image_pixels: u64,
    /// Decoded pixels of all of one request's media (`--max-media-pixels-per-request`).
    pub max_media_pixels_per_request: u64,
    /// Serve LoRA adapters on the model (`--enable-lora`).
    pub enable_lora: bool,
    /// Adapters loaded at start (`--lora-modules`).
    pub lora_modules: Vec<LoraModuleArg>,
    /// `--max-loras`, `--max-lora-rank`.
    pub lora_limits: LoraLimits,
}

/// Per-prompt limits on multimodal inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaLimits {
    pub image: usize,
    pub video: usize,
}

impl Default for MediaLimits {
    /// Small on purpose (vLLM's 999 lets one prompt carry a thousand decodes):
    /// enough for a conversation with a few pictures or one clip.
    fn default() -> Self {
        MediaLimits { image: 8, video: 1 }
    }
}

impl MediaLimits {
    /// `{"image": N, "video": M}`; modalities left out keep the default.
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| {
            EngineError::Config("--limit-mm-per-prompt must be a JSON object".into())
        })?;
        let mut limits = MediaLimits::default();
        for (k, n) in obj {
            let n = n
                .as_u64()
                .or_else(|| n.get("count").and_then(Value::as_u64))
                .ok_or_else(|| {
                    EngineError::Config(format!(
                        "--limit-mm-per-prompt: `{k}` must be a non-negative integer"
                    ))
                })? as usize;
            match k.as_str() {
                "image" => limits.image = n,
                "video" => limits.video = n,
                other => {
                    return Err(EngineError::Config(format!(
                        "--limit-mm-per-prompt: unknown modality `{other}` (image, video)"
                    )))
                }
            }
        }
        Ok(limits)
    }
}

/// What a multimodal model needs to turn images and videos into inputs.
#[derive(Debug, Clone)]
pub struct MultimodalInfo {
    pub processor: Arc<VisionProcessor>,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub limits: MediaLimits,
    pub policy: Arc<MediaPolicy>,
}

impl EngineArgs {
    pub fn new(model: impl Into<String>) -> Self {
        EngineArgs {
            model: model.into(),
            tokenizer: None,
            revision: None,
            runner: Runner::Auto,
            convert: Convert::Auto,
            pooler_config: PoolerConfig::default(),
            hf_overrides: None,
            max_model_len: None,
            max_num_batched_tokens: None,
            max_num_seqs: None,
            dtype: DTypeArg::Auto,
            device: DeviceArg::Auto,
            chat_template: None,
            served_model_name: Vec::new(),
            max_queued_sequences: 100_000,
            allowed_media_domains: None,
            allowed_local_media_path: None,
            limit_mm_per_prompt: MediaLimits::default(),
            allow_private_media_hosts: false,
            media_fetch_timeout: MediaPolicy::default().timeout,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_media_pixels_per_request: DEFAULT_MAX_REQUEST_PIXELS,
            enable_lora: false,
            lora_modules: Vec::new(),
            lora_limits: LoraLimits::default(),
        }
    }
}

/// What a loaded model is, as the API layers need to know it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_dir: PathBuf,
    pub served_model_names: Vec<String>,
    pub architecture: String,
    pub task: PoolingTask,
    pub supported_tasks: Vec<PoolingTask>,
    pub pooling: PoolingType,
    /// STEP pooling's defaults (`--pooler-config`, else the model's).
    pub step_defaults: StepParams,
    pub num_labels: usize,
    /// `None` when the config's label keys are not integers.
    pub id2label: Option<BTreeMap<usize, String>>,
    pub activation: Activation,
    pub default_use_activation: bool,
    pub max_model_len: usize,
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub is_causal: bool,
    /// Cross-encoder pairs are concatenated (LLM-as-reranker) instead of pair-encoded.
    pub pair_concat: bool,
    /// `--chat-template` was given: scoring renders (query, document) through it.
    pub chat_template_from_cli: bool,
    pub vocab_size: usize,
    pub type_vocab_size: usize,
    pub dtype: DType,
    pub device: String,
    /// Set for models that take images and videos.
    pub multimodal: Option<MultimodalInfo>,
}

impl ModelInfo {
    pub fn served_name(&self) -> &str {
        &self.served_model_names[0]
    }

    pub fn label_of(&self, probs: &[f32]) -> Option<String> {
        let labels = self.id2label.as_ref()?;
        let mut best = 0usize;
        for (i, v) in probs.iter().enumerate() {
            if *v > probs[best] {
                best = i;
            }
        }
        labels.get(&best).cloned()
    }

    pub fn supports_score(&self) -> bool {
        self.task == PoolingTask::Classify && self.num_labels == 1
    }
}

/// One sequence to run: its tokens (and images/videos) and whether to apply the activation.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceInput {
    pub ids: Vec<u32>,
    pub token_type_ids: Option<Vec<u32>>,
    pub visuals: Vec<Arc<VisualInput>>,
    pub use_activation: bool,
    /// The request's STEP parameters; unset ones take the engine's defaults.
    pub step: StepParams,
    /// The LoRA adapter to run with (`None`: the base model).
    pub lora: Option<LoraRef>,
}

impl SequenceInput {
    pub fn new(prompt: TokenizedPrompt, use_activation: bool) -> Self {
        SequenceInput {
            ids: prompt.ids,
            token_type_ids: prompt.token_type_ids,
            visuals: prompt.visuals,
            use_activation,
            step: StepParams::default(),
            lora: None,
        }
    }

    pub fn with_step(mut self, step: StepParams) -> Self {
        self.step = step;
        self
    }

    pub fn with_lora(mut self, lora: Option<LoraRef>) -> Self {
        self.lora = lora;
        self
    }
}

/// The pooled result of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum PooledData {
    /// `classify`: one value per label.
    Vector(Vec<f32>),
    /// `token_classify`: one row of label values per prompt token.
    Matrix(Vec<Vec<f32>>),
}

impl PooledData {
    pub fn flatten(&self) -> Vec<f32> {
        match self {
            PooledData::Vector(v) => v.clone(),
            PooledData::Matrix(m) => m.iter().flatten().copied().collect(),
        }
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            PooledData::Vector(v) => vec![v.len()],
            PooledData::Matrix(m) => vec![m.len(), m.first().map_or(0, Vec::len)],
        }
    }
}

/// A loaded model that runs packed batches. Owned by the engine thread.
pub struct ModelRunner {
    backbone: Box<dyn Backbone>,
    head: ClassifierHead,
    task: PoolingTask,
    pooling: PoolingType,
    activation: Activation,
    calibration: Calibration,
    step_defaults: StepParams,
    /// The adapters' stacked factors come from here.
    lora: Option<Arc<LoraRegistry>>,
}

impl ModelRunner {
    /// Runs a batch in one forward pass. Inputs must already be validated.
    pub fn run(&self, seqs: &[SequenceInput]) -> Result<Vec<PooledData>> {
        // Sequences of one adapter side by side: each adapted layer then runs one
        // low-rank pair per adapter (a segment of rows), not one per sequence.
        let adapter_key = |s: &SequenceInput| s.lora.as_ref().map_or(0, |a| a.id());
        if !seqs.is_sorted_by_key(adapter_key) {
            let mut order: Vec<usize> = (0..seqs.len()).collect();
            order.sort_by_key(|&i| adapter_key(&seqs[i]));
            let sorted: Vec<SequenceInput> = order.iter().map(|&i| seqs[i].clone()).collect();
            let mut results: Vec<(usize, PooledData)> =
                order.into_iter().zip(self.run(&sorted)?).collect();
            results.sort_by_key(|(i, _)| *i);
            return Ok(results.into_iter().map(|(_, r)| r).collect());
        }
        let loaded = self.lora.as_ref().map(|r| r.stack());
        let adapters = BatchAdapters::for_sequences(
            loaded.as_ref(),
            seqs.iter()
                .map(|s| (s.lora.as_ref().map(|a| &a.0), s.ids.len())),
        )?;
        self.run_packed(seqs, adapters)
    }

    /// The head and activation a sequence's results come from: its adapter's, when
    /// the adapter brings a head, else the model's.
    fn head_of<'a>(&'a self, seq: &'a SequenceInput) -> (&'a ClassifierHead, Activation, u64) {
        match seq
            .lora
            .as_ref()
            .and_then(|a| a.head().map(|h| (h, a.id())))
        {
            Some((h, id)) => (&h.head, h.activation, id),
            None => (&self.head, self.activation, 0),
        }
    }

    /// Logits of each sequence's rows of `source` (`spans[i]`), each head run once
    /// over the rows of all its sequences; `None` for a sequence without rows.
    fn logits_by_head(
        &self,
        source: &candle_core::Tensor,
        spans: &[std::ops::Range<usize>],
        seqs: &[SequenceInput],
        per_token: bool,
    ) -> Result<Vec<Option<candle_core::Tensor>>> {
        let mut out: Vec<Option<candle_core::Tensor>> = vec![None; seqs.len()];
        let mut done = vec![false; seqs.len()];
        for first in 0..seqs.len() {
            if done[first] {
                continue;
            }
            let (head, _, key) = self.head_of(&seqs[first]);
            let members: Vec<usize> = (first..seqs.len())
                .filter(|&j| !done[j] && self.head_of(&seqs[j]).2 == key)
                .collect();
            let rows: Vec<u32> = members
                .iter()
                .flat_map(|&j| spans[j].clone().map(|r| r as u32))
                .collect();
            for &j in &members {
                done[j] = true;
            }
            if rows.is_empty() {
                continue;
            }
            let count = rows.len();
            let index = candle_core::Tensor::from_vec(rows, count, source.device())?;
            let selected = source.index_select(&index, 0)?;
            let logits = if per_token {
                head.forward_tokens(&selected)?
            } else {
                head.forward_sequences(&selected)?
            };
            let mut at = 0;
            for &j in &members {
                let len = spans[j].len();
                if len > 0 {
                    out[j] = Some(logits.narrow(0, at, len)?);
                }
                at += len;
            }
        }
        Ok(out)
    }

    /// Results when some sequences bring their adapter's head (classify, or
    /// token_classify with ALL pooling).
    fn run_heads(
        &self,
        hidden: &candle_core::Tensor,
        batch: &PackedBatch,
        seqs: &[SequenceInput],
    ) -> Result<Vec<PooledData>> {
        let per_token = self.task == PoolingTask::TokenClassify;
        let (source, spans): (candle_core::Tensor, Vec<std::ops::Range<usize>>) = if per_token {
            let spans = batch.cu_seqlens.windows(2).map(|w| w[0]..w[1]).collect();
            (hidden.to_dtype(DType::F32)?, spans)
        } else {
            let pooled = pool_sequences(hidden, &batch.cu_seqlens, self.pooling)?;
            (pooled, (0..seqs.len()).map(|i| i..i + 1).collect())
        };
        let logits = self.logits_by_head(&source, &spans, seqs, per_token)?;
        seqs.iter()
            .zip(logits)
            .map(|(seq, logits)| {
                let Some(x) = logits else {
                    return Ok(PooledData::Matrix(Vec::new()));
                };
                let mut x = self.calibration.apply(x)?;
                if seq.use_activation {
                    x = self.head_of(seq).1.apply(&x)?;
                }
                let rows = x.to_vec2::<f32>()?;
                Ok(if per_token {
                    PooledData::Matrix(rows)
                } else {
                    PooledData::Vector(rows.into_iter().next().unwrap_or_default())
                })
            })
            .collect()
    }

    fn run_packed(
        &self,
        seqs: &[SequenceInput],
        adapters: Option<BatchAdapters>,
    ) -> Result<Vec<PooledData>> {
        let mut batch = PackedBatch::from_sequences(
            seqs.iter()
                .map(|s| (s.ids.as_slice(), s.token_type_ids.as_deref())),
        );
        if seqs.iter().any(|s| !s.visuals.is_empty()) {
            batch.visuals = seqs.iter().map(|s| s.visuals.clone()).collect();
        }
        let started = std::time::Instant::now();
        let hidden = lora::scoped(adapters, || self.backbone.forward(&batch))?;
        let queued = started.elapsed();
        let own_heads = seqs
            .iter()
            .any(|s| s.lora.as_ref().is_some_and(|a| a.head().is_some()));
        match self.task {
            PoolingTask::TokenClassify if self.pooling == PoolingType::Step => {
                self.step_rows(&hidden, &batch, seqs, own_heads)
            }
            _ if own_heads => self.run_heads(&hidden, &batch, seqs),
            PoolingTask::TokenClassify => {
                let logits = self.head.forward_tokens(&hidden.to_dtype(DType::F32)?)?;
                let logits = self.calibration.apply(logits)?;
                let mut out = Vec::with_capacity(seqs.len());
                for (i, s) in seqs.iter().enumerate() {
                    let rows = logits.narrow(
                        0,
                        batch.cu_seqlens[i],
                        batch.cu_seqlens[i + 1] - batch.cu_seqlens[i],
                    )?;
                    let rows = if s.use_activation {
                        self.activation.apply(&rows)?
                    } else {
                        rows
                    };
                    out.push(PooledData::Matrix(rows.to_vec2::<f32>()?));
                }
                Ok(out)
            }
            _ => {
                let pooled = pool_sequences(&hidden, &batch.cu_seqlens, self.pooling)?;
                let logits = self
                    .calibration
                    .apply(self.head.forward_sequences(&pooled)?)?;
                let activated = if seqs.iter().any(|s| s.use_activation) {
                    Some(self.activation.apply(&logits)?.to_vec2::<f32>()?)
                } else {
                    None
                };
                let raw = logits.to_vec2::<f32>()?;
                if timing_enabled() {
                    eprintln!(
                        "batch: {} sequences, {} tokens: forward queued in {:.1} ms, results in {:.1} ms",
                        seqs.len(),
                        batch.input_ids.len(),
                        queued.as_secs_f64() * 1e3,
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
                Ok(seqs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let row = match (&activated, s.use_activation) {
                            (Some(a), true) => a[i].clone(),
                            _ => raw[i].clone(),
                        };
                        PooledData::Vector(row)
                    })
                    .collect())
            }
        }
    }
}

impl ModelRunner {
    /// STEP pooling: the head's rows at each sequence's step-tag tokens (all
    /// rows without a tag), restricted to `returned_token_ids` columns, then
    /// calibrated and activated over those columns. Only the kept rows go
    /// through the head, so an LM head never sees the other tokens.
    fn step_rows(
        &self,
        hidden: &candle_core::Tensor,
        batch: &PackedBatch,
        seqs: &[SequenceInput],
        own_heads: bool,
    ) -> Result<Vec<PooledData>> {
        let params: Vec<StepParams> = seqs
            .iter()
            .map(|s| s.step.or(&self.step_defaults))
            .collect();
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for (i, p) in params.iter().enumerate() {
            let start = rows.len();
            let (lo, hi) = (batch.cu_seqlens[i], batch.cu_seqlens[i + 1]);
            rows.extend(
                (lo..hi)
                    .filter(|&t| p.step_tag_id.is_none_or(|tag| batch.input_ids[t] == tag))
                    .map(|t| t as u32),
            );
            spans.push(start..rows.len());
        }
        let logits: Vec<Option<candle_core::Tensor>> = if rows.is_empty() {
            vec![None; seqs.len()]
        } else {
            let index = candle_core::Tensor::from_vec(rows.clone(), rows.len(), hidden.device())?;
            let kept = hidden.index_select(&index, 0)?.to_dtype(DType::F32)?;
            if own_heads {
                self.logits_by_head(&kept, &spans, seqs, true)?
            } else {
                let logits = self.head.forward_tokens(&kept)?;
                spans
                    .iter()
                    .map(|span| {
                        (!span.is_empty())
                            .then(|| logits.narrow(0, span.start, span.len()))
                            .transpose()
                    })
                    .collect::<candle_core::Result<_>>()?
            }
        };
        let mut out = Vec::with_capacity(seqs.len());
        for ((seq, p), logits) in seqs.iter().zip(&params).zip(logits) {
            let columns = p.returned_token_ids.as_deref().filter(|c| !c.is_empty());
            let Some(mut x) = logits else {
                out.push(PooledData::Matrix(Vec::new()));
                continue;
            };
            let (head, activation, _) = self.head_of(seq);
            let labels = head.num_labels();
            if let Some(columns) = columns {
                // Requests are checked before they queue; this keeps a bad
                // column from reaching the gather kernel by any other path.
                crate::llm::check_returned_token_ids(p, labels)?;
                let index =
                    candle_core::Tensor::from_vec(columns.to_vec(), columns.len(), x.device())?;
                x = x.index_select(&index, 1)?;
            }
            x = self.calibration.apply(x)?;
            if seq.use_activation {
                x = activation.apply(&x)?;
            }
            out.push(PooledData::Matrix(x.to_vec2::<f32>()?));
        }
        Ok(out)
    }
}

/// `VERDICT_TIMING=1`: one line per batch on stderr with the time the host took to
/// queue the forward pass and the time until its results were back.
fn timing_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("VERDICT_TIMING").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Everything `load` builds: the runner (for the engine thread), the tokenizer and the facts.
pub struct LoadedEngine {
    pub runner: ModelRunner,
    pub tokenizer: Arc<TextTokenizer>,
    pub info: ModelInfo,
    /// The adapters, with `--enable-lora`.
    pub lora: Option<Arc<LoraRegistry>>,
}

/// Resolves, validates and loads a checkpoint according to `args`.
pub fn load(args: &EngineArgs) -> Result<LoadedEngine> {
    let dir = resolve_model_dir(&args.model, args.revision.as_deref())?;
    let files = ModelFiles::from_dir(&dir)?;
    let mut config = HfConfig::load(&files.config, args.hf_overrides.as_ref())?;
    apply_original_qwen3_reranker(&mut config)?;

    let arch_name =
        config.architectures().into_iter().next().ok_or_else(|| {
            EngineError::Config("config.json has no `architectures` entry".into())
        })?;
    let arch = ArchInfo::from_name(&arch_name)?;
    check_runner(&arch, args)?;

    let tokenizer_dir = match &args.tokenizer {
        Some(t) => resolve_model_dir(t, args.revision.as_deref())?,
        None => dir.clone(),
    };
    let chat_template = args
        .chat_template
        .as_deref()
        .map(read_template_arg)
        .transpose()?;
    let mut tokenizer = TextTokenizer::load(&tokenizer_dir, chat_template.as_deref())?;
    apply_sentence_transformers_settings(&files, &mut tokenizer);

    // LLM-as-classifier conversions: the head comes from LM-head rows.
    let from_token = token_classifier_spec(&arch, &config, &tokenizer)?;
    if let Some(spec) = &from_token {
        let labels = match spec.method {
            TokenMethod::From2WaySoftmax => 1,
            TokenMethod::NoPostProcessing => spec.token_ids.len(),
        };
        config.set_num_labels(labels);
    }
    if let ArchKind::Reward(kind) = arch.kind {
        config.set_num_labels(kind.num_labels());
    }
    let num_labels = config.num_labels();
    if num_labels == 0 {
        return Err(EngineError::Config(
            "the config declares no labels (num_labels = 0 / empty id2label)".into(),
        ));
    }

    let device = args.device.device()?;
    crate::layers::configure_device(&device)?;
    let dtype = match args.dtype {
        DTypeArg::Float32 => DType::F32,
        DTypeArg::Float16 => DType::F16,
        DTypeArg::BFloat16 => DType::BF16,
        DTypeArg::Auto if device.is_cpu() => DType::F32,
        DTypeArg::Auto => match config.str("torch_dtype").or_else(|| config.str("dtype")) {
            Some("float16") => DType::F16,
            _ => DType::BF16,
        },
    };
    let pooler = &args.pooler_config;
    let supported_tasks = arch.supported_tasks();
    // STEP is a token pooling: asking for it selects token_classify.
    let task = pooler.task.unwrap_or_else(|| {
        if pooler.tok_pooling_type == Some(PoolingType::Step) {
            PoolingTask::TokenClassify
        } else {
            arch.default_task()
        }
    });
    if !supported_tasks.contains(&task) {
        return Err(EngineError::Config(format!(
            "Unsupported task: '{task}' Supported tasks: {}",
            task_list(&supported_tasks)
        )));
    }
    let token_pooling = pooler
        .tok_pooling_type
        .unwrap_or(match arch.default_pooling() {
            PoolingType::Step => PoolingType::Step,
            _ => PoolingType::All,
        });
    let step_pooling = task == PoolingTask::TokenClassify && token_pooling == PoolingType::Step;
    // A causal LM under STEP pooling (math-shepherd) reads vocabulary columns
    // of its LM head, unless the checkpoint has a `score` head.
    let lm_head_logits = step_pooling
        && from_token.is_none()
        && arch.has_lm_head()
        && !matches!(arch.kind, ArchKind::Reward(_));

    if !args.enable_lora && !args.lora_modules.is_empty() {
        return Err(EngineError::Config(
            "--lora-modules needs --enable-lora".into(),
        ));
    }
    if args.enable_lora && !arch.supports_lora() {
        return Err(EngineError::Config(format!(
            "LoRA adapters are not supported for {arch_name} \
             (supported: the BERT family, ModernBERT, DeBERTa-v2/v3 and the Llama-family decoders)"
        )));
    }
    let mut weights = Weights::open(&files, dtype, &device)?;
    if args.enable_lora {
        weights.collect_lora_targets();
    }
    let loaded = load_model(
        &arch,
        &config,
        &weights,
        num_labels,
        from_token.as_ref(),
        lm_head_logits,
    )?;
    let lora_targets = weights.take_lora_targets();
    drop(weights);
    let num_labels = loaded.head.num_labels();

    let pooling = match task {
        PoolingTask::TokenClassify => token_pooling,
        _ => pooler.seq_pooling_type.unwrap_or_else(|| {
            loaded
                .default_pooling
                .unwrap_or_else(|| arch.default_pooling())
        }),
    };
    let mut step_defaults = pooler.step_params();
    if arch.kind == ArchKind::Reward(RewardKind::Process) {
        // vLLM's default for Qwen2.5-Math-PRM: the `<extra_0>` token.
        step_defaults.step_tag_id = step_defaults.step_tag_id.or(Some(151_651));
    }
    if pooling == PoolingType::Step {
        crate::llm::check_returned_token_ids(&step_defaults, num_labels)
            .map_err(|e| EngineError::Config(format!("--pooler-config: {e}")))?;
    }
    // Outcome reward models return raw rewards unless asked otherwise (as vLLM).
    let default_use_activation = pooler
        .use_activation
        .unwrap_or(arch.kind != ArchKind::Reward(RewardKind::Outcome));

    let backbone = &loaded.backbone;
    let position_limit = backbone.max_positions();
    let derived_len = match (position_limit, arch.is_causal()) {
        (Some(p), false) => tokenizer.model_max_length().map_or(p, |t| t.min(p)),
        (Some(p), true) => p,
        (None, _) => 32_768,
    };
    let max_model_len = match args.max_model_len {
        Some(0) => {
            return Err(EngineError::Config(
                "--max-model-len must be positive".into(),
            ))
        }
        Some(n) => {
            if let Some(limit) = position_limit {
                if n > limit {
                    return Err(EngineError::Config(format!(
                        "--max-model-len {n} is larger than the model's {limit} positions"
                    )));
                }
            }
            n
        }
        None => derived_len,
    };
    let max_num_seqs = args.max_num_seqs.unwrap_or(256).max(1);
    let max_num_batched_tokens = match args.max_num_batched_tokens {
        Some(n) if n < max_model_len => {
            return Err(EngineError::Config(format!(
                "max_num_batched_tokens ({n}) is smaller than max_model_len ({max_model_len}). \
                 This effectively limits the maximum sequence length to max_num_batched_tokens and makes \
                 verdict reject longer sequences. Please increase max_num_batched_tokens or decrease max_model_len."
            )))
        }
        Some(n) => n,
        // On the CPU a 4096-token batch already keeps the matmuls busy and
        // halves peak memory against 8192; GPUs want larger batches.
        None => max_model_len.max(if device.is_cpu() { 4096 } else { 16384 }),
    };

    let multimodal = match arch.family {
        Family::Qwen25Vl => {
            let tokens = VlTokens::from_config(&config);
            let local = match &args.allowed_local_media_path {
                Some(p) => Some(
                    p.canonicalize()
                        .map_err(|e| EngineError::io_path("--allowed-local-media-path", p, e))?,
                ),
                None => None,
            };
            Some(MultimodalInfo {
                processor: Arc::new(VisionProcessor::load(&dir)?),
                image_token_id: tokens.image_token_id,
                video_token_id: tokens.video_token_id,
                limits: args.limit_mm_per_prompt,
                policy: Arc::new(MediaPolicy {
                    allowed_domains: args.allowed_media_domains.clone(),
                    allowed_local_path: local,
                    allow_private_hosts: args.allow_private_media_hosts,
                    timeout: args.media_fetch_timeout,
                    max_image_pixels: args.max_image_pixels,
                    max_request_pixels: args.max_media_pixels_per_request,
                    ..MediaPolicy::default()
                }),
            })
        }
        _ => None,
    };

    let activation = Activation::from_config(&config)?;
    let served_model_names = if args.served_model_name.is_empty() {
        vec![args.model.clone()]
    } else {
        args.served_model_name.clone()
    };
    let lora = if args.enable_lora {
        let base = lora::BaseModel {
            files: files.clone(),
            arch: arch.clone(),
            config: config.clone(),
            hidden: backbone.hidden_size(),
            dtype,
            device: device.clone(),
            num_labels,
            id2label: config.id2label(),
            activation,
        };
        let registry = LoraRegistry::new(base, lora_targets, args.lora_limits);
        for module in &args.lora_modules {
            if served_model_names.contains(&module.name) {
                return Err(EngineError::Config(format!(
                    "--lora-modules: `{}` is the base model's name; give the adapter another",
                    module.name
                )));
            }
            registry.load(&module.name, &module.path)?;
        }
        Some(Arc::new(registry))
    } else {
        None
    };
    let pair_concat = from_token.is_some() || config.bool("use_sep_token") == Some(false);
    let info = ModelInfo {
        model_dir: dir,
        served_model_names,
        architecture: arch_name,
        task,
        supported_tasks,
        pooling,
        step_defaults: step_defaults.clone(),
        num_labels,
        id2label: config.id2label(),
        activation,
        default_use_activation,
        max_model_len,
        max_num_batched_tokens,
        max_num_seqs,
        is_causal: arch.is_causal(),
        pair_concat,
        chat_template_from_cli: args.chat_template.is_some(),
        vocab_size: backbone.vocab_size(),
        type_vocab_size: backbone.type_vocab_size(),
        dtype,
        device: format!("{device:?}"),
        multimodal,
    };
    let runner = ModelRunner {
        backbone: loaded.backbone,
        head: loaded.head,
        task,
        pooling,
        activation,
        calibration: Calibration {
            mean: pooler.logit_mean,
            sigma: pooler.logit_sigma,
        },
        step_defaults,
        lora: lora.clone(),
    };
    Ok(LoadedEngine {
        runner,
        tokenizer: Arc::new(tokenizer),
        info,
        lora,
    })
}

pub(crate) fn task_list(tasks: &[PoolingTask]) -> String {
    let names: Vec<String> = tasks.iter().map(|t| format!("'{t}'")).collect();
    format!("({})", names.join(", "))
}

fn check_runner(arch: &ArchInfo, args: &EngineArgs) -> Result<()> {
    if args.runner == Runner::Generate {
        return Err(EngineError::Config(
            "verdict serves pooling models only; `--runner generate` is not available".into(),
        ));
    }
    if args.convert == Convert::Embed {
        return Err(EngineError::Config(
            "`--convert embed` is not supported: verdict serves classification models (use --convert classify)".into(),
        ));
    }
    if arch.kind == ArchKind::Generative && args.convert != Convert::Classify {
        return Err(EngineError::Config(format!(
            "{} is a generative architecture. This model does not support `--runner pooling`. \
             You can pass `--convert classify` to adapt it into a pooling model.",
            arch.architecture
        )));
    }
    Ok(())
}

/// `is_original_qwen3_reranker` (vLLM's recipe for the original Qwen3-Reranker
/// checkpoints, which are `Qwen3ForCausalLM`): served as a
/// `Qwen3ForSequenceClassification` whose score is the 2-way softmax of the
/// "no" / "yes" LM-head rows, unless the overrides say otherwise.
fn apply_original_qwen3_reranker(config: &mut HfConfig) -> Result<()> {
    if config
        .get_with_text("is_original_qwen3_reranker")
        .and_then(Value::as_bool)
        != Some(true)
    {
        return Ok(());
    }
    let causal = config
        .architectures()
        .first()
        .is_none_or(|a| a == "Qwen3ForCausalLM");
    let raw = config.raw_mut();
    if causal {
        raw["architectures"] = serde_json::json!(["Qwen3ForSequenceClassification"]);
    }
    let tokens = raw
        .get("classifier_from_token")
        .filter(|t| !t.is_null())
        .cloned()
        .unwrap_or_else(|| serde_json::json!(["no", "yes"]));
    if tokens.as_array().map(Vec::len) != Some(2) {
        return Err(EngineError::Config(
            "is_original_qwen3_reranker needs classifier_from_token with exactly 2 tokens \
             (the false and the true token, e.g. [\"no\", \"yes\"])"
                .into(),
        ));
    }
    raw["classifier_from_token"] = tokens;
    raw["method"] = Value::from("from_2_way_softmax");
    Ok(())
}

/// `classifier_from_token` + `method` from the (overridden) config, resolved to token ids.
fn token_classifier_spec(
    arch: &ArchInfo,
    config: &HfConfig,
    tokenizer: &TextTokenizer,
) -> Result<Option<TokenClassifierSpec>> {
    let tokens = config.get_with_text("classifier_from_token");
    let method = config
        .get_with_text("method")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let (tokens, method) = match (tokens, method) {
        (None, None) => return Ok(None),
        (Some(t), Some(m)) => (t, m),
        (Some(_), None) => {
            return Err(EngineError::Config(
                "classifier_from_token is set but `method` is not (from_2_way_softmax or no_post_processing)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(EngineError::Config("`method` is set but classifier_from_token is not".into()))
        }
    };
    if !arch.has_lm_head() {
        return Err(EngineError::Config(
            "classifier_from_token applies to decoder (LLM) checkpoints only".into(),
        ));
    }
    let names: Vec<String> = tokens
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return Err(EngineError::Config(
            "classifier_from_token must be a non-empty list of token strings".into(),
        ));
    }
    let mut ids = Vec::with_capacity(names.len());
    for n in &names {
        ids.push(tokenizer.token_to_id(n).ok_or_else(|| {
            EngineError::Config(format!(
                "classifier_from_token `{n}` is not a token of this tokenizer"
            ))
        })?);
    }
    let method = match method.as_str() {
        "from_2_way_softmax" => TokenMethod::From2WaySoftmax,
        "no_post_processing" => TokenMethod::NoPostProcessing,
        other => {
            return Err(EngineError::Config(format!(
                "unknown method `{other}` (expected from_2_way_softmax or no_post_processing)"
            )))
        }
    };
    Ok(Some(TokenClassifierSpec {
        token_ids: ids,
        method,
    }))
}

/// `--chat-template` may name a file or hold the template itself.
fn read_template_arg(arg: &str) -> Result<String> {
    let path = std::path::Path::new(arg);
    if !arg.contains("{%") && !arg.contains("{{") {
        return std::fs::read_to_string(path)
            .map_err(|e| EngineError::io_path("reading chat template", path, e));
    }
    Ok(arg.to_string())
}

/// sentence-transformers' `do_lower_case` (sentence_bert_config.json).
fn apply_sentence_transformers_settings(files: &ModelFiles, tokenizer: &mut TextTokenizer) {
    if let Some(p) = files.optional("sentence_bert_config.json") {
        if let Ok(text) = std::fs::read_to_string(p) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                if v.get("do_lower_case").and_then(Value::as_bool) == Some(true) {
                    tokenizer.set_do_lower_case(true);
                }
            }
        }
    }
}

/// A tensor of zeros, to warm up allocations before the first request.
pub fn warmup(runner: &ModelRunner) -> Result<()> {
    let seq = SequenceInput::new(vec![0; 4].into(), true);
    runner.run(std::slice::from_ref(&seq)).map(|_| ())
}

/// True in a CUDA build on a machine with a GPU.
pub fn cuda_available() -> bool {
    candle_core::utils::cuda_is_available()
}
