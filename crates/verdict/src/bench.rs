//! `verdict bench`: the "mixed" workload (prompt lengths log-uniform in
//! [16, 512], token ids uniform in [1000, 30000), seed 0) on random-weight
//! models of real shapes. Throughput does not depend on weight values; the
//! weights are written once as a real checkpoint and loaded the normal way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use std::sync::Arc;

use verdict_engine::lora::LoraRef;
use verdict_engine::{
    DTypeArg, DeviceArg, Engine, EngineArgs, LoraLimits, LoraModuleArg, Prompt, SequenceInput,
    TokenizeOptions,
};
use verdict_server::ServerConfig;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model shape: minilm-l6, bert-base, deberta-v3-base, modernbert-base, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b or gemma2-2b.
    #[arg(long, default_value = "minilm-l6")]
    pub shape: String,

    /// Number of prompts in the workload.
    #[arg(long, default_value_t = 512)]
    pub num_prompts: usize,

    /// Seed of the workload's lengths and token ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Shortest and longest prompt.
    #[arg(long, default_value_t = 16)]
    pub min_len: usize,
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,

    /// auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Token budget of one packed batch.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,

    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Timed repetitions of the whole workload (the best is reported as well).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Also serve the model over HTTP on loopback and run the workload through
    /// /classify (one prompt per request) at each of these concurrency levels,
    /// printing throughput and p50/p99 latency beside the offline number.
    #[arg(long, value_delimiter = ',')]
    pub server_concurrency: Vec<usize>,

    /// Where random checkpoints are cached (default: $VERDICT_HOME/bench).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,

    /// Also run the workload with this many random LoRA adapters (on every linear
    /// layer of the backbone), prompt i through adapter i mod N, so each batch mixes
    /// them all; prints the throughput against the base model's.
    #[arg(long, default_value_t = 0)]
    pub lora_adapters: usize,

    /// Rank of the --lora-adapters adapters.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
}

/// The architecture of a benchmark shape.
struct Shape {
    name: &'static str,
    config: serde_json::Value,
}

fn shape(name: &str) -> Result<Shape> {
    let bert = |layers: usize, hidden: usize, heads: usize, ffn: usize| {
        json!({
            "architectures": ["BertForSequenceClassification"], "model_type": "bert",
            "vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ffn, "hidden_act": "gelu",
            "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "pad_token_id": 0, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}
        })
    };
    let qwen = |layers: usize,
                hidden: usize,
                heads: usize,
                kv: usize,
                ffn: usize,
                vocab: usize,
                tie: bool| {
        json!({
            "architectures": ["Qwen2ForSequenceClassification"], "model_type": "qwen2",
            "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn,
            "hidden_act": "silu", "max_position_embeddings": 32768, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": tie, "pad_token_id": 151643,
            "id2label": {"0": "LABEL_0", "1": "LABEL_1"}
        })
    };
    // deberta-v3-base: relative positions only (256 log buckets), shared position keys.
    let deberta_v3_base = json!({
        "architectures": ["DebertaV2ForSequenceClassification"], "model_type": "deberta-v2",
        "vocab_size": 128100, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
        "max_position_embeddings": 512, "type_vocab_size": 0, "layer_norm_eps": 1e-7,
        "relative_attention": true, "position_buckets": 256, "max_relative_positions": -1,
        "pos_att_type": "p2c|c2p", "share_att_key": true, "norm_rel_ebd": "layer_norm",
        "position_biased_input": false, "pooler_hidden_act": "gelu", "pad_token_id": 0,
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"}
    });
    let (name, config) = match name {
        "minilm-l6" => ("minilm-l6", bert(6, 384, 12, 1536)),
        "bert-base" => ("bert-base", bert(12, 768, 12, 3072)),
        "modernbert-base" => (
            "modernbert-base",
            json!({
                "architectures": ["ModernBertForSequenceClassification"], "model_type": "modernbert",
                "vocab_size": 50368, "hidden_size": 768, "num_hidden_layers": 22,
                "num_attention_heads": 12, "intermediate_size": 1152, "hidden_activation": "gelu",
                "max_position_embeddings": 8192, "local_attention": 128,
                "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
                "local_rope_theta": 10000.0, "norm_eps": 1e-5, "norm_bias": false,
                "attention_bias": false, "mlp_bias": false, "classifier_bias": false,
                "classifier_activation": "gelu", "classifier_pooling": "mean",
                "pad_token_id": 50283, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}
            }),
        ),
        "deberta-v3-base" => ("deberta-v3-base", deberta_v3_base),
        "qwen2.5-0.5b" => ("qwen2.5-0.5b", qwen(24, 896, 14, 2, 4864, 151936, true)),
        "qwen2.5-1.5b" => ("qwen2.5-1.5b", qwen(28, 1536, 12, 2, 8960, 151936, true)),
        "qwen2.5-7b" => ("qwen2.5-7b", qwen(28, 3584, 28, 4, 18944, 152064, false)),
        // Gemma-2-2B: head_dim 256, soft-capping and the sliding window on.
        "gemma2-2b" => (
            "gemma2-2b",
            json!({
                "architectures": ["Gemma2ForSequenceClassification"], "model_type": "gemma2",
                "vocab_size": 256000, "hidden_size": 2304, "num_hidden_layers": 26,
                "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                "intermediate_size": 9216, "hidden_activation": "gelu_pytorch_tanh",
                "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "sliding_window": 4096,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "query_pre_attn_scalar": 256, "tie_word_embeddings": true, "pad_token_id": 0,
                "id2label": {"0": "LABEL_0", "1": "LABEL_1"}
            }),
        ),
        other => bail!("unknown shape `{other}` (minilm-l6, bert-base, deberta-v3-base, modernbert-base, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, gemma2-2b)"),
    };
    Ok(Shape { name, config })
}

