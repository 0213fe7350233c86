//! DeBERTa encoders: DeBERTa-v2/v3/mDeBERTa (`DebertaV2*`) and DeBERTa v1
//! (`Deberta*`). Both are post-LN BERT layers whose attention adds relative-position
//! terms (layers::disentangled); they differ in weight layout and a few switches:
//! - v1: one fused `in_proj` (rows interleaved per head as q, k, v) with separate
//!   `q_bias`/`v_bias`, `pos_proj` (no bias) and `pos_q_proj`, plain clamped distances.
//! - v2: `query_proj`/`key_proj`/`value_proj`, log-bucketed distances
//!   (`position_buckets`), the relative table through a LayerNorm (`norm_rel_ebd`),
//!   position projections shared with the content ones (`share_att_key`), and an
//!   optional convolution beside the first layer (`conv_kernel_size`).
//!
//! The relative table and its projections depend on the weights only, so each layer's
//! projected table is computed once at load. A LoRA adapter on the layers that project
//! it (PEFT adapts them there as well) gets its own projection, once per batch.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, WeightPath, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{
    disentangled_attention, packed_attention, post_norm_mlp, AttentionMask, DisentangledPlan,
    HiddenAct, LayerNorm, Linear, NamedAct, PositionProjections, RelativePositions,
};
use crate::pooling::ClassifierHead;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebertaVariant {
    /// `DebertaForSequenceClassification` (model_type `deberta`).
    V1,
    /// `DebertaV2ForSequenceClassification`: DeBERTa-v2, v3 and mDeBERTa.
    V2,
}

const BASES: &[&str] = &["deberta.", "model.", ""];

/// config.json; defaults are transformers' (the config classes' or the modeling
/// code's `getattr` fallbacks), which differ from released checkpoints' values.
#[derive(Debug, Deserialize)]
struct DebertaConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    type_vocab_size: usize,
    #[serde(default)]
    embedding_size: Option<usize>,
    #[serde(default)]
    attention_head_size: Option<usize>,
    #[serde(default = "yes")]
    position_biased_input: bool,
    #[serde(default)]
    relative_attention: bool,
    #[serde(default = "minus_one")]
    max_relative_positions: i64,
    #[serde(default = "minus_one")]
    position_buckets: i64,
    /// A list (`["p2c", "c2p"]`) or a `"p2c|c2p"` string.
    #[serde(default)]
    pos_att_type: Value,
    #[serde(default)]
    share_att_key: bool,
    #[serde(default)]
    norm_rel_ebd: Option<String>,
    #[serde(default)]
    conv_kernel_size: usize,
    #[serde(default = "one")]
    conv_groups: usize,
    #[serde(default)]
    conv_act: Option<String>,
    #[serde(default)]
    talking_head: bool,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-7
}
fn default_max_pos() -> usize {
    512
}
fn yes() -> bool {
    true
}
fn minus_one() -> i64 {
    -1
}
fn one() -> usize {
    1
}

impl DebertaConfig {
    /// `pos_att_type` as transformers normalises it: lower case, split at `|`.
    fn pos_att_types(&self) -> Result<Vec<String>> {
        let bad = || {
            EngineError::Config(format!(
                "pos_att_type must be a list of strings or a `|`-separated string, got {}",
                self.pos_att_type
            ))
        };
        let types: Vec<String> = match &self.pos_att_type {
            Value::Null => Vec::new(),
            Value::String(s) => s
                .to_lowercase()
                .split('|')
                .map(|t| t.trim().to_string())
                .collect(),
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_>>()?,
            _ => return Err(bad()),
        };
        Ok(types)
    }

    /// The relative-distance span (half the relative table).
    fn max_relative_positions(&self) -> usize {
        match self.max_relative_positions {
            n if n >= 1 => n as usize,
            _ => self.max_position_embeddings,
        }
    }
}

