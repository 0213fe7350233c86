//! The Llama family of decoders (Llama, Mistral, Qwen2, Qwen3) in one
//! implementation; the differences are config switches.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, WeightPath, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{
    gated_mlp, in_row_chunks, packed_attention, AttentionMask, HiddenAct, Linear, QkvProjection,
    RmsNorm, RotaryEmbedding,
};

const BASES: &[&str] = &["model.", "transformer.", ""];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderVariant {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl DecoderVariant {
    pub fn from_arch(base: &str) -> Option<Self> {
        match base {
            "Llama" => Some(DecoderVariant::Llama),
            "Mistral" => Some(DecoderVariant::Mistral),
            "Qwen2" => Some(DecoderVariant::Qwen2),
            "Qwen3" => Some(DecoderVariant::Qwen3),
            _ => None,
        }
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
    post_norm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    window: Option<usize>,
}

pub struct DecoderModel {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rotary: RotaryEmbedding,
    act: HiddenAct,
    head_dim: usize,
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
        let cfg: DecoderConfig = config.parse("decoder")?;
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
        let qk_norm = variant == DecoderVariant::Qwen3;
        // Qwen2 only slides when use_sliding_window is set, and only from max_window_layers on.
        let window_for = |layer: usize| -> Option<usize> {
            let w = cfg.sliding_window?;
            if let Some(kind) = cfg.layer_types.as_ref().and_then(|t| t.get(layer)) {
                return (kind == "sliding_attention").then_some(w);
            }
            match variant {
                DecoderVariant::Mistral => Some(w),
                DecoderVariant::Qwen2 | DecoderVariant::Qwen3 => {
                    let on = cfg.use_sliding_window.unwrap_or(false)
                        && layer >= cfg.max_window_layers.unwrap_or(0);
                    on.then_some(w)
                }
                DecoderVariant::Llama => None,
            }
        };
        let h = cfg.hidden_size;
        let root = weights.root(bases);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = root.pp("layers").pp(i);
            layers.push(load_layer(
                &l,
                &cfg,
                heads,
                kv_heads,
                head_dim,
                qkv_bias,
                qk_norm,
                window_for(i),
            )?);
        }
        Ok(DecoderModel {
            embed_tokens: root
                .pp("embed_tokens")
                .get("weight", &[cfg.vocab_size, h])?,
            norm: RmsNorm::load(&root.pp("norm"), h, cfg.rms_norm_eps)?,
            rotary: RotaryEmbedding::from_config(config, head_dim)?,
            act: HiddenAct::from_name(&cfg.hidden_act)?,
            layers,
            head_dim,
            device: weights.device().clone(),
            dtype: weights.dtype(),
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

    pub fn rotary(&self) -> &RotaryEmbedding {
        &self.rotary
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings `[T, H]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(self.embed_tokens.embedding(&ids)?)
    }

    /// The decoder layers and final norm over given input embeddings, with
    /// rotary tables `[T, head_dim/2]` for each token.
    pub fn forward_embeds(
        &self,
        mut x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cu_seqlens: &[usize],
    ) -> Result<Tensor> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
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
            let (q, k, v) = layer.qkv.forward(&normed, qk_norm, cos, sin)?;
            let mask = AttentionMask::Causal {
                window: layer.window,
            };
            let ctx = packed_attention(&q, &k, &v, cu_seqlens, mask, scale)?;
            let (sum, normed) = layer
                .post_norm
                .forward_residual(&x, &layer.o_proj.forward(&ctx)?)?;
            x = sum;
            pending = Some(in_row_chunks(&normed, |rows| {
                let gated = gated_mlp(&layer.gate_proj, &layer.up_proj, rows, self.act)?;
                layer.down_proj.forward(&gated)
            })?);
        }
        match pending {
            Some(mlp) => Ok(self.norm.forward_residual(&x, &mlp)?.1),
            None => self.norm.forward(&x),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn load_layer(
    l: &WeightPath,
    cfg: &DecoderConfig,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    qkv_bias: bool,
    qk_norm: bool,
    window: Option<usize>,
) -> Result<Layer> {
    let h = cfg.hidden_size;
    let att = l.pp("self_attn");
    let mlp = l.pp("mlp");
    let norm = |name: &str| RmsNorm::load(&att.pp(name), head_dim, cfg.rms_norm_eps);
    Ok(Layer {
        input_norm: RmsNorm::load(&l.pp("input_layernorm"), h, cfg.rms_norm_eps)?,
        qkv: QkvProjection::load(&att, h, heads, kv_heads, head_dim, qkv_bias)?,
        o_proj: Linear::load(
            &att.pp("o_proj"),
            heads * head_dim,
            h,
            cfg.attention_bias.unwrap_or(false),
        )?,
        q_norm: if qk_norm { Some(norm("q_norm")?) } else { None },
        k_norm: if qk_norm { Some(norm("k_norm")?) } else { None },
        post_norm: RmsNorm::load(&l.pp("post_attention_layernorm"), h, cfg.rms_norm_eps)?,
        gate_proj: Linear::load(&mlp.pp("gate_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
        up_proj: Linear::load(&mlp.pp("up_proj"), h, cfg.intermediate_size, cfg.mlp_bias)?,
        down_proj: Linear::load(&mlp.pp("down_proj"), cfg.intermediate_size, h, cfg.mlp_bias)?,
        window,
    })
}

impl Backbone for DecoderModel {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let (cos, sin) = self
            .rotary
            .cos_sin(&batch.positions, self.dtype, &self.device)?;
        let x = self.embed(&batch.input_ids)?;
        self.forward_embeds(x, &cos, &sin, &batch.cu_seqlens)
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