/// Tensor names and shapes of a shape's checkpoint.
fn tensor_shapes(cfg: &serde_json::Value) -> Vec<(String, Vec<usize>)> {
    let u = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| t.push((name, shape));
    let h = u("hidden_size");
    let ffn = u("intermediate_size");
    if cfg["model_type"] == "bert" {
        add(
            "bert.embeddings.word_embeddings.weight".into(),
            vec![u("vocab_size"), h],
        );
        add(
            "bert.embeddings.position_embeddings.weight".into(),
            vec![u("max_position_embeddings"), h],
        );
        add(
            "bert.embeddings.token_type_embeddings.weight".into(),
            vec![2, h],
        );
        add("bert.embeddings.LayerNorm.weight".into(), vec![h]);
        add("bert.embeddings.LayerNorm.bias".into(), vec![h]);
        for i in 0..u("num_hidden_layers") {
            let p = format!("bert.encoder.layer.{i}");
            for (n, s) in encoder_layer_shapes(&p, ["query", "key", "value"], h, ffn) {
                add(n, s);
            }
        }
        add("bert.pooler.dense.weight".into(), vec![h, h]);
        add("bert.pooler.dense.bias".into(), vec![h]);
        add("classifier.weight".into(), vec![2, h]);
        add("classifier.bias".into(), vec![2]);
    } else if cfg["model_type"] == "modernbert" {
        add(
            "model.embeddings.tok_embeddings.weight".into(),
            vec![u("vocab_size"), h],
        );
        add("model.embeddings.norm.weight".into(), vec![h]);
        for i in 0..u("num_hidden_layers") {
            let p = format!("model.layers.{i}");
            if i > 0 {
                add(format!("{p}.attn_norm.weight"), vec![h]);
            }
            add(format!("{p}.attn.Wqkv.weight"), vec![3 * h, h]);
            add(format!("{p}.attn.Wo.weight"), vec![h, h]);
            add(format!("{p}.mlp_norm.weight"), vec![h]);
            add(format!("{p}.mlp.Wi.weight"), vec![2 * ffn, h]);
            add(format!("{p}.mlp.Wo.weight"), vec![h, ffn]);
        }
        add("model.final_norm.weight".into(), vec![h]);
        add("head.dense.weight".into(), vec![h, h]);
        add("head.norm.weight".into(), vec![h]);
        // `classifier_bias` is the head's dense layer; the classifier always has one.
        add("classifier.weight".into(), vec![2, h]);
        add("classifier.bias".into(), vec![2]);
    } else if cfg["model_type"] == "deberta-v2" {
        add(
            "deberta.embeddings.word_embeddings.weight".into(),
            vec![u("vocab_size"), h],
        );
        add("deberta.embeddings.LayerNorm.weight".into(), vec![h]);
        add("deberta.embeddings.LayerNorm.bias".into(), vec![h]);
        add(
            "deberta.encoder.rel_embeddings.weight".into(),
            vec![2 * u("position_buckets"), h],
        );
        add("deberta.encoder.LayerNorm.weight".into(), vec![h]);
        add("deberta.encoder.LayerNorm.bias".into(), vec![h]);
        for i in 0..u("num_hidden_layers") {
            let p = format!("deberta.encoder.layer.{i}");
            for (n, s) in encoder_layer_shapes(&p, ["query_proj", "key_proj", "value_proj"], h, ffn)
            {
                add(n, s);
            }
        }
        add("pooler.dense.weight".into(), vec![h, h]);
        add("pooler.dense.bias".into(), vec![h]);
        add("classifier.weight".into(), vec![2, h]);
        add("classifier.bias".into(), vec![2]);
    } else {
        let heads = u("num_attention_heads");
        let kv = u("num_key_value_heads");
        let d = cfg["head_dim"].as_u64().map_or(h / heads, |d| d as usize);
        let qkv_bias = cfg["model_type"] == "qwen2";
        let gemma2 = cfg["model_type"] == "gemma2";
        add("model.embed_tokens.weight".into(), vec![u("vocab_size"), h]);
        for i in 0..u("num_hidden_layers") {
            let p = format!("model.layers.{i}");
            add(format!("{p}.input_layernorm.weight"), vec![h]);
            add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
            if gemma2 {
                add(format!("{p}.pre_feedforward_layernorm.weight"), vec![h]);
                add(format!("{p}.post_feedforward_layernorm.weight"), vec![h]);
            }
            for (n, o) in [
                ("q_proj", heads * d),
                ("k_proj", kv * d),
                ("v_proj", kv * d),
            ] {
                add(format!("{p}.self_attn.{n}.weight"), vec![o, h]);
                if qkv_bias {
                    add(format!("{p}.self_attn.{n}.bias"), vec![o]);
                }
            }
            add(format!("{p}.self_attn.o_proj.weight"), vec![h, heads * d]);
            add(format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]);
            add(format!("{p}.mlp.up_proj.weight"), vec![ffn, h]);
            add(format!("{p}.mlp.down_proj.weight"), vec![h, ffn]);
        }
        add("model.norm.weight".into(), vec![h]);
        add("score.weight".into(), vec![2, h]);
    }
    t
}

