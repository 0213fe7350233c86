//! Model families. Each file knows its architecture and weight names; every
//! backbone takes a packed batch and returns hidden states `[T, H]`.

pub mod bert;
pub mod deberta;
pub mod decoder;
pub mod gpt2;
pub mod modernbert;
pub mod qwen2_5_vl;
pub mod registry;

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::checkpoint::{HfConfig, Weights};
use crate::error::{EngineError, Result};
use crate::multimodal::VisualInput;
use crate::pooling::{ClassifierHead, PoolingType};
use bert::BertModel;
use deberta::DebertaModel;
use decoder::{DecoderModel, LmLogits};
use gpt2::Gpt2Model;
use modernbert::ModernBertModel;
use qwen2_5_vl::Qwen25VlModel;
pub use registry::{load_model, unsupported_architecture, ArchInfo, ArchKind, Family, RewardKind};

/// All sequences of a batch concatenated, with no padding.
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub input_ids: Vec<u32>,
    /// Present when any sequence carries token types (cross-encoder pairs).
    pub token_type_ids: Option<Vec<u32>>,
    /// Position of each token inside its own sequence, from 0.
    pub positions: Vec<u32>,
    /// Sequence boundaries: sequence i is rows `cu_seqlens[i]..cu_seqlens[i+1]`.
    pub cu_seqlens: Vec<usize>,
    /// Images and videos of each sequence, in prompt order (empty for text models).
    pub visuals: Vec<Vec<Arc<VisualInput>>>,
}

impl PackedBatch {
    pub fn from_sequences<'a>(
        seqs: impl IntoIterator<Item = (&'a [u32], Option<&'a [u32]>)>,
    ) -> Self {
        let mut b = PackedBatch {
            cu_seqlens: vec![0],
            ..Default::default()
        };
        let mut types: Vec<u32> = Vec::new();
        let mut any_types = false;
        for (ids, tt) in seqs {
            b.input_ids.extend_from_slice(ids);
            b.positions.extend(0..ids.len() as u32);
            match tt {
                Some(tt) => {
                    any_types = true;
                    types.extend_from_slice(tt);
                }
                None => types.extend(std::iter::repeat_n(0, ids.len())),
            }
            b.cu_seqlens.push(b.input_ids.len());
        }
        if any_types {
            b.token_type_ids = Some(types);
        }
        b
    }

    pub fn num_sequences(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
}

/// A transformer body without its head.
pub trait Backbone: Send + Sync {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor>;
    fn hidden_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Size of the token-type table; 0 when the model has none.
    fn type_vocab_size(&self) -> usize {
        0
    }
    /// The longest sequence absolute position embeddings allow, if limited.
    fn max_positions(&self) -> Option<usize>;
    fn dtype(&self) -> DType;
}

/// The `classifier_from_token` conversion of an LM head (vLLM's `method`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenClassifierSpec {
    pub token_ids: Vec<u32>,
    pub method: TokenMethod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMethod {
    /// `score = W[true] - W[false]`, one label; sigmoid of it is the 2-way softmax.
    From2WaySoftmax,
    /// The rows of the LM head for the tokens, one label each.
    NoPostProcessing,
}

/// A backbone with its classification head.
pub struct LoadedModel {
    pub backbone: Box<dyn Backbone>,
    pub head: ClassifierHead,
    /// The sequence pooling this checkpoint's head expects, when its config
    /// decides it (e.g. ModernBERT's `classifier_pooling`); else the registry's.
    pub default_pooling: Option<PoolingType>,
}

impl LoadedModel {
    pub fn new(backbone: impl Backbone + 'static, head: ClassifierHead) -> Self {
        LoadedModel {
            backbone: Box::new(backbone),
            head,
            default_pooling: None,
        }
    }
}

/// What a family's loader gets: the resolved architecture, its config and weights.
pub struct LoadRequest<'a> {
    pub arch: &'a ArchInfo,
    pub config: &'a HfConfig,
    pub weights: &'a Weights,
    pub num_labels: usize,
    pub from_token: Option<&'a TokenClassifierSpec>,
    /// With no `score` head in the checkpoint, classify with the whole LM head
    /// (one column per vocabulary token; STEP pooling picks the columns).
    pub lm_head_logits: bool,
}

impl LoadRequest<'_> {
    pub fn token_classification(&self) -> bool {
        self.arch.kind == ArchKind::TokenClassification
    }
}

/// A registry row whose loader does not fit its family (a registry bug).
pub(crate) fn family_mismatch(req: &LoadRequest) -> EngineError {
    EngineError::Config(format!(
        "internal: the registry row for {} names the wrong family",
        req.arch.architecture
    ))
}

