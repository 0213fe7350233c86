//! The Llama family of decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3,
//! Phi-3, Granite) in one implementation; the differences are config switches.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, WeightPath, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{
    gated_mlp, in_row_chunks, packed_attention_capped, AttentionMask, HiddenAct, Linear,
    QkvProjection, RmsNorm, RotaryEmbedding,
};

const BASES: &[&str] = &["model.", "transformer.", ""];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderVariant {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// `(1 + w)` fp32 norms, embeddings times `sqrt(hidden)`, GeGLU-tanh MLP.
    Gemma,
    /// Gemma plus four norms per layer, `query_pre_attn_scalar`, attention and
    /// final-logit soft-capping, every other layer sliding.
    Gemma2,
    /// Gemma-2 plus q/k norms, a sliding pattern and a local rotary base.
    Gemma3,
    /// Fused `qkv_proj` and `gate_up_proj`, LongRoPE.
    Phi3,
    /// Embedding, residual, attention and logit multipliers.
    Granite,
}

impl DecoderVariant {
    pub fn from_arch(base: &str) -> Option<Self> {
        match base {
            "Llama" => Some(DecoderVariant::Llama),
            "Mistral" => Some(DecoderVariant::Mistral),
            "Qwen2" => Some(DecoderVariant::Qwen2),
            "Qwen3" => Some(DecoderVariant::Qwen3),
            "Gemma" => Some(DecoderVariant::Gemma),
            "Gemma2" => Some(DecoderVariant::Gemma2),
            "Gemma3" | "Gemma3Text" => Some(DecoderVariant::Gemma3),
            "Phi3" => Some(DecoderVariant::Phi3),
            "Granite" => Some(DecoderVariant::Granite),
            _ => None,
        }
    }

    fn is_gemma(self) -> bool {
        matches!(
            self,
            DecoderVariant::Gemma | DecoderVariant::Gemma2 | DecoderVariant::Gemma3
        )
    }

    /// Fills what transformers' config class defaults when config.json leaves a key
    /// out (an explicit `null` stays off), and refuses what this decoder does not run.
    fn apply_defaults(self, cfg: &mut DecoderConfig, config: &HfConfig) -> Result<()> {
        let or_default = |key: &str, current: Option<f64>, default: f64| match config.raw().get(key)
        {
            None => Some(default),
            Some(_) => current,
        };
        match self {
            DecoderVariant::Gemma2 | DecoderVariant::Gemma3 => {
                if config.bool("use_bidirectional_attention") == Some(true) {
                    return Err(EngineError::Config(
                        "use_bidirectional_attention (an embedding model's Gemma) is not supported"
                            .into(),
                    ));
                }
                cfg.query_pre_attn_scalar =
                    or_default("query_pre_attn_scalar", cfg.query_pre_attn_scalar, 256.0);
                let window = cfg.sliding_window.map(|w| w as f64);
                cfg.sliding_window =
                    or_default("sliding_window", window, 4096.0).map(|w| w as usize);
                if self == DecoderVariant::Gemma2 {
                    cfg.attn_logit_softcapping =
                        or_default("attn_logit_softcapping", cfg.attn_logit_softcapping, 50.0);
                    cfg.final_logit_softcapping =
                        or_default("final_logit_softcapping", cfg.final_logit_softcapping, 30.0);
                }
            }
            DecoderVariant::Granite => {
                // transformers' GraniteConfig defaults every multiplier to 1.
                cfg.embedding_multiplier.get_or_insert(1.0);
                cfg.residual_multiplier.get_or_insert(1.0);
                cfg.attention_multiplier.get_or_insert(1.0);
                cfg.logits_scaling.get_or_insert(1.0);
            }
            _ => {}
        }
        Ok(())
    }

    /// Gemma-2/3 normalise the attention and MLP outputs before the residual adds.
    fn has_sandwich_norms(self) -> bool {
        matches!(self, DecoderVariant::Gemma2 | DecoderVariant::Gemma3)
    }
}

#[derive(Debug, Deserialize)]
struct DecoderConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    max_window_layers: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    /// transformers v5: "full_attention" / "sliding_attention" per layer.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    /// Gemma's name for `hidden_act`.
    #[serde(default)]
    hidden_activation: Option<String>,
    /// Gemma-2/3: the attention scale is `query_pre_attn_scalar^-0.5`.
    #[serde(default)]
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    /// Gemma-3 before `layer_types`: every `n`-th layer is global, the rest slide.
    #[serde(default)]
    sliding_window_pattern: Option<usize>,
    /// Granite's multipliers.
    #[serde(default)]
    embedding_multiplier: Option<f64>,
    #[serde(default)]
    residual_multiplier: Option<f64>,
    #[serde(default)]
    attention_multiplier: Option<f64>,
    #[serde(default)]
    logits_scaling: Option<f64>,
}

