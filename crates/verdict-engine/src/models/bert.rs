//! BERT-family post-norm encoders: BERT, RoBERTa, XLM-RoBERTa, ERNIE, DistilBERT and
//! GTE "new". They share one layer loop (self-attention, add & norm, MLP, add & norm)
//! and differ by weight names and switches: DistilBERT has no token types and its own
//! names; GTE rotates q/k with RoPE instead of adding position embeddings, projects
//! q/k/v with one fused matrix and uses a gated MLP.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, WeightPath, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{
    gated_mlp, in_row_chunks, packed_attention, AttentionMask, HiddenAct, LayerNorm, Linear,
    QkvProjection, RotaryEmbedding,
};
use crate::pooling::ClassifierHead;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertVariant {
    Bert,
    /// RoBERTa and XLM-RoBERTa: positions start after `pad_token_id`.
    Roberta,
    /// ERNIE: adds task-type embeddings (row 0) when `use_task_id`.
    Ernie,
    /// DistilBERT: no token types, `distilbert.transformer.layer.N` names,
    /// optionally sinusoidal (fixed) position embeddings.
    DistilBert,
    /// GTE "new" (`NewModel`, remote code): rotary positions, fused `qkv_proj`,
    /// gated MLP `up_gate_proj`.
    GteNew,
}

impl BertVariant {
    /// Weight-name prefixes accepted for the backbone, most specific first.
    fn bases(&self) -> &'static [&'static str] {
        match self {
            BertVariant::Bert => &["bert.", "model.", ""],
            BertVariant::Roberta => &["roberta.", "bert.", "model.", ""],
            BertVariant::Ernie => &["ernie.", "bert.", "model.", ""],
            BertVariant::DistilBert => &["distilbert.", ""],
            BertVariant::GteNew => &["new.", ""],
        }
    }
}

/// `config.json` of BERT, RoBERTa, ERNIE and GTE "new" (same field names).
#[derive(Debug, Deserialize)]
struct BertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    type_vocab_size: Option<usize>,
    #[serde(default)]
    pad_token_id: Option<usize>,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    use_task_id: bool,
    #[serde(default)]
    task_type_vocab_size: Option<usize>,
    /// GTE: `layer_norm` (the only kind its released checkpoints use) or `rms_norm`.
    #[serde(default)]
    layer_norm_type: Option<String>,
    /// GTE: one fused `qkv_proj` (default) or `q_proj`/`k_proj`/`v_proj`.
    #[serde(default = "default_true")]
    pack_qkv: bool,
    /// GTE: scales queries by log(len)/log(max_position_embeddings) per sequence.
    #[serde(default)]
    logn_attention_scale: bool,
}

/// DistilBERT's `config.json`: its own field names, transformers' defaults.
#[derive(Debug, Deserialize)]
struct DistilBertConfig {
    #[serde(default = "distil_vocab")]
    vocab_size: usize,
    #[serde(default = "distil_dim")]
    dim: usize,
    #[serde(default = "distil_layers")]
    n_layers: usize,
    #[serde(default = "distil_heads")]
    n_heads: usize,
    #[serde(default = "distil_hidden_dim")]
    hidden_dim: usize,
    #[serde(default = "default_act")]
    activation: String,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    sinusoidal_pos_embds: bool,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_max_pos() -> usize {
    512
}
fn default_true() -> bool {
    true
}
fn distil_vocab() -> usize {
    30522
}
fn distil_dim() -> usize {
    768
}
fn distil_layers() -> usize {
    6
}
fn distil_heads() -> usize {
    12
}
fn distil_hidden_dim() -> usize {
    3072
}

/// How tokens learn their position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PositionKind {
    /// A learned `position_embeddings` table added to the input.
    Absolute,
    /// DistilBERT's `sinusoidal_pos_embds`: a fixed table, read from the checkpoint
    /// (transformers saves it) or computed when it is absent.
    Sinusoidal,
    /// GTE: q and k rotated (rotate-half RoPE from `rope_theta` / `rope_scaling`).
    Rotary,
}

