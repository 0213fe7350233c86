//! ModernBERT: a pre-norm encoder with rotary positions, a fused `Wqkv`, a GeGLU
//! MLP, and global attention every `global_attn_every_n_layers` layers with local
//! (sliding-window) attention in between, each kind with its own rotary base.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, WeightPath, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{
    gated_mlp, in_row_chunks, packed_attention, AttentionMask, HiddenAct, LayerNorm, Linear,
    QkvProjection, RotaryEmbedding,
};
use crate::pooling::{ClassifierHead, PoolingType};

const BASES: &[&str] = &["model.", ""];

#[derive(Debug, Deserialize)]
struct ModernBertConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "default_act")]
    hidden_activation: String,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    norm_eps: f64,
    #[serde(default)]
    norm_bias: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    classifier_bias: bool,
    #[serde(default = "default_act")]
    classifier_activation: String,
    #[serde(default = "default_pooling")]
    classifier_pooling: String,
    #[serde(default = "default_local_attention")]
    local_attention: usize,
    #[serde(default = "default_global_every")]
    global_attn_every_n_layers: usize,
    /// transformers v4 names of the two rotary bases.
    #[serde(default)]
    global_rope_theta: Option<f64>,
    #[serde(default)]
    local_rope_theta: Option<f64>,
    /// transformers v5: "full_attention" / "sliding_attention" per layer.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-5
}
fn default_pooling() -> String {
    "cls".into()
}
fn default_local_attention() -> usize {
    128
}
fn default_global_every() -> usize {
    3
}

const GLOBAL: &str = "full_attention";
const LOCAL: &str = "sliding_attention";

impl ModernBertConfig {
    /// The rotary base of one layer kind: the v4 key, else v5's `rope_parameters`.
    fn rope_theta(&self, config: &HfConfig, kind: &str) -> Result<f32> {
        let (v4, default): (_, f64) = match kind {
            GLOBAL => (self.global_rope_theta, 160_000.0),
            _ => (self.local_rope_theta, 10_000.0),
        };
        if let Some(theta) = v4 {
            return Ok(theta as f32);
        }
        let Some(params) = config
            .get("rope_parameters")
            .and_then(|p| p.get(kind))
            .filter(|p| !p.is_null())
        else {
            return Ok(default as f32);
        };
        let rope_type = params
            .get("rope_type")
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(EngineError::Config(format!(
                "ModernBERT rope_type `{rope_type}` is not supported (only default)"
            )));
        }
        Ok(params
            .get("rope_theta")
            .and_then(|t| t.as_f64())
            .unwrap_or(default) as f32)
    }

    /// Local layers attend within this distance: transformers' window mask is
    /// |i - j| <= local_attention / 2 (flash-attention's window is the same).
    fn local_radius(&self) -> usize {
        self.local_attention / 2
    }

    /// Whether layer i attends globally: `layer_types` when the config lists them
    /// (transformers v5), else every `global_attn_every_n_layers`-th layer from 0.
    fn is_global(&self, layer: usize) -> bool {
        match self.layer_types.as_ref().and_then(|t| t.get(layer)) {
            Some(kind) => kind != LOCAL,
            None => layer.is_multiple_of(self.global_attn_every_n_layers),
        }
    }
}

struct Layer {
    /// None for layer 0, whose input is the already-normed embeddings.
    attn_norm: Option<LayerNorm>,
    qkv: QkvProjection,
    attn_out: Linear,
    mlp_norm: LayerNorm,
    /// The first half of `Wi`, through the activation.
    mlp_input: Linear,
    /// The second half of `Wi`, multiplying it.
    mlp_gate: Linear,
    mlp_out: Linear,
    mask: AttentionMask,
    /// Global layers read the global rotary base, local ones the local base.
    global: bool,
}

pub struct ModernBertModel {
    tok_embeddings: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    global_rotary: RotaryEmbedding,
    local_rotary: RotaryEmbedding,
    act: HiddenAct,
    head_dim: usize,
    cfg: ModernBertConfig,
    device: Device,
    dtype: DType,
}