/// One BERT-style post-LN encoder layer's tensors, with the given q/k/v names.
fn encoder_layer_shapes(
    prefix: &str,
    qkv: [&str; 3],
    h: usize,
    ffn: usize,
) -> Vec<(String, Vec<usize>)> {
    let mut t = Vec::new();
    let [q, k, v] = qkv.map(|n| format!("attention.self.{n}"));
    for (n, o, inp) in [
        (q.as_str(), h, h),
        (k.as_str(), h, h),
        (v.as_str(), h, h),
        ("attention.output.dense", h, h),
        ("intermediate.dense", ffn, h),
        ("output.dense", h, ffn),
    ] {
        t.push((format!("{prefix}.{n}.weight"), vec![o, inp]));
        t.push((format!("{prefix}.{n}.bias"), vec![o]));
    }
    for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
        t.push((format!("{prefix}.{n}.weight"), vec![h]));
        t.push((format!("{prefix}.{n}.bias"), vec![h]));
    }
    t
}

/// Writes a random-weight checkpoint (bf16 or f32 storage) unless it is cached.
fn ensure_checkpoint(dir: &Path, shape: &Shape, bf16: bool) -> Result<()> {
    if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut next = random_weights(0x9E37_79B9_7F4A_7C15, 0.04);
    // Gemma's norms scale by (1 + w): w = 0 is the neutral norm there.
    let norm_weight = match shape.config["model_type"].as_str() {
        Some(t) if t.starts_with("gemma") => 0.0,
        _ => 1.0,
    };
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, dims) in tensor_shapes(&shape.config) {
        let n: usize = dims.iter().product();
        let is_norm = name.contains("norm") || name.contains("LayerNorm.weight");
        let mut bytes = Vec::with_capacity(n * if bf16 { 2 } else { 4 });
        for _ in 0..n {
            let v = if is_norm && name.ends_with("weight") {
                norm_weight
            } else {
                next()
            };
            push_value(&mut bytes, v, bf16);
        }
        buffers.push((name, dims, bytes));
    }
    write_safetensors(&dir.join("model.safetensors"), &buffers, bf16)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&shape.config)?,
    )?;
    // The workload is token ids; a one-token tokenizer satisfies the loader.
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0},"unk_token":"[UNK]"}}"#,
    )?;
    Ok(())
}