pub(crate) fn load_bert(req: &LoadRequest) -> Result<LoadedModel> {
    let Family::Bert(variant) = req.arch.family else {
        return Err(family_mismatch(req));
    };
    let backbone = BertModel::load(variant, req.config, req.weights)?;
    let head = bert::load_head(
        variant,
        req.token_classification(),
        backbone.hidden_size(),
        req.weights,
        req.num_labels,
    )?;
    Ok(LoadedModel::new(backbone, head))
}

pub(crate) fn load_modernbert(req: &LoadRequest) -> Result<LoadedModel> {
    let backbone = ModernBertModel::load(req.config, req.weights)?;
    let pooling = backbone.pooling()?;
    let head = modernbert::load_head(req.config, req.weights, req.num_labels)?;
    let mut loaded = LoadedModel::new(backbone, head);
    loaded.default_pooling = Some(pooling);
    Ok(loaded)
}

pub(crate) fn load_deberta(req: &LoadRequest) -> Result<LoadedModel> {
    let Family::Deberta(variant) = req.arch.family else {
        return Err(family_mismatch(req));
    };
    let backbone = DebertaModel::load(variant, req.config, req.weights)?;
    let head = deberta::load_head(
        req.token_classification(),
        req.config,
        req.weights,
        req.num_labels,
    )?;
    Ok(LoadedModel::new(backbone, head))
}

pub(crate) fn load_gpt2(req: &LoadRequest) -> Result<LoadedModel> {
    let backbone = Gpt2Model::load(req.config, req.weights)?;
    // GPT-2 always ties its LM head to the token embeddings.
    let head = decoder_head(
        req,
        backbone.hidden_size(),
        Some(backbone.embeddings()),
        LmLogits::default(),
    )?;
    Ok(LoadedModel::new(backbone, head))
}

pub(crate) fn load_qwen2_5_vl(req: &LoadRequest) -> Result<LoadedModel> {
    let backbone = Qwen25VlModel::load(req.config, req.weights)?;
    let head = decoder_lm_head(backbone.language_model(), req)?;
    Ok(LoadedModel::new(backbone, head))
}

pub(crate) fn load_decoder(req: &LoadRequest) -> Result<LoadedModel> {
    let Family::Decoder(variant) = req.arch.family else {
        return Err(family_mismatch(req));
    };
    let backbone = DecoderModel::load(variant, req.config, req.weights)?;
    let head = match req.arch.kind {
        ArchKind::Reward(_) => reward_head(req.weights, backbone.hidden_size(), req.num_labels)?,
        _ => decoder_lm_head(&backbone, req)?,
    };
    Ok(LoadedModel::new(backbone, head))
}

/// Whether a weight is part of the classification head of an architecture (what a
/// LoRA adapter's `modules_to_save` may replace).
pub(crate) fn is_head_weight(arch: &ArchInfo, name: &str) -> bool {
    match arch.family {
        Family::Bert(variant) => bert::is_head_weight(variant, name),
        Family::Decoder(_) => name.starts_with("score."),
        Family::ModernBert => name.starts_with("head.") || name.starts_with("classifier."),
        Family::Deberta(_) => name.starts_with("pooler.") || name.starts_with("classifier."),
        _ => false,
    }
}

/// The head of a LoRA adapter: the family's head loaded from `weights`, the
/// adapter's saved modules over the base checkpoint, with the label count of the
/// adapter's output layer.
pub(crate) fn load_adapter_head(
    arch: &ArchInfo,
    config: &HfConfig,
    weights: &Weights,
    hidden: usize,
) -> Result<ClassifierHead> {
    let token_classification = arch.kind == ArchKind::TokenClassification;
    let missing = |name: &str| {
        EngineError::Weight(format!(
            "the adapter's head has no `{name}` (its output layer)"
        ))
    };
    let rows = |name: &str| {
        weights
            .shape_of(name)
            .and_then(|s| s.first().copied())
            .ok_or_else(|| missing(name))
    };
    match arch.family {
        Family::Bert(variant) => {
            let labels = bert::head_labels(variant, token_classification, weights)
                .ok_or_else(|| missing("classifier"))?;
            bert::load_head(variant, token_classification, hidden, weights, labels)
        }
        Family::Decoder(_) => {
            if let ArchKind::Reward(_) = arch.kind {
                return reward_head(weights, hidden, rows("score.2.weight")?);
            }
            let labels = rows("score.weight")?;
            let score = weights.root(&[""]).pp("score");
            let linear = crate::layers::Linear::load_as(
                &score,
                hidden,
                labels,
                score.contains("bias"),
                DType::F32,
            )?;
            Ok(ClassifierHead::linear(linear))
        }
        Family::ModernBert => modernbert::load_head(config, weights, rows("classifier.weight")?),
        Family::Deberta(_) => deberta::load_head(
            token_classification,
            config,
            weights,
            rows("classifier.weight")?,
        ),
        _ => Err(EngineError::Config(format!(
            "LoRA adapters are not supported for {}",
            arch.architecture
        ))),
    }
}