struct EncoderLayer {
    /// query, key and value projections as one layer (`[T, 3 * heads * d]`).
    qkv: Linear,
    /// What projects the relative table; kept after load only when LoRA may adapt it.
    table_projection: Option<TableProjection>,
    /// This layer's projections of the relative table (None without relative attention).
    positions: Option<PositionProjections>,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// How a layer projects the relative table for c2p (key side) and p2c (query side).
enum TableProjection {
    /// `share_att_key`: the content projections, bias included; whether c2p (the key
    /// part) and p2c (the query part) are used.
    Shared { c2p: bool, p2c: bool },
    /// Its own `pos_*` layers.
    Own {
        key: Option<Linear>,
        query: Option<Linear>,
    },
}

impl EncoderLayer {
    /// The layer's projections of `table`, through any LoRA adapter in scope.
    fn project_table(&self, table: &Tensor, heads: usize) -> Result<PositionProjections> {
        let Some(projection) = &self.table_projection else {
            return Err(EngineError::Weight(
                "internal: the relative table's projection was not kept".into(),
            ));
        };
        let (key, query) = match projection {
            &TableProjection::Shared { c2p, p2c } => {
                let all = self.qkv.forward(table)?;
                let width = all.dim(1)? / 3;
                let part = |on: bool, j: usize| -> Result<Option<Tensor>> {
                    Ok(if on {
                        Some(all.narrow(1, j * width, width)?.contiguous()?)
                    } else {
                        None
                    })
                };
                (part(c2p, 1)?, part(p2c, 0)?)
            }
            TableProjection::Own { key, query } => {
                let project = |l: &Option<Linear>| -> Result<Option<Tensor>> {
                    l.as_ref()
                        .map(|l| Ok(l.forward(table)?.contiguous()?))
                        .transpose()
                };
                (project(key)?, project(query)?)
            }
        };
        PositionProjections::new(key, query, heads)
    }
}

/// A run of sequences of one LoRA adapter (`slot` in the batch's stack; `None`: the
/// base model) and its attention plan.
struct AdapterGroup {
    rows: std::ops::Range<usize>,
    slot: Option<usize>,
    plan: DisentangledPlan,
}

/// DeBERTa-v2's convolution over the embeddings, added to the first layer's output.
struct ConvLayer {
    /// `[hidden, hidden / groups, kernel]`
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    act: NamedAct,
    norm: LayerNorm,
}

impl ConvLayer {
    /// `norm(layer_out + act(conv(embeddings)))`, the convolution zero-padded at the
    /// ends of each sequence.
    fn forward(
        &self,
        embeddings: &Tensor,
        layer_out: &Tensor,
        cu_seqlens: &[usize],
    ) -> Result<Tensor> {
        let padding = (self.weight.dim(2)? - 1) / 2;
        let mut outs = Vec::with_capacity(cu_seqlens.len().saturating_sub(1));
        for w in cu_seqlens.windows(2) {
            let seq = embeddings
                .narrow(0, w[0], w[1] - w[0])?
                .t()?
                .unsqueeze(0)?
                .contiguous()?;
            let conv = seq.conv1d(&self.weight, padding, 1, 1, self.groups)?;
            outs.push(conv.squeeze(0)?.t()?);
        }
        let conv = Tensor::cat(&outs, 0)?.broadcast_add(&self.bias)?;
        self.norm.forward_add(layer_out, &self.act.forward(&conv)?)
    }
}

pub struct DebertaModel {
    word: Tensor,
    position: Option<Tensor>,
    token_type: Option<Tensor>,
    embed_proj: Option<Linear>,
    emb_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    relative: Option<RelativePositions>,
    /// The relative table, kept after load only when LoRA adapters may need their own
    /// projections of it.
    rel_table: Option<Tensor>,
    conv: Option<ConvLayer>,
    heads: usize,
    head_dim: usize,
    /// 1 / sqrt(head_dim * (1 + number of position terms)).
    scale: f64,
    act: HiddenAct,
    cfg: DebertaConfig,
    device: Device,
    dtype: DType,
}

impl DebertaModel {
    pub fn load(variant: DebertaVariant, config: &HfConfig, weights: &Weights) -> Result<Self> {
        let cfg: DebertaConfig = config.parse("DeBERTa")?;
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        if heads == 0 || !h.is_multiple_of(heads) {
            return Err(EngineError::Config(format!(
                "hidden_size {h} is not divisible by num_attention_heads {heads}"
            )));
        }
        if cfg.talking_head {
            return Err(EngineError::Config(
                "DeBERTa with talking_head is not supported".into(),
            ));
        }
        let head_dim = match variant {
            DebertaVariant::V1 => h / heads,
            DebertaVariant::V2 => cfg.attention_head_size.unwrap_or(h / heads),
        };
        let all_heads = heads * head_dim;
        let pos_types = cfg.pos_att_types()?;
        let c2p = pos_types.iter().any(|t| t == "c2p");
        let p2c = pos_types.iter().any(|t| t == "p2c");
        // v1 counts every listed type into the scale (an unknown one adds no term).
        let scale_factor = match variant {
            DebertaVariant::V1 => 1 + pos_types.len(),
            DebertaVariant::V2 => 1 + usize::from(c2p) + usize::from(p2c),
        };

        let root = weights.root(BASES);
        let emb = root.pp("embeddings");
        let e = cfg.embedding_size.unwrap_or(h);
        let word = emb
            .pp("word_embeddings")
            .get("weight", &[cfg.vocab_size, e])?;
        let position = if cfg.position_biased_input {
            Some(
                emb.pp("position_embeddings")
                    .get("weight", &[cfg.max_position_embeddings, e])?,
            )
        } else {
            None
        };
        let token_type = if cfg.type_vocab_size > 0 {
            Some(
                emb.pp("token_type_embeddings")
                    .get("weight", &[cfg.type_vocab_size, e])?,
            )
        } else {
            None
        };
        let embed_proj = if e != h {
            Some(Linear::load(&emb.pp("embed_proj"), e, h, false)?)
        } else {
            None
        };
        let emb_norm = LayerNorm::load(&emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?;

        let encoder = root.pp("encoder");
        let (relative, rel_table) = if cfg.relative_attention {
            let max_rel = cfg.max_relative_positions();
            let positions = match variant {
                DebertaVariant::V2 if cfg.position_buckets > 0 => RelativePositions::new(
                    cfg.position_buckets as usize,
                    Some((cfg.position_buckets as usize, max_rel)),
                )?,
                _ => RelativePositions::new(max_rel, None)?,
            };
            let mut table = encoder
                .pp("rel_embeddings")
                .get("weight", &[positions.table_rows(), h])?;
            let norm_rel = cfg.norm_rel_ebd.as_deref().unwrap_or("none").to_lowercase();
            if variant == DebertaVariant::V2
                && norm_rel.split('|').any(|t| t.trim() == "layer_norm")
            {
                table = LayerNorm::load(&encoder.pp("LayerNorm"), h, cfg.layer_norm_eps)?
                    .forward(&table)?;
            }
            (Some(positions), Some(table))
        } else {
            (None, None)
        };

        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let wp = encoder.pp("layer").pp(i);
            let att = wp.pp("attention.self");
            let qkv = match variant {
                DebertaVariant::V1 => load_fused_qkv(&att, h, heads, head_dim)?,
                DebertaVariant::V2 => {
                    let parts = [
                        ("query_proj", all_heads),
                        ("key_proj", all_heads),
                        ("value_proj", all_heads),
                    ];
                    Linear::load_packed(&att, &parts, h, true)?
                }
            };
            let table_projection = if variant == DebertaVariant::V2 && cfg.share_att_key {
                TableProjection::Shared { c2p, p2c }
            } else {
                let (key_name, key_bias, query_name) = match variant {
                    DebertaVariant::V1 => ("pos_proj", false, "pos_q_proj"),
                    DebertaVariant::V2 => ("pos_key_proj", true, "pos_query_proj"),
                };
                let load = |on: bool, name: &str, bias: bool| -> Result<Option<Linear>> {
                    if on && rel_table.is_some() {
                        Ok(Some(Linear::load(&att.pp(name), h, all_heads, bias)?))
                    } else {
                        Ok(None)
                    }
                };
                TableProjection::Own {
                    key: load(c2p, key_name, key_bias)?,
                    query: load(p2c, query_name, true)?,
                }
            };
            let out = wp.pp("attention.output");
            layers.push(EncoderLayer {
                qkv,
                table_projection: Some(table_projection),
                positions: None,
                attn_out: Linear::load(&out.pp("dense"), all_heads, h, true)?,
                attn_norm: LayerNorm::load(&out.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
                intermediate: Linear::load(
                    &wp.pp("intermediate.dense"),
                    h,
                    cfg.intermediate_size,
                    true,
                )?,
                output: Linear::load(&wp.pp("output.dense"), cfg.intermediate_size, h, true)?,
                out_norm: LayerNorm::load(&wp.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            });
        }
        let lora = weights.collects_lora_targets();
        for layer in &mut layers {
            if let Some(table) = &rel_table {
                layer.positions = Some(layer.project_table(table, heads)?);
            }
            if !lora {
                layer.table_projection = None;
            }
        }

        let conv = if variant == DebertaVariant::V2 && cfg.conv_kernel_size > 0 {
            let (kernel, groups) = (cfg.conv_kernel_size, cfg.conv_groups);
            if kernel.is_multiple_of(2) || groups == 0 || !h.is_multiple_of(groups) {
                return Err(EngineError::Config(format!(
                    "conv_kernel_size {kernel} must be odd and conv_groups {groups} must divide hidden_size {h}"
                )));
            }
            let wp = encoder.pp("conv");
            Some(ConvLayer {
                weight: wp.pp("conv").get("weight", &[h, h / groups, kernel])?,
                bias: wp.pp("conv").get("bias", &[h])?,
                groups,
                act: NamedAct::from_name(cfg.conv_act.as_deref().unwrap_or("tanh"))?,
                norm: LayerNorm::load(&wp.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            })
        } else {
            None
        };

        Ok(DebertaModel {
            word,
            position,
            token_type,
            embed_proj,
            emb_norm,
            layers,
            relative,
            rel_table: rel_table.filter(|_| lora),
            conv,
            heads,
            head_dim,
            scale: 1.0 / ((head_dim * scale_factor) as f64).sqrt(),
            act: HiddenAct::from_name(&cfg.hidden_act)?,
            device: weights.device().clone(),
            dtype: weights.dtype(),
            cfg,
        })
    }

    /// The batch's runs of sequences by LoRA adapter, when an adapter may change the
    /// relative table's projections (empty otherwise: one attention over the batch).
    fn adapter_groups(&self, batch: &PackedBatch) -> Result<Vec<AdapterGroup>> {
        let (Some(relative), Some(_)) = (&self.relative, &self.rel_table) else {
            return Ok(Vec::new());
        };
        let Some(runs) = crate::lora::adapter_runs() else {
            return Ok(Vec::new());
        };
        if runs.iter().all(|(_, slot)| slot.is_none()) {
            return Ok(Vec::new());
        }
        runs.into_iter()
            .filter(|(rows, _)| !rows.is_empty())
            .map(|(rows, slot)| {
                let cu: Vec<usize> = batch
                    .cu_seqlens
                    .iter()
                    .filter(|&&c| rows.contains(&c) || c == rows.end)
                    .map(|&c| c - rows.start)
                    .collect();
                if cu.first() != Some(&0) || cu.last() != Some(&rows.len()) {
                    return Err(EngineError::Weight(format!(
                        "internal: LoRA rows {rows:?} do not start and end sequences"
                    )));
                }
                Ok(AdapterGroup {
                    plan: DisentangledPlan::new(&cu, relative),
                    rows,
                    slot,
                })
            })
            .collect()
    }

    /// Disentangled attention run by run of adapter, each with its adapter's
    /// projections of the relative table (computed once per adapter and layer).
    fn adapter_attention(
        &self,
        layer: &EncoderLayer,
        groups: &[AdapterGroup],
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        base: &PositionProjections,
    ) -> Result<Tensor> {
        let Some(table) = &self.rel_table else {
            return Err(EngineError::Weight(
                "internal: the relative table was not kept".into(),
            ));
        };
        let table_rows = table.dim(0)?;
        let mut projected: Vec<(usize, PositionProjections)> = Vec::new();
        let mut parts = Vec::with_capacity(groups.len());
        for group in groups {
            let positions = match group.slot {
                None => base,
                Some(slot) => {
                    let at = match projected.iter().position(|(s, _)| *s == slot) {
                        Some(at) => at,
                        None => {
                            let p = crate::lora::with_single_adapter(slot, table_rows, || {
                                layer.project_table(table, self.heads)
                            })?;
                            projected.push((slot, p));
                            projected.len() - 1
                        }
                    };
                    &projected[at].1
                }
            };
            let rows = |t: &Tensor| t.narrow(0, group.rows.start, group.rows.len());
            parts.push(disentangled_attention(
                &rows(q)?,
                &rows(k)?,
                &rows(v)?,
                &group.plan,
                positions,
                self.scale,
            )?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn embed(&self, batch: &PackedBatch) -> Result<Tensor> {
        let t = batch.input_ids.len();
        let ids = Tensor::from_slice(&batch.input_ids, t, &self.device)?;
        let mut x = self.word.embedding(&ids)?;
        if let Some(position) = &self.position {
            let pos = Tensor::from_slice(&batch.positions, t, &self.device)?;
            x = (x + position.embedding(&pos)?)?;
        }
        // Without a token-type table the types of a pair are ignored, as in transformers.
        if let Some(token_type) = &self.token_type {
            let types = match &batch.token_type_ids {
                Some(tt) => Tensor::from_slice(tt, t, &self.device)?,
                None => Tensor::zeros(t, DType::U32, &self.device)?,
            };
            x = (x + token_type.embedding(&types)?)?;
        }
        if let Some(proj) = &self.embed_proj {
            x = proj.forward(&x)?;
        }
        self.emb_norm.forward(&x)
    }
}

/// DeBERTa v1's `in_proj` `[3 * heads * d, hidden]`, whose rows hold, head by head,
/// that head's q, k and v rows, as one layer with all q rows, then k, then v; `q_bias`
/// and `v_bias` are separate and k has none (a zero bias here).
fn load_fused_qkv(
    att: &WeightPath,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Linear> {
    let all = heads * head_dim;
    let weight = att
        .pp("in_proj")
        .get("weight", &[3 * all, hidden])?
        .reshape((heads, 3, head_dim, hidden))?
        .transpose(0, 1)?
        .reshape((3 * all, hidden))?;
    let q_bias = att.get("q_bias", &[all])?;
    let k_bias = q_bias.zeros_like()?;
    let bias = Tensor::cat(&[&q_bias, &k_bias, &att.get("v_bias", &[all])?], 0)?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Backbone for DebertaModel {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let t = batch.input_ids.len();
        let embeddings = self.embed(batch)?;
        let (heads, d) = (self.heads, self.head_dim);
        let mut x = embeddings.clone();
        // Every layer attends over the same batch: its distance rows and index tensors once.
        let plan = self
            .relative
            .as_ref()
            .map(|relative| DisentangledPlan::new(&batch.cu_seqlens, relative));
        let groups = self.adapter_groups(batch)?;
        for (i, layer) in self.layers.iter().enumerate() {
            // Views into the one projection: [T, heads, d], tokens 3 * heads * d apart.
            let qkv = layer.qkv.forward(&x)?.reshape((t, 3, heads, d))?;
            let part = |j: usize| qkv.narrow(1, j, 1)?.squeeze(1);
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let ctx = match (&plan, &layer.positions) {
                (Some(_), Some(positions)) if !groups.is_empty() => {
                    self.adapter_attention(layer, &groups, (&q, &k, &v), positions)?
                }
                (Some(plan), Some(positions)) => {
                    disentangled_attention(&q, &k, &v, plan, positions, self.scale)?
                }
                _ => packed_attention(
                    &q,
                    &k,
                    &v,
                    &batch.cu_seqlens,
                    AttentionMask::Bidirectional,
                    self.scale,
                )?,
            };
            let attn = layer
                .attn_norm
                .forward_add_linear(&x, &layer.attn_out, &ctx)?;
            x = post_norm_mlp(
                &layer.out_norm,
                &layer.intermediate,
                &layer.output,
                self.act,
                &attn,
            )?;
            if i == 0 {
                if let Some(conv) = &self.conv {
                    x = conv.forward(&embeddings, &x, &batch.cu_seqlens)?;
                }
            }
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

    /// `max_position_embeddings` bounds the sequence even with relative positions
    /// only, as vLLM's default `max_model_len` for these models.
    fn max_positions(&self) -> Option<usize> {
        Some(self.cfg.max_position_embeddings)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// The head of a DeBERTa checkpoint: `pooler.dense` + `pooler_hidden_act` on the
/// first token, then `classifier` (`*ForSequenceClassification`); a plain
/// `classifier` per token (`*ForTokenClassification`).
pub fn load_head(
    token_classification: bool,
    config: &HfConfig,
    weights: &Weights,
    num_labels: usize,
) -> Result<ClassifierHead> {
    let h = config.usize("hidden_size").unwrap_or(0);
    let top = weights.root(&[""]);
    if token_classification {
        let classifier = Linear::load_as(&top.pp("classifier"), h, num_labels, true, DType::F32)?;
        return Ok(ClassifierHead::linear(classifier));
    }
    let pooled = config.usize("pooler_hidden_size").unwrap_or(h);
    if pooled != h {
        return Err(EngineError::Config(format!(
            "pooler_hidden_size {pooled} differs from hidden_size {h}: the pooler reads the hidden states"
        )));
    }
    let act = NamedAct::from_name(config.str("pooler_hidden_act").unwrap_or("gelu"))?;
    let dense = Linear::load_as(&top.pp("pooler.dense"), h, h, true, DType::F32)?;
    let classifier = Linear::load_as(&top.pp("classifier"), h, num_labels, true, DType::F32)?;
    Ok(ClassifierHead::dense_act(dense, act, classifier, true))
}