/// The config of any variant, in the names the layer loop uses.
#[derive(Debug)]
struct EncoderConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    heads: usize,
    intermediate_size: usize,
    act: HiddenAct,
    layer_norm_eps: f64,
    max_position_embeddings: usize,
    /// 0: the model has no token types (DistilBERT).
    type_vocab_size: usize,
    positions: PositionKind,
    pad_token_id: Option<usize>,
    /// ERNIE's task-type table rows when `use_task_id`.
    task_type_rows: Option<usize>,
    /// GTE with `pack_qkv`.
    fused_qkv: bool,
}

impl EncoderConfig {
    fn parse(variant: BertVariant, config: &HfConfig) -> Result<Self> {
        let cfg = match variant {
            BertVariant::DistilBert => {
                let c: DistilBertConfig = config.parse("DistilBERT")?;
                EncoderConfig {
                    vocab_size: c.vocab_size,
                    hidden_size: c.dim,
                    num_layers: c.n_layers,
                    heads: c.n_heads,
                    intermediate_size: c.hidden_dim,
                    act: HiddenAct::from_name(&c.activation)?,
                    // DistilBERT's norms hard-code it; the config has no field.
                    layer_norm_eps: 1e-12,
                    max_position_embeddings: c.max_position_embeddings,
                    type_vocab_size: 0,
                    positions: if c.sinusoidal_pos_embds {
                        PositionKind::Sinusoidal
                    } else {
                        PositionKind::Absolute
                    },
                    pad_token_id: None,
                    task_type_rows: None,
                    fused_qkv: false,
                }
            }
            _ => Self::from_bert(variant, config.parse("BERT-family")?)?,
        };
        if cfg.heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.heads) {
            return Err(EngineError::Config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.heads
            )));
        }
        Ok(cfg)
    }

    fn from_bert(variant: BertVariant, c: BertConfig) -> Result<Self> {
        let gte = variant == BertVariant::GteNew;
        let position_kind = c.position_embedding_type.as_deref();
        let positions = match (gte, position_kind) {
            (false, None | Some("absolute")) => PositionKind::Absolute,
            (true, None | Some("rope")) => PositionKind::Rotary,
            (_, Some(kind)) => {
                let supported = if gte { "rope" } else { "absolute" };
                return Err(EngineError::Config(format!(
                    "position_embedding_type `{kind}` is not supported (only {supported})"
                )));
            }
        };
        if gte {
            if let Some(kind) = c.layer_norm_type.as_deref().filter(|k| *k != "layer_norm") {
                return Err(EngineError::Config(format!(
                    "layer_norm_type `{kind}` is not supported (only layer_norm)"
                )));
            }
            if c.logn_attention_scale {
                return Err(EngineError::Config(
                    "logn_attention_scale is not supported".into(),
                ));
            }
        }
        Ok(EncoderConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            act: HiddenAct::from_name(&c.hidden_act)?,
            layer_norm_eps: c.layer_norm_eps,
            // GTE's NewConfig defaults differ from BertConfig's.
            max_position_embeddings: c.max_position_embeddings.unwrap_or(if gte {
                2048
            } else {
                default_max_pos()
            }),
            type_vocab_size: c.type_vocab_size.unwrap_or(if gte { 1 } else { 2 }),
            positions,
            pad_token_id: c.pad_token_id,
            task_type_rows: (variant == BertVariant::Ernie && c.use_task_id)
                .then(|| c.task_type_vocab_size.unwrap_or(3)),
            fused_qkv: gte && c.pack_qkv,
        })
    }
}

/// How a layer computes q, k and v.
enum QkvKind {
    /// Three projections, positions already in the input (BERT, DistilBERT).
    Separate {
        query: Linear,
        key: Linear,
        value: Linear,
    },
    /// Projections followed by the rotary embedding (GTE).
    Rotary(QkvProjection),
}