/// The reward models' `score`: Linear(h, h) -> ReLU -> Linear(h, labels), as
/// `score.0` and `score.2` of a torch Sequential.
fn reward_head(weights: &Weights, hidden: usize, num_labels: usize) -> Result<ClassifierHead> {
    let score = weights.root(&[""]).pp("score");
    let layer = |index: &str, out_dim: usize| {
        let wp = score.pp(index);
        let bias = wp.contains("bias");
        crate::layers::Linear::load_as(&wp, hidden, out_dim, bias, DType::F32)
    };
    Ok(ClassifierHead::dense_relu(
        layer("0", hidden)?,
        layer("2", num_labels)?,
    ))
}

/// A Llama-family decoder's head; the LM head is tied to the embeddings when
/// the config says so or the checkpoint has none.
fn decoder_lm_head(lm: &DecoderModel, req: &LoadRequest) -> Result<ClassifierHead> {
    let tied =
        (lm.ties_embeddings() || !req.weights.contains("lm_head.weight")).then(|| lm.embeddings());
    decoder_head(req, lm.hidden_size(), tied, lm.lm_logits())
}

/// The `score` head of a decoder classifier, taken from the checkpoint or
/// built from LM-head rows (`classifier_from_token`, or the whole LM head).
fn decoder_head(
    req: &LoadRequest,
    hidden: usize,
    tied_embeddings: Option<&Tensor>,
    lm_logits: LmLogits,
) -> Result<ClassifierHead> {
    let (weights, num_labels) = (req.weights, req.num_labels);
    let top = weights.root(&["", "language_model.", "model."]);
    let score = top.pp("score");
    let from_token = req.from_token;
    let lm_head_only =
        from_token.is_none() && req.lm_head_logits && score.shape_of("weight").is_none();
    if from_token.is_none() && !lm_head_only {
        if let Some(shape) = score.shape_of("weight") {
            if shape.len() == 2 && shape[1] == hidden && shape[0] != num_labels {
                return Err(EngineError::Weight(format!(
                    "weight `score.weight` has shape {shape:?} but the config has num_labels = {num_labels} (expected [{num_labels}, {hidden}])"
                )));
            }
        } else {
            return Err(EngineError::Weight(
                "missing weight `score.weight`: the checkpoint has no classification head. \
                 For an LLM used as a classifier, set `classifier_from_token` and `method` through --hf-overrides"
                    .into(),
            ));
        }
        let linear = crate::layers::Linear::load_as(
            &score,
            hidden,
            num_labels,
            score.contains("bias"),
            DType::F32,
        )?;
        return Ok(ClassifierHead::linear(linear));
    }
    let lm_head = match weights.root(&[""]).pp("lm_head").shape_of("weight") {
        Some(shape) => {
            weights
                .root(&[""])
                .pp("lm_head")
                .get_as("weight", &[shape[0], hidden], DType::F32)?
        }
        None => match tied_embeddings {
            Some(e) => e.to_dtype(DType::F32)?,
            None => {
                return Err(EngineError::Weight(
                    "missing weight `lm_head.weight` (needed to classify with LM-head rows)".into(),
                ))
            }
        },
    };
    let Some(spec) = from_token else {
        return Ok(ClassifierHead::linear(crate::layers::Linear::new(
            lm_head.contiguous()?,
            None,
        )));
    };
    let vocab = lm_head.dim(0)?;
    let ids: Vec<u32> = spec.token_ids.clone();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(EngineError::Config(format!(
            "classifier_from_token id {bad} is outside the LM head's {vocab} rows"
        )));
    }
    let index = Tensor::from_vec(ids.clone(), ids.len(), lm_head.device())?;
    let rows = lm_head.index_select(&index, 0)?;
    // Granite's logits_scaling is linear: folded into the rows.
    let rows = match lm_logits.divide_by {
        Some(scale) => (rows / scale)?,
        None => rows,
    };
    if spec.method == TokenMethod::From2WaySoftmax && ids.len() != 2 {
        return Err(EngineError::Config(format!(
            "method from_2_way_softmax needs exactly 2 classifier_from_token entries, got {}",
            ids.len()
        )));
    }
    // Soft-capped logits (Gemma-2) are not linear in the rows: the head keeps the
    // token rows and caps their logits before the method reads them.
    if let Some(cap) = lm_logits.softcap {
        let linear = crate::layers::Linear::new(rows.contiguous()?, None);
        let two_way = spec.method == TokenMethod::From2WaySoftmax;
        return Ok(ClassifierHead::soft_capped_tokens(linear, cap, two_way));
    }
    let weight = match spec.method {
        TokenMethod::From2WaySoftmax => (rows.get(1)? - rows.get(0)?)?.unsqueeze(0)?,
        TokenMethod::NoPostProcessing => rows,
    };
    Ok(ClassifierHead::linear(crate::layers::Linear::new(
        weight.contiguous()?,
        None,
    )))
}