/// Writes a random PEFT adapter (rank `rank` on every linear layer of the
/// backbone's blocks) for a bench shape unless it is cached.
fn ensure_adapter(dir: &Path, shape: &Shape, rank: usize, seed: u64, bf16: bool) -> Result<()> {
    if dir.join("adapter_model.safetensors").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut next = random_weights(
        0x2545_F491_4F6C_DD1D ^ (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        0.02,
    );
    let linears: Vec<(String, usize, usize)> = tensor_shapes(&shape.config)
        .into_iter()
        .filter(|(name, dims)| {
            dims.len() == 2
                && name.contains(".layer")
                && !name.contains("norm")
                && !name.contains("embeddings")
        })
        .filter_map(|(name, dims)| {
            Some((name.strip_suffix(".weight")?.to_string(), dims[0], dims[1]))
        })
        .collect();
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (module, out, inp) in &linears {
        for (suffix, dims) in [("lora_A", vec![rank, *inp]), ("lora_B", vec![*out, rank])] {
            let n: usize = dims.iter().product();
            let mut bytes = Vec::with_capacity(n * 4);
            for _ in 0..n {
                push_value(&mut bytes, next(), bf16);
            }
            buffers.push((
                format!("base_model.model.{module}.{suffix}.weight"),
                dims,
                bytes,
            ));
        }
    }
    let names: Vec<&str> = linears
        .iter()
        .filter_map(|(m, _, _)| m.rsplit('.').next())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&json!({
            "peft_type": "LORA", "task_type": "SEQ_CLS", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": names, "bias": "none", "use_rslora": false, "use_dora": false,
        }))?,
    )?;
    write_safetensors(&dir.join("adapter_model.safetensors"), &buffers, bf16)
}

/// Uniform values in `[-width/2, width/2)` from an xorshift generator seeded with `state`.
fn random_weights(mut state: u64, width: f32) -> impl FnMut() -> f32 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * width
    }
}

/// Appends one value in the checkpoint's storage type.
fn push_value(bytes: &mut Vec<u8>, v: f32, bf16: bool) {
    if bf16 {
        bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    } else {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
}

/// Writes `(name, dims, bytes)` tensors to `path` through a `.partial` file and a
/// rename, so an interrupted write never leaves a file that looks cached.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    bf16: bool,
) -> Result<()> {
    let dtype = if bf16 {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, d.clone(), b)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, None, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The "mixed" workload: deterministic in the seed.
pub fn mixed_workload(n: usize, seed: u64, min_len: usize, max_len: usize) -> Vec<Vec<u32>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let (lo, hi) = ((min_len as f64).ln(), (max_len as f64).ln());
    (0..n)
        .map(|_| {
            let len = (lo + uniform() * (hi - lo)).exp().round() as usize;
            (0..len.clamp(min_len, max_len))
                .map(|_| 1000 + (uniform() * 29000.0) as u32)
                .collect()
        })
        .collect()
}

pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let shape = shape(&args.shape)?;
    let device = DeviceArg::parse(&args.device).context("bad --device")?;
    let dtype = DTypeArg::parse(&args.dtype).context("bad --dtype")?;
    let on_gpu = match device {
        DeviceArg::Cpu => false,
        DeviceArg::Cuda(_) => true,
        DeviceArg::Auto => verdict_engine::engine::cuda_available(),
    };
    let bf16_storage = matches!(dtype, DTypeArg::BFloat16 | DTypeArg::Float16)
        || (dtype == DTypeArg::Auto && on_gpu);
    let cache = args.cache_dir.clone().unwrap_or_else(|| {
        crate::args::default_model_dir()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
            .join("bench")
    });
    let dir = cache.join(format!(
        "{}-{}",
        shape.name,
        if bf16_storage { "bf16" } else { "f32" }
    ));
    let t0 = Instant::now();
    ensure_checkpoint(&dir, &shape, bf16_storage)?;
    let prepare_s = t0.elapsed().as_secs_f64();

    let mut engine_args = EngineArgs::new(dir.to_string_lossy());
    engine_args.device = device;
    engine_args.dtype = dtype;
    engine_args.max_model_len = Some(args.max_len.max(512));
    engine_args.max_num_batched_tokens = args.max_num_batched_tokens;
    engine_args.max_num_seqs = Some(args.max_num_seqs);
    engine_args.served_model_name = vec![shape.name.to_string()];
    if args.lora_adapters > 0 {
        engine_args.enable_lora = true;
        engine_args.lora_limits = LoraLimits {
            max_loras: args.lora_adapters,
            max_rank: args.lora_rank,
        };
        for i in 0..args.lora_adapters {
            let adapter = cache.join(format!(
                "{}-lora-r{}-{i}",
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                args.lora_rank
            ));
            ensure_adapter(&adapter, &shape, args.lora_rank, i as u64, bf16_storage)?;
            engine_args.lora_modules.push(LoraModuleArg {
                name: format!("adapter-{i}"),
                path: adapter,
            });
        }
    }
    let t1 = Instant::now();
    let engine = Arc::new(Engine::new(&engine_args)?);
    let load_s = t1.elapsed().as_secs_f64();

    let workload = mixed_workload(args.num_prompts, args.seed, args.min_len, args.max_len);
    let total_tokens: usize = workload.iter().map(Vec::len).sum();
    let adapters: Vec<LoraRef> = match engine.lora() {
        Some(registry) => (0..args.lora_adapters)
            .filter_map(|i| registry.get(&format!("adapter-{i}")).map(LoraRef))
            .collect(),
        None => Vec::new(),
    };
    // With adapters, base and adapter runs alternate so both see the same machine.
    let mut runs = Vec::new();
    let mut lora_runs = Vec::new();
    for _ in 0..args.repeat.max(1) {
        runs.push(run_offline(&engine, &workload, &[])?);
        if !adapters.is_empty() {
            lora_runs.push(run_offline(&engine, &workload, &adapters)?);
        }
    }
    let best = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let first = runs[0];
    let info = engine.info().clone();
    let mut report = BTreeMap::new();
    report.insert("shape", json!(shape.name));
    report.insert("device", json!(info.device));
    report.insert("dtype", json!(format!("{:?}", info.dtype).to_lowercase()));
    report.insert("prompts", json!(args.num_prompts));
    report.insert("tokens", json!(total_tokens));
    report.insert("seconds", json!(runs));
    report.insert("tokens_per_s", json!(total_tokens as f64 / first));
    report.insert("requests_per_s", json!(args.num_prompts as f64 / first));
    report.insert("best_tokens_per_s", json!(total_tokens as f64 / best));
    report.insert("peak_rss_mb", json!(peak_rss_mb()));
    report.insert("load_s", json!(load_s));
    report.insert("prepare_s", json!(prepare_s));
    report.insert("max_num_batched_tokens", json!(info.max_num_batched_tokens));
    if !args.json {
        println!(
            "verdict bench  shape={} device={} dtype={} prompts={} tokens={}",
            shape.name,
            info.device,
            report["dtype"].as_str().unwrap_or(""),
            args.num_prompts,
            total_tokens
        );
        for (i, s) in runs.iter().enumerate() {
            println!(
                "  offline run {}: {:.3} s  {:.0} tokens/s  {:.1} requests/s",
                i + 1,
                s,
                total_tokens as f64 / s,
                args.num_prompts as f64 / s
            );
        }
        println!(
            "  best {:.0} tokens/s; peak RSS {:.0} MB; model load {:.2} s (budget {} tokens/batch)",
            total_tokens as f64 / best,
            peak_rss_mb().unwrap_or(f64::NAN),
            load_s,
            info.max_num_batched_tokens
        );
    }
    if !adapters.is_empty() {
        let layers = adapters[0].info().adapted_layers;
        let lora_best = lora_runs.iter().copied().fold(f64::INFINITY, f64::min);
        let ratio = best / lora_best;
        report.insert("lora_adapters", json!(adapters.len()));
        report.insert("lora_rank", json!(args.lora_rank));
        report.insert("lora_seconds", json!(lora_runs));
        report.insert(
            "lora_best_tokens_per_s",
            json!(total_tokens as f64 / lora_best),
        );
        report.insert("lora_ratio_to_base", json!(ratio));
        if !args.json {
            println!(
                "  {} LoRA adapters (rank {}, {} layers each) mixed in each batch: best {:.0} tokens/s, {:.1}% of the base model's {:.0}",
                adapters.len(),
                args.lora_rank,
                layers,
                total_tokens as f64 / lora_best,
                100.0 * ratio,
                total_tokens as f64 / best
            );
        }
    }
    if !args.server_concurrency.is_empty() {
        let levels = run_server_levels(
            engine.clone(),
            &workload,
            &args.server_concurrency,
            args.json,
        )?;
        let best_offline = total_tokens as f64 / best;
        if !args.json {
            for l in &levels {
                println!(
                    "  http c={:<4} {:.0} tokens/s ({:.0}% of offline)  {:.1} requests/s  p50 {:.1} ms  p99 {:.1} ms",
                    l.concurrency,
                    l.tokens_per_s,
                    100.0 * l.tokens_per_s / best_offline,
                    l.requests_per_s,
                    l.p50_ms,
                    l.p99_ms
                );
            }
        }
        report.insert("server", json!(levels.iter().map(|l| json!({
            "concurrency": l.concurrency, "tokens_per_s": l.tokens_per_s, "requests_per_s": l.requests_per_s,
            "p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "ratio_to_offline": l.tokens_per_s / best_offline,
        })).collect::<Vec<_>>()));
        let short = run_short_latency(engine.clone())?;
        if !args.json {
            println!(
                "  single 16-token request: model {:.2} ms, over HTTP p50 {:.2} ms (+{:.2} ms)",
                short.0,
                short.1,
                short.1 - short.0
            );
        }
        report.insert("short_request_model_ms", json!(short.0));
        report.insert("short_request_http_p50_ms", json!(short.1));
    }
    report.insert("peak_rss_mb", json!(peak_rss_mb()));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// The whole workload through the engine: prompts are validated and queued