/// The position-wise feed-forward block.
enum FeedForward {
    /// `down(act(up(x)))`.
    Plain { up: Linear, down: Linear },
    /// GTE: `down(act(gate(x)) * up(x))`; `up_gate_proj` stacks up, then gate, no bias.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

impl FeedForward {
    fn forward(&self, x: &Tensor, act: HiddenAct) -> Result<Tensor> {
        match self {
            FeedForward::Plain { up, down } => down.forward(&up.forward_act(x, act)?),
            FeedForward::Gated { gate, up, down } => down.forward(&gated_mlp(gate, up, x, act)?),
        }
    }
}

struct EncoderLayer {
    qkv: QkvKind,
    attn_out: Linear,
    attn_norm: LayerNorm,
    mlp: FeedForward,
    out_norm: LayerNorm,
}

/// Token positions: added to the embeddings, or applied to q/k in every layer.
enum Positions {
    Table(Tensor),
    Rotary(RotaryEmbedding),
}

pub struct BertModel {
    variant: BertVariant,
    word: Tensor,
    positions: Positions,
    /// Absent when the model has no token types (DistilBERT).
    token_type: Option<Tensor>,
    /// ERNIE's task-type row 0, added to every token.
    task_type: Option<Tensor>,
    emb_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    head_dim: usize,
    cfg: EncoderConfig,
    device: Device,
    dtype: DType,
}

impl BertModel {
    pub fn load(variant: BertVariant, config: &HfConfig, weights: &Weights) -> Result<Self> {
        let cfg = EncoderConfig::parse(variant, config)?;
        let h = cfg.hidden_size;
        let head_dim = h / cfg.heads;
        let root = weights.root(variant.bases());
        let emb = root.pp("embeddings");
        let word = emb
            .pp("word_embeddings")
            .get("weight", &[cfg.vocab_size, h])?;
        let table = emb.pp("position_embeddings");
        let positions = match cfg.positions {
            PositionKind::Rotary => {
                Positions::Rotary(RotaryEmbedding::from_config(config, head_dim)?)
            }
            PositionKind::Sinusoidal if !table.contains("weight") => Positions::Table(
                sinusoidal_table(cfg.max_position_embeddings, h, weights.device())?
                    .to_dtype(weights.dtype())?,
            ),
            PositionKind::Absolute | PositionKind::Sinusoidal => {
                Positions::Table(table.get("weight", &[cfg.max_position_embeddings, h])?)
            }
        };
        let token_type = (cfg.type_vocab_size > 0)
            .then(|| {
                emb.pp("token_type_embeddings")
                    .get("weight", &[cfg.type_vocab_size, h])
            })
            .transpose()?;
        let task_type = cfg
            .task_type_rows
            .map(|rows| -> Result<Tensor> {
                Ok(emb
                    .pp("task_type_embeddings")
                    .get("weight", &[rows, h])?
                    .narrow(0, 0, 1)?)
            })
            .transpose()?;
        let emb_norm = LayerNorm::load(&emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?;
        let layers = (0..cfg.num_layers)
            .map(|i| load_layer(variant, &root, i, &cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(BertModel {
            variant,
            word,
            positions,
            token_type,
            task_type,
            emb_norm,
            layers,
            head_dim,
            device: weights.device().clone(),
            dtype: weights.dtype(),
            cfg,
        })
    }

    fn position_offset(&self) -> usize {
        match self.variant {
            BertVariant::Roberta => self.cfg.pad_token_id.unwrap_or(1) + 1,
            _ => 0,
        }
    }
}

/// transformers' `create_sinusoidal_embeddings`: entry (p, j) is sin (even j) or
/// cos (odd j) of p / 10000^(2⌊j/2⌋ / dim), computed in f64 like its numpy code.
fn sinusoidal_table(rows: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(rows * dim);
    for p in 0..rows {
        for j in 0..dim {
            let angle = p as f64 / 10000f64.powf((2 * (j / 2)) as f64 / dim as f64);
            data.push(if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    Ok(Tensor::from_vec(data, (rows, dim), device)?)
}

fn load_layer(
    variant: BertVariant,
    root: &WeightPath,
    index: usize,
    cfg: &EncoderConfig,
) -> Result<EncoderLayer> {
    let (h, inter, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
    let separate = |q: &WeightPath, k: &WeightPath, v: &WeightPath| -> Result<QkvKind> {
        Ok(QkvKind::Separate {
            query: Linear::load(q, h, h, true)?,
            key: Linear::load(k, h, h, true)?,
            value: Linear::load(v, h, h, true)?,
        })
    };
    let plain = |up: &WeightPath, down: &WeightPath| -> Result<FeedForward> {
        Ok(FeedForward::Plain {
            up: Linear::load(up, h, inter, true)?,
            down: Linear::load(down, inter, h, true)?,
        })
    };
    match variant {
        BertVariant::DistilBert => {
            let wp = root.pp("transformer.layer").pp(index);
            let att = wp.pp("attention");
            Ok(EncoderLayer {
                qkv: separate(&att.pp("q_lin"), &att.pp("k_lin"), &att.pp("v_lin"))?,
                attn_out: Linear::load(&att.pp("out_lin"), h, h, true)?,
                attn_norm: LayerNorm::load(&wp.pp("sa_layer_norm"), h, eps)?,
                mlp: plain(&wp.pp("ffn.lin1"), &wp.pp("ffn.lin2"))?,
                out_norm: LayerNorm::load(&wp.pp("output_layer_norm"), h, eps)?,
            })
        }
        BertVariant::GteNew => {
            let wp = root.pp("encoder.layer").pp(index);
            let att = wp.pp("attention");
            let d = h / cfg.heads;
            let qkv = if cfg.fused_qkv {
                QkvProjection::load_fused(&att.pp("qkv_proj"), h, cfg.heads, cfg.heads, d, true)?
            } else {
                QkvProjection::load(&att, h, cfg.heads, cfg.heads, d, true)?
            };
            let up_gate_wp = wp.pp("mlp.up_gate_proj");
            let up_gate = up_gate_wp.get("weight", &[2 * inter, h])?;
            let half = |i: usize| -> Result<Linear> {
                let lora = up_gate_wp.lora_target_rows(h, i * inter..(i + 1) * inter);
                Ok(
                    Linear::new(up_gate.narrow(0, i * inter, inter)?.contiguous()?, None)
                        .with_lora(lora),
                )
            };
            Ok(EncoderLayer {
                qkv: QkvKind::Rotary(qkv),
                attn_out: Linear::load(&att.pp("o_proj"), h, h, true)?,
                attn_norm: LayerNorm::load(&wp.pp("attn_ln"), h, eps)?,
                mlp: FeedForward::Gated {
                    up: half(0)?,
                    gate: half(1)?,
                    down: Linear::load(&wp.pp("mlp.down_proj"), inter, h, true)?,
                },
                out_norm: LayerNorm::load(&wp.pp("mlp_ln"), h, eps)?,
            })
        }
        BertVariant::Bert | BertVariant::Roberta | BertVariant::Ernie => {
            let wp = root.pp("encoder.layer").pp(index);
            let att = wp.pp("attention");
            Ok(EncoderLayer {
                qkv: separate(
                    &att.pp("self.query"),
                    &att.pp("self.key"),
                    &att.pp("self.value"),
                )?,
                attn_out: Linear::load(&att.pp("output.dense"), h, h, true)?,
                attn_norm: LayerNorm::load(&att.pp("output.LayerNorm"), h, eps)?,
                mlp: plain(&wp.pp("intermediate.dense"), &wp.pp("output.dense"))?,
                out_norm: LayerNorm::load(&wp.pp("output.LayerNorm"), h, eps)?,
            })
        }
    }
}

impl Backbone for BertModel {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let t = batch.input_ids.len();
        let ids = Tensor::from_slice(&batch.input_ids, t, &self.device)?;
        let mut x = self.word.embedding(&ids)?;
        if let Positions::Table(table) = &self.positions {
            let offset = self.position_offset() as u32;
            let pos: Vec<u32> = batch.positions.iter().map(|p| p + offset).collect();
            let pos = Tensor::from_vec(pos, t, &self.device)?;
            x = (x + table.embedding(&pos)?)?;
        }
        if let Some(token_type) = &self.token_type {
            let types = match &batch.token_type_ids {
                Some(tt) => Tensor::from_slice(tt, t, &self.device)?,
                None => Tensor::zeros(t, DType::U32, &self.device)?,
            };
            x = (x + token_type.embedding(&types)?)?;
        }
        if let Some(task) = &self.task_type {
            x = x.broadcast_add(task)?;
        }
        let mut x = self.emb_norm.forward(&x)?;
        let rotary = match &self.positions {
            Positions::Rotary(rope) => {
                Some(rope.cos_sin(&batch.positions, self.dtype, &self.device)?)
            }
            Positions::Table(_) => None,
        };
        let (heads, d) = (self.cfg.heads, self.head_dim);
        let scale = 1.0 / (d as f64).sqrt();
        for layer in &self.layers {
            let (q, k, v) = match (&layer.qkv, &rotary) {
                (QkvKind::Separate { query, key, value }, _) => (
                    query.forward(&x)?.reshape((t, heads, d))?,
                    key.forward(&x)?.reshape((t, heads, d))?,
                    value.forward(&x)?.reshape((t, heads, d))?,
                ),
                (QkvKind::Rotary(proj), Some((cos, sin))) => proj.forward(&x, None, cos, sin)?,
                (QkvKind::Rotary(_), None) => {
                    return Err(EngineError::Config(
                        "internal: a rotary layer in a model without rotary positions".into(),
                    ))
                }
            };
            let ctx = packed_attention(
                &q,
                &k,
                &v,
                &batch.cu_seqlens,
                AttentionMask::Bidirectional,
                scale,
            )?;
            let attn = layer
                .attn_norm
                .forward_add(&layer.attn_out.forward(&ctx)?, &x)?;
            let ffn = in_row_chunks(&attn, |rows| layer.mlp.forward(rows, self.cfg.act))?;
            x = layer.out_norm.forward_add(&ffn, &attn)?;
        }
        Ok(x)
    }

    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn type_vocab_size(&self) -> usize {
        self.cfg.type_vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        Some(
            self.cfg
                .max_position_embeddings
                .saturating_sub(self.position_offset()),
        )
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Whether a weight belongs to the classification head (pooler included), the
/// modules a LoRA adapter may replace.
pub(crate) fn is_head_weight(variant: BertVariant, name: &str) -> bool {
    name.starts_with("classifier.")
        || name.starts_with("pre_classifier.")
        || variant
            .bases()
            .iter()
            .any(|base| name.starts_with(&format!("{base}pooler.")))
}

/// The label count of the head in `weights` (its output layer's rows).
pub(crate) fn head_labels(
    variant: BertVariant,
    token_classification: bool,
    weights: &Weights,
) -> Option<usize> {
    let out = if variant == BertVariant::Roberta && !token_classification {
        "classifier.out_proj.weight"
    } else {
        "classifier.weight"
    };
    weights.shape_of(out).and_then(|s| s.first().copied())
}

/// The sequence-classification head of a BERT-family checkpoint.
/// BERT/ERNIE/GTE: `{base}pooler.dense` + tanh, then `classifier`.
/// RoBERTa/XLM-R: `classifier.dense` + tanh + `classifier.out_proj`.
/// DistilBERT: `pre_classifier` + ReLU, then `classifier` (dropout ignored).
/// `*ForTokenClassification`: a plain `classifier` applied per token.
pub fn load_head(
    variant: BertVariant,
    token_classification: bool,
    hidden: usize,
    weights: &Weights,
    num_labels: usize,
) -> Result<ClassifierHead> {
    let h = hidden;
    let top = weights.root(&[""]);
    let classifier = || Linear::load_as(&top.pp("classifier"), h, num_labels, true, DType::F32);
    if token_classification {
        return Ok(ClassifierHead::linear(classifier()?));
    }
    match variant {
        BertVariant::Roberta => {
            let dense = Linear::load_as(&top.pp("classifier.dense"), h, h, true, DType::F32)?;
            let out = Linear::load_as(
                &top.pp("classifier.out_proj"),
                h,
                num_labels,
                true,
                DType::F32,
            )?;
            Ok(ClassifierHead::dense_tanh(dense, out, false))
        }
        BertVariant::DistilBert => {
            let dense = Linear::load_as(&top.pp("pre_classifier"), h, h, true, DType::F32)?;
            Ok(ClassifierHead::dense_relu(dense, classifier()?))
        }
        BertVariant::Bert | BertVariant::Ernie | BertVariant::GteNew => {
            let pooler = weights.root(variant.bases()).pp("pooler.dense");
            let dense = Linear::load_as(&pooler, h, h, true, DType::F32)?;
            Ok(ClassifierHead::dense_tanh(dense, classifier()?, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoidal_rows_alternate_sin_and_cos() {
        let table = sinusoidal_table(3, 4, &Device::Cpu).unwrap();
        let rows = table.to_vec2::<f32>().unwrap();
        assert_eq!(rows[0], [0.0, 1.0, 0.0, 1.0]);
        let p2 = [
            2f64.sin(),
            2f64.cos(),
            (2.0 / 100.0f64).sin(),
            (2.0 / 100.0f64).cos(),
        ];
        for (got, want) in rows[2].iter().zip(p2) {
            assert!((*got as f64 - want).abs() < 1e-7, "{got} vs {want}");
        }
    }
}