/// What the LM head's logits go through in transformers' `*ForCausalLM`, which
/// `classifier_from_token` reads: Granite divides them by `logits_scaling`,
/// Gemma-2 soft-caps them to `cap * tanh(l / cap)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LmLogits {
    pub divide_by: Option<f64>,
    pub softcap: Option<f64>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

struct Layer {
    input_norm: RmsNorm,
    qkv: QkvProjection,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Gemma-2/3's `post_attention_layernorm`, on the attention output.
    attn_out_norm: Option<RmsNorm>,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma-2's
    /// `pre_feedforward_layernorm`).
    mlp_norm: RmsNorm,
    /// Gemma-2/3's `post_feedforward_layernorm`, on the MLP output.
    mlp_out_norm: Option<RmsNorm>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    window: Option<usize>,
}

pub struct DecoderModel {
    embed_tokens: Tensor,
    /// Multiplies the token embeddings: Gemma's `sqrt(hidden)` rounded to the
    /// activation dtype, Granite's `embedding_multiplier`.
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rotary: RotaryEmbedding,
    /// Gemma-3's rotary for the sliding layers (its own base).
    local_rotary: Option<RotaryEmbedding>,
    act: HiddenAct,
    attn_scale: f64,
    attn_softcap: Option<f64>,
    /// Granite scales each attention and MLP output before its residual add.
    residual_multiplier: Option<f64>,
    variant: DecoderVariant,
    cfg: DecoderConfig,
    device: Device,
    dtype: DType,
}

impl DecoderModel {
    pub fn load(variant: DecoderVariant, config: &HfConfig, weights: &Weights) -> Result<Self> {
        Self::load_under(variant, config, weights, BASES)
    }