/// as the server would, and the clock stops when the last result is back.
/// With `adapters`, prompt i runs through adapter i mod their number.
fn run_offline(engine: &Engine, workload: &[Vec<u32>], adapters: &[LoraRef]) -> Result<f64> {
    let start = Instant::now();
    let tok = TokenizeOptions::default();
    let mut inputs = Vec::with_capacity(workload.len());
    for ids in workload {
        let p = engine
            .processor()
            .process(&Prompt::from(ids.clone()), &tok)?;
        let lora = (!adapters.is_empty()).then(|| adapters[inputs.len() % adapters.len()].clone());
        inputs.push(SequenceInput::new(p, true).with_lora(lora));
    }
    let results = engine.run_blocking(inputs, &|_| {});
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = results.into_iter().find_map(Result::err) {
        bail!("a benchmark prompt failed: {e}");
    }
    Ok(secs)
}

struct Level {
    concurrency: usize,
    tokens_per_s: f64,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The server on a free loopback port, and its /classify URL.
async fn spawn_loopback(engine: Arc<Engine>) -> Result<(verdict_server::RunningServer, String)> {
    let config = ServerConfig {
        host: "127.0.0.1".into(),
        port: 0,
        ..ServerConfig::default()
    };
    let server = verdict_server::spawn(engine, config).await?;
    let url = format!("http://{}/classify", server.addr);
    Ok((server, url))
}

/// Serves the engine on loopback and drives /classify with `c` concurrent clients.
fn run_server_levels(
    engine: Arc<Engine>,
    workload: &[Vec<u32>],
    levels: &[usize],
    quiet: bool,
) -> Result<Vec<Level>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (server, url) = spawn_loopback(engine).await?;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()?;
        let total_tokens: usize = workload.iter().map(Vec::len).sum();
        let bodies: Arc<Vec<String>> = Arc::new(
            workload
                .iter()
                .map(|ids| json!({"input": ids}).to_string())
                .collect(),
        );
        let mut out = Vec::new();
        for &c in levels {
            let c = c.max(1);
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..c {
                let (client, url, bodies, next) =
                    (client.clone(), url.clone(), bodies.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= bodies.len() {
                            return Ok::<_, anyhow::Error>(lat);
                        }
                        let t = Instant::now();
                        let resp = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(bodies[i].clone())
                            .send()
                            .await?;
                        let status = resp.status();
                        let _ = resp.bytes().await?;
                        if !status.is_success() {
                            bail!("request {i} failed with {status}");
                        }
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await??);
            }
            let secs = start.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            if !quiet {
                eprintln!("  (http c={c} done in {secs:.2} s)");
            }
            out.push(Level {
                concurrency: c,
                tokens_per_s: total_tokens as f64 / secs,
                requests_per_s: bodies.len() as f64 / secs,
                p50_ms: percentile(&lat, 0.5),
                p99_ms: percentile(&lat, 0.99),
            });
        }
        server.shutdown().await?;
        Ok(out)
    })
}

