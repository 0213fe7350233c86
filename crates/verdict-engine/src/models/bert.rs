//! BERT-family encoders: BERT, RoBERTa, XLM-RoBERTa and ERNIE.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, WeightPath, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{in_row_chunks, packed_attention, AttentionMask, HiddenAct, LayerNorm, Linear};
use crate::pooling::ClassifierHead;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertVariant {
    Bert,
    /// RoBERTa and XLM-RoBERTa: positions start after `pad_token_id`.
    Roberta,
    /// ERNIE: adds task-type embeddings (row 0) when `use_task_id`.
    Ernie,
}

impl BertVariant {
    pub fn from_arch(base: &str) -> Option<Self> {
        match base {
            "Bert" => Some(BertVariant::Bert),
            "Roberta" | "XLMRoberta" | "Camembert" => Some(BertVariant::Roberta),
            "Ernie" => Some(BertVariant::Ernie),
            _ => None,
        }
    }

    /// Weight-name prefixes accepted for the backbone, most specific first.
    fn bases(&self) -> &'static [&'static str] {
        match self {
            BertVariant::Bert => &["bert.", "model.", ""],
            BertVariant::Roberta => &["roberta.", "bert.", "model.", ""],
            BertVariant::Ernie => &["ernie.", "bert.", "model.", ""],
        }
    }
}

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
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default)]
    pad_token_id: Option<usize>,
    #[serde(default)]
    position_embedding_type: Option<String>,
    #[serde(default)]
    use_task_id: bool,
    #[serde(default)]
    task_type_vocab_size: Option<usize>,
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
fn default_type_vocab() -> usize {
    2
}

struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

pub struct BertModel {
    variant: BertVariant,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    /// ERNIE's task-type row 0, added to every token.
    task_type: Option<Tensor>,
    emb_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    heads: usize,
    head_dim: usize,
    act: HiddenAct,
    cfg: BertConfig,
    device: Device,
    dtype: DType,
}

impl BertModel {
    pub fn load(variant: BertVariant, config: &HfConfig, weights: &Weights) -> Result<Self> {
        let cfg: BertConfig = config.parse("BERT-family")?;
        if let Some(kind) = cfg.position_embedding_type.as_deref() {
            if kind != "absolute" {
                return Err(EngineError::Config(format!(
                    "position_embedding_type `{kind}` is not supported (only absolute)"
                )));
            }
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(EngineError::Config(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let h = cfg.hidden_size;
        let root = weights.root(variant.bases());
        let emb = root.pp("embeddings");
        let word = emb
            .pp("word_embeddings")
            .get("weight", &[cfg.vocab_size, h])?;
        let position = emb
            .pp("position_embeddings")
            .get("weight", &[cfg.max_position_embeddings, h])?;
        let token_type = emb
            .pp("token_type_embeddings")
            .get("weight", &[cfg.type_vocab_size, h])?;
        let task_type = if variant == BertVariant::Ernie && cfg.use_task_id {
            let rows = cfg.task_type_vocab_size.unwrap_or(3);
            Some(
                emb.pp("task_type_embeddings")
                    .get("weight", &[rows, h])?
                    .narrow(0, 0, 1)?,
            )
        } else {
            None
        };
        let emb_norm = LayerNorm::load(&emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(load_layer(&root.pp("encoder.layer").pp(i), &cfg)?);
        }
        Ok(BertModel {
            variant,
            word,
            position,
            token_type,
            task_type,
            emb_norm,
            layers,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            act: HiddenAct::from_name(&cfg.hidden_act)?,
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

fn load_layer(wp: &WeightPath, cfg: &BertConfig) -> Result<EncoderLayer> {
    let h = cfg.hidden_size;
    let att = wp.pp("attention");
    Ok(EncoderLayer {
        query: Linear::load(&att.pp("self.query"), h, h, true)?,
        key: Linear::load(&att.pp("self.key"), h, h, true)?,
        value: Linear::load(&att.pp("self.value"), h, h, true)?,
        attn_out: Linear::load(&att.pp("output.dense"), h, h, true)?,
        attn_norm: LayerNorm::load(&att.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
        intermediate: Linear::load(&wp.pp("intermediate.dense"), h, cfg.intermediate_size, true)?,
        output: Linear::load(&wp.pp("output.dense"), cfg.intermediate_size, h, true)?,
        out_norm: LayerNorm::load(&wp.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
    })
}

impl Backbone for BertModel {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let t = batch.input_ids.len();
        let ids = Tensor::from_slice(&batch.input_ids, t, &self.device)?;
        let offset = self.position_offset() as u32;
        let pos: Vec<u32> = batch.positions.iter().map(|p| p + offset).collect();
        let pos = Tensor::from_vec(pos, t, &self.device)?;
        let types = match &batch.token_type_ids {
            Some(tt) => Tensor::from_slice(tt, t, &self.device)?,
            None => Tensor::zeros(t, DType::U32, &self.device)?,
        };
        let mut x = self.word.embedding(&ids)?;
        x = (x + self.position.embedding(&pos)?)?;
        x = (x + self.token_type.embedding(&types)?)?;
        if let Some(task) = &self.task_type {
            x = x.broadcast_add(task)?;
        }
        let mut x = self.emb_norm.forward(&x)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        for layer in &self.layers {
            let q = layer
                .query
                .forward(&x)?
                .reshape((t, self.heads, self.head_dim))?;
            let k = layer
                .key
                .forward(&x)?
                .reshape((t, self.heads, self.head_dim))?;
            let v = layer
                .value
                .forward(&x)?
                .reshape((t, self.heads, self.head_dim))?;
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
                .forward(&(layer.attn_out.forward(&ctx)? + &x)?)?;
            let ffn = in_row_chunks(&attn, |rows| {
                layer
                    .output
                    .forward(&layer.intermediate.forward_act(rows, self.act)?)
            })?;
            x = layer.out_norm.forward(&(ffn + &attn)?)?;
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

/// The sequence-classification head of a BERT-family checkpoint.
/// BERT/ERNIE: `{base}pooler.dense` + tanh, then `classifier`.
/// RoBERTa/XLM-R: `classifier.dense` + tanh + `classifier.out_proj`.
/// `*ForTokenClassification`: a plain `classifier` applied per token.
pub fn load_head(
    variant: BertVariant,
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
        BertVariant::Bert | BertVariant::Ernie => {
            let pooler = weights.root(variant.bases()).pp("pooler.dense");
            let dense = Linear::load_as(&pooler, h, h, true, DType::F32)?;
            let classifier =
                Linear::load_as(&top.pp("classifier"), h, num_labels, true, DType::F32)?;
            Ok(ClassifierHead::dense_tanh(dense, classifier, true))
        }
    }
}