    /// Loads with the weights under one of `bases` (e.g. a multimodal
    /// checkpoint's `model.language_model.`).
    pub fn load_under(
        variant: DecoderVariant,
        config: &HfConfig,
        weights: &Weights,
        bases: &[&str],
    ) -> Result<Self> {
        let mut cfg: DecoderConfig = config.parse("decoder")?;
        variant.apply_defaults(&mut cfg, config)?;
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(EngineError::Config(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = match cfg.head_dim {
            Some(d) => d,
            None if cfg.hidden_size.is_multiple_of(heads) => cfg.hidden_size / heads,
            None => {
                return Err(EngineError::Config(format!(
                    "hidden_size {} is not divisible by num_attention_heads {heads}",
                    cfg.hidden_size
                )))
            }
        };
        let qkv_bias = match variant {
            DecoderVariant::Qwen2 => true,
            _ => cfg.attention_bias.unwrap_or(false),
        };
        let qk_norm = matches!(variant, DecoderVariant::Qwen3 | DecoderVariant::Gemma3);
        let pattern = cfg.sliding_window_pattern.unwrap_or(6).max(1);
        // Qwen2 only slides when use_sliding_window is set, and only from max_window_layers on.
        let window_for = |layer: usize| -> Option<usize> {
            let w = cfg.sliding_window?;
            if let Some(kind) = cfg.layer_types.as_ref().and_then(|t| t.get(layer)) {
                return (kind == "sliding_attention").then_some(w);
            }
            match variant {
                DecoderVariant::Mistral | DecoderVariant::Phi3 => Some(w),
                DecoderVariant::Qwen2 | DecoderVariant::Qwen3 => {
                    let on = cfg.use_sliding_window.unwrap_or(false)
                        && layer >= cfg.max_window_layers.unwrap_or(0);
                    on.then_some(w)
                }
                DecoderVariant::Gemma2 => layer.is_multiple_of(2).then_some(w),
                DecoderVariant::Gemma3 => (!(layer + 1).is_multiple_of(pattern)).then_some(w),
                DecoderVariant::Llama | DecoderVariant::Gemma | DecoderVariant::Granite => None,
            }
        };
        let h = cfg.hidden_size;
        let root = weights.root(bases);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = root.pp("layers").pp(i);
            let dims = LayerDims {
                heads,
                kv_heads,
                head_dim,
                qkv_bias,
                qk_norm,
            };
            layers.push(load_layer(&l, &cfg, variant, dims, window_for(i))?);
        }
        let dtype = weights.dtype();
        let embed_scale = if variant.is_gemma() {
            // transformers multiplies by sqrt(hidden) as a tensor of the activation dtype.
            let normalizer = Tensor::new((h as f32).sqrt(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            Some(normalizer)
        } else {
            cfg.embedding_multiplier
                .filter(|_| variant == DecoderVariant::Granite)
        };
        let attn_scale = match (variant, cfg.query_pre_attn_scalar, cfg.attention_multiplier) {
            (DecoderVariant::Granite, _, Some(m)) => m,
            (DecoderVariant::Gemma2 | DecoderVariant::Gemma3, Some(s), _) => s.powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let embed_scale = embed_scale.filter(|&s| s != 1.0);
        let (rotary, local_rotary) = if variant == DecoderVariant::Gemma3 {
            (
                RotaryEmbedding::for_layer_type(config, head_dim, "full_attention")?,
                Some(RotaryEmbedding::for_layer_type(
                    config,
                    head_dim,
                    "sliding_attention",
                )?),
            )
        } else {
            (RotaryEmbedding::from_config(config, head_dim)?, None)
        };
        // Gemma-2/3 read `hidden_activation`; Gemma reads `hidden_act`, its legacy
        // "gelu" meaning the tanh approximation (as transformers maps it).
        let act_name = match variant {
            DecoderVariant::Gemma2 | DecoderVariant::Gemma3 => cfg
                .hidden_activation
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh"),
            DecoderVariant::Gemma => match config.str("hidden_act") {
                None | Some("gelu") => "gelu_pytorch_tanh",
                Some(other) => other,
            },
            _ => cfg.hidden_act.as_str(),
        };
        Ok(DecoderModel {
            embed_tokens: root
                .pp("embed_tokens")
                .get("weight", &[cfg.vocab_size, h])?,
            embed_scale,
            norm: load_norm(variant, &root.pp("norm"), h, cfg.rms_norm_eps)?,
            rotary,
            local_rotary,
            act: HiddenAct::from_name(act_name)?,
            attn_scale,
            // Gemma-3 keeps attn_logit_softcapping in its config but transformers no
            // longer applies it.
            attn_softcap: cfg
                .attn_logit_softcapping
                .filter(|_| variant == DecoderVariant::Gemma2),
            residual_multiplier: cfg
                .residual_multiplier
                .filter(|&m| variant == DecoderVariant::Granite && m != 1.0),
            layers,
            device: weights.device().clone(),
            dtype,
            variant,
            cfg,
        })
    }

    /// The input embedding matrix, for models whose LM head is tied to it.
    pub fn embeddings(&self) -> &Tensor {
        &self.embed_tokens
    }

    pub fn ties_embeddings(&self) -> bool {
        self.cfg.tie_word_embeddings.unwrap_or(false)
    }

    /// How transformers post-processes this model's LM logits.
    pub fn lm_logits(&self) -> LmLogits {
        LmLogits {
            divide_by: self
                .cfg
                .logits_scaling
                .filter(|&s| self.variant == DecoderVariant::Granite && s != 1.0),
            softcap: self
                .cfg
                .final_logit_softcapping
                .filter(|_| self.variant.has_sandwich_norms()),
        }
    }

    pub fn rotary(&self) -> &RotaryEmbedding {
        &self.rotary
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings `[T, H]` (scaled as the family does).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let x = self.embed_tokens.embedding(&ids)?;
        Ok(match self.embed_scale {
            Some(scale) => (x * scale)?,
            None => x,
        })
    }

    /// The decoder layers and final norm over given input embeddings, with
    /// rotary tables `[T, head_dim/2]` for each token.
    pub fn forward_embeds(
        &self,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cu_seqlens: &[usize],
    ) -> Result<Tensor> {
        self.forward_layers(x, (cos, sin), None, cu_seqlens)
    }

    /// `local` holds the sliding layers' rotary tables when they have their own.
    fn forward_layers(
        &self,
        mut x: Tensor,
        global: (&Tensor, &Tensor),
        local: Option<(&Tensor, &Tensor)>,
        cu_seqlens: &[usize],
    ) -> Result<Tensor> {
        let residual = |delta: Tensor| -> Result<Tensor> {
            Ok(match self.residual_multiplier {
                Some(m) => (delta * m)?,
                None => delta,
            })
        };
        // Each residual add is fused with the norm that reads its sum (one pass on CUDA):
        // the MLP's output is added at the next layer's input norm, or the final norm.
        let mut pending: Option<Tensor> = None;
        for layer in &self.layers {
            let normed = match pending.take() {
                Some(mlp) => {
                    let (sum, normed) = layer.input_norm.forward_residual(&x, &mlp)?;
                    x = sum;
                    normed
                }
                None => layer.input_norm.forward(&x)?,
            };
            let qk_norm = layer.q_norm.as_ref().zip(layer.k_norm.as_ref());
            let (cos, sin) = match (layer.window, local) {
                (Some(_), Some(tables)) => tables,
                _ => global,
            };
            let (q, k, v) = layer.qkv.forward(&normed, qk_norm, cos, sin)?;
            let mask = AttentionMask::Causal {
                window: layer.window,
            };
            let ctx = packed_attention_capped(
                &q,
                &k,
                &v,
                cu_seqlens,
                mask,
                self.attn_scale,
                self.attn_softcap,
            )?;
            let mut attn = layer.o_proj.forward(&ctx)?;
            if let Some(norm) = &layer.attn_out_norm {
                attn = norm.forward(&attn)?;
            }
            let (sum, normed) = layer.mlp_norm.forward_residual(&x, &residual(attn)?)?;
            x = sum;
            let mut mlp = in_row_chunks(&normed, |rows| {
                let gated = gated_mlp(&layer.gate_proj, &layer.up_proj, rows, self.act)?;
                layer.down_proj.forward(&gated)
            })?;
            if let Some(norm) = &layer.mlp_out_norm {
                mlp = norm.forward(&mlp)?;
            }
            pending = Some(residual(mlp)?);
        }
        match pending {
            Some(mlp) => Ok(self.norm.forward_residual(&x, &mlp)?.1),
            None => self.norm.forward(&x),
        }
    }
}

/// Gemma's norms scale by `1 + w` in fp32; the others by `w`.
fn load_norm(variant: DecoderVariant, wp: &WeightPath, dim: usize, eps: f64) -> Result<RmsNorm> {
    if variant.is_gemma() {
        RmsNorm::load_unit_offset(wp, dim, eps)
    } else {
        RmsNorm::load(wp, dim, eps)
    }
}

#[derive(Debug, Clone, Copy)]
struct LayerDims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    qkv_bias: bool,
    qk_norm: bool,
}

fn load_layer(
    l: &WeightPath,
    cfg: &DecoderConfig,
    variant: DecoderVariant,
    dims: LayerDims,
    window: Option<usize>,
) -> Result<Layer> {
    let LayerDims {
        heads,
        kv_heads,
        head_dim,
        qkv_bias,
        qk_norm,
    } = dims;
    let h = cfg.hidden_size;
    let inter = cfg.intermediate_size;
    let eps = cfg.rms_norm_eps;
    let att = l.pp("self_attn");
    let mlp = l.pp("mlp");
    let norm = |wp: WeightPath| load_norm(variant, &wp, h, eps);
    let head_norm = |name: &str| load_norm(variant, &att.pp(name), head_dim, eps);
    let sandwich = variant.has_sandwich_norms();
    let (qkv, (gate_proj, up_proj)) = if variant == DecoderVariant::Phi3 {
        (
            QkvProjection::load_fused(&att.pp("qkv_proj"), h, heads, kv_heads, head_dim, qkv_bias)?,
            Linear::load_halves(&mlp.pp("gate_up_proj"), h, inter, cfg.mlp_bias)?,
        )
    } else {
        (
            QkvProjection::load(&att, h, heads, kv_heads, head_dim, qkv_bias)?,
            (
                Linear::load(&mlp.pp("gate_proj"), h, inter, cfg.mlp_bias)?,
                Linear::load(&mlp.pp("up_proj"), h, inter, cfg.mlp_bias)?,
            ),
        )
    };
    Ok(Layer {
        input_norm: norm(l.pp("input_layernorm"))?,
        qkv,
        o_proj: Linear::load(
            &att.pp("o_proj"),
            heads * head_dim,
            h,
            cfg.attention_bias.unwrap_or(false),
        )?,
        q_norm: if qk_norm {
            Some(head_norm("q_norm")?)
        } else {
            None
        },
        k_norm: if qk_norm {
            Some(head_norm("k_norm")?)
        } else {
            None
        },
        attn_out_norm: if sandwich {
            Some(norm(l.pp("post_attention_layernorm"))?)
        } else {
            None
        },
        mlp_norm: if sandwich {
            norm(l.pp("pre_feedforward_layernorm"))?
        } else {
            norm(l.pp("post_attention_layernorm"))?
        },
        mlp_out_norm: if sandwich {
            Some(norm(l.pp("post_feedforward_layernorm"))?)
        } else {
            None
        },
        gate_proj,
        up_proj,
        down_proj: Linear::load(&mlp.pp("down_proj"), inter, h, cfg.mlp_bias)?,
        window,
    })
}

impl Backbone for DecoderModel {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let (cos, sin) = self
            .rotary
            .cos_sin(&batch.positions, self.dtype, &self.device)?;
        let local = match &self.local_rotary {
            Some(rotary) => Some(rotary.cos_sin(&batch.positions, self.dtype, &self.device)?),
            None => None,
        };
        let x = self.embed(&batch.input_ids)?;
        let local = local.as_ref().map(|(c, s)| (c, s));
        self.forward_layers(x, (&cos, &sin), local, &batch.cu_seqlens)
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        self.cfg.max_position_embeddings
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