/// A 16-token request: the engine's own time for it, and its p50 over HTTP.
fn run_short_latency(engine: Arc<Engine>) -> Result<(f64, f64)> {
    let ids: Vec<u32> = (1000..1016).collect();
    let mut model = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let r = engine.run_blocking(vec![SequenceInput::new(ids.clone().into(), true)], &|_| {});
        if let Some(Err(e)) = r.into_iter().next() {
            bail!("short request failed: {e}");
        }
        model.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    model.sort_by(f64::total_cmp);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let http = runtime.block_on(async move {
        let (server, url) = spawn_loopback(engine).await?;
        let client = reqwest::Client::new();
        let body = json!({"input": ids}).to_string();
        let mut lat = Vec::new();
        for _ in 0..60 {
            let t = Instant::now();
            let resp = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?;
            let _ = resp.bytes().await?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        server.shutdown().await?;
        lat.drain(..10);
        lat.sort_by(f64::total_cmp);
        Ok::<_, anyhow::Error>(percentile(&lat, 0.5))
    })?;
    Ok((percentile(&model, 0.5), http))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape's checkpoint, shrunk to a few hidden units, loads and classifies:
    /// a weight the writer forgets fails here, not on the GPU machine.
    #[test]
    fn every_shape_loads_and_runs() {
        let names = [
            "minilm-l6",
            "bert-base",
            "deberta-v3-base",
            "modernbert-base",
            "qwen2.5-0.5b",
            "qwen2.5-1.5b",
            "qwen2.5-7b",
            "gemma2-2b",
        ];
        let root =
            std::env::temp_dir().join(format!("verdict-bench-shapes-{}", std::process::id()));
        for name in names {
            let mut shape = shape(name).unwrap();
            let config = shape.config.as_object_mut().unwrap();
            for (key, small) in [
                ("num_hidden_layers", 2),
                ("num_attention_heads", 2),
                ("hidden_size", 16),
                ("intermediate_size", 24),
                ("vocab_size", 64),
            ] {
                config.insert(key.into(), small.into());
            }
            for (key, small) in [("num_key_value_heads", 1), ("head_dim", 8)] {
                if config.contains_key(key) {
                    config.insert(key.into(), small.into());
                }
            }
            let dir = root.join(name);
            ensure_checkpoint(&dir, &shape, false).unwrap();
            let mut args = EngineArgs::new(dir.to_string_lossy());
            args.device = DeviceArg::Cpu;
            let engine = Engine::new(&args).unwrap_or_else(|e| panic!("{name}: {e}"));
            let prompts = [vec![1u32, 5, 9, 13, 2], vec![3, 4]];
            run_offline(&engine, &prompts, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn workload_is_deterministic_and_in_range() {
        let a = mixed_workload(200, 0, 16, 512);
        assert_eq!(a, mixed_workload(200, 0, 16, 512));
        assert_ne!(a, mixed_workload(200, 1, 16, 512));
        assert!(a.iter().all(|p| (16..=512).contains(&p.len())));
        assert!(a.iter().flatten().all(|&t| (1000..30000).contains(&t)));
        // log-uniform: about half the prompts under the geometric mean (~90 tokens)
        let short = a.iter().filter(|p| p.len() < 91).count();
        assert!((70..130).contains(&short), "{short}");
    }
}