impl ModernBertModel {
    pub fn load(config: &HfConfig, weights: &Weights) -> Result<Self> {
        let cfg: ModernBertConfig = config.parse("ModernBERT")?;
        let heads = cfg.num_attention_heads;
        if heads == 0 || !cfg.hidden_size.is_multiple_of(heads) {
            return Err(EngineError::Config(format!(
                "hidden_size {} is not divisible by num_attention_heads {heads}",
                cfg.hidden_size
            )));
        }
        if cfg.global_attn_every_n_layers == 0 {
            return Err(EngineError::Config(
                "global_attn_every_n_layers must be positive".into(),
            ));
        }
        let head_dim = cfg.hidden_size / heads;
        if !head_dim.is_multiple_of(2) {
            return Err(EngineError::Config(format!(
                "ModernBERT head dim {head_dim} must be even for rotary embeddings"
            )));
        }
        let (h, dtype) = (cfg.hidden_size, weights.dtype());
        let norm = |wp: &WeightPath| LayerNorm::load_as(wp, h, cfg.norm_eps, cfg.norm_bias, dtype);
        let root = weights.root(BASES);
        let emb = root.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = root.pp("layers").pp(i);
            let inter = cfg.intermediate_size;
            // `input, gate = Wi(x).chunk(2)`: act(input) * gate.
            let wi = l.pp("mlp.Wi");
            let wi_weight = wi.get("weight", &[2 * inter, h])?;
            let wi_bias = if cfg.mlp_bias {
                Some(wi.get("bias", &[2 * inter])?)
            } else {
                None
            };
            let half = |k: usize| -> Result<Linear> {
                let rows = k * inter..(k + 1) * inter;
                let bias = wi_bias
                    .as_ref()
                    .map(|b| b.narrow(0, rows.start, inter))
                    .transpose()?;
                let lora = wi.lora_target_rows(h, rows.clone());
                Ok(Linear::new(wi_weight.narrow(0, rows.start, inter)?, bias).with_lora(lora))
            };
            layers.push(Layer {
                attn_norm: if i == 0 {
                    None
                } else {
                    Some(norm(&l.pp("attn_norm"))?)
                },
                qkv: QkvProjection::load_fused(
                    &l.pp("attn.Wqkv"),
                    h,
                    heads,
                    heads,
                    head_dim,
                    cfg.attention_bias,
                )?,
                attn_out: Linear::load(&l.pp("attn.Wo"), h, h, cfg.attention_bias)?,
                mlp_norm: norm(&l.pp("mlp_norm"))?,
                mlp_input: half(0)?,
                mlp_gate: half(1)?,
                mlp_out: Linear::load(&l.pp("mlp.Wo"), inter, h, cfg.mlp_bias)?,
                mask: if cfg.is_global(i) {
                    AttentionMask::Bidirectional
                } else {
                    AttentionMask::Local {
                        radius: cfg.local_radius(),
                    }
                },
                global: cfg.is_global(i),
            });
        }
        Ok(ModernBertModel {
            tok_embeddings: emb
                .pp("tok_embeddings")
                .get("weight", &[cfg.vocab_size, h])?,
            emb_norm: norm(&emb.pp("norm"))?,
            layers,
            final_norm: norm(&root.pp("final_norm"))?,
            global_rotary: RotaryEmbedding::with_base(cfg.rope_theta(config, GLOBAL)?, head_dim),
            local_rotary: RotaryEmbedding::with_base(cfg.rope_theta(config, LOCAL)?, head_dim),
            act: HiddenAct::from_name(&cfg.hidden_activation)?,
            head_dim,
            device: weights.device().clone(),
            dtype,
            cfg,
        })
    }

    /// The sequence pooling of the checkpoint's head (`classifier_pooling`).
    pub fn pooling(&self) -> Result<PoolingType> {
        match self.cfg.classifier_pooling.as_str() {
            "cls" => Ok(PoolingType::Cls),
            "mean" => Ok(PoolingType::Mean),
            other => Err(EngineError::Config(format!(
                "classifier_pooling `{other}` is not supported (expected cls or mean)"
            ))),
        }
    }
}

impl Backbone for ModernBertModel {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let t = batch.input_ids.len();
        let ids = Tensor::from_slice(&batch.input_ids, t, &self.device)?;
        let mut x = self
            .emb_norm
            .forward(&self.tok_embeddings.embedding(&ids)?)?;
        let tables =
            |rotary: &RotaryEmbedding| rotary.cos_sin(&batch.positions, self.dtype, &self.device);
        let (global_cos, global_sin) = tables(&self.global_rotary)?;
        let (local_cos, local_sin) = tables(&self.local_rotary)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // The MLP output not yet added to `x`: the add is fused into the next norm.
        let mut pending: Option<Tensor> = None;
        for layer in &self.layers {
            let (cos, sin) = if layer.global {
                (&global_cos, &global_sin)
            } else {
                (&local_cos, &local_sin)
            };
            let normed = match (&layer.attn_norm, pending.take()) {
                (Some(norm), Some(delta)) => {
                    let (sum, normed) = norm.forward_residual(&x, &delta)?;
                    x = sum;
                    normed
                }
                (Some(norm), None) => norm.forward(&x)?,
                (None, Some(delta)) => {
                    x = (&x + delta)?;
                    x.clone()
                }
                (None, None) => x.clone(),
            };
            let (q, k, v) = layer.qkv.forward(&normed, None, cos, sin)?;
            let ctx = packed_attention(&q, &k, &v, &batch.cu_seqlens, layer.mask, scale)?;
            let (sum, mlp_in) = layer
                .mlp_norm
                .forward_residual(&x, &layer.attn_out.forward(&ctx)?)?;
            x = sum;
            pending = Some(in_row_chunks(&mlp_in, |rows| {
                let gated = gated_mlp(&layer.mlp_input, &layer.mlp_gate, rows, self.act)?;
                layer.mlp_out.forward(&gated)
            })?);
        }
        match pending {
            Some(delta) => self.final_norm.forward_add(&x, &delta),
            None => self.final_norm.forward(&x),
        }
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// No absolute positions; the context length is the configured one (as vLLM).
    fn max_positions(&self) -> Option<usize> {
        Some(self.cfg.max_position_embeddings)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// `classifier(norm(act(head.dense(x))))`, on the pooled row of a sequence
/// classifier and on every token of a token classifier.
pub fn load_head(
    config: &HfConfig,
    weights: &Weights,
    num_labels: usize,
) -> Result<ClassifierHead> {
    let cfg: ModernBertConfig = config.parse("ModernBERT")?;
    let h = cfg.hidden_size;
    let top = weights.root(&[""]);
    let dense = Linear::load_as(&top.pp("head.dense"), h, h, cfg.classifier_bias, DType::F32)?;
    let norm = LayerNorm::load_as(
        &top.pp("head.norm"),
        h,
        cfg.norm_eps,
        cfg.norm_bias,
        DType::F32,
    )?;
    let classifier = Linear::load_as(&top.pp("classifier"), h, num_labels, true, DType::F32)?;
    Ok(ClassifierHead::prediction(
        dense,
        HiddenAct::from_name(&cfg.classifier_activation)?,
        norm,
        classifier,
    ))
}
