//! Model families. Each file knows its architecture and weight names; every
//! backbone takes a packed batch and returns hidden states `[T, H]`.

pub mod bert;
pub mod decoder;
pub mod gpt2;
pub mod qwen2_5_vl;

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::checkpoint::{HfConfig, Weights};
use crate::error::{EngineError, Result};
use crate::multimodal::VisualInput;
use crate::pooling::{ClassifierHead, PoolingTask, PoolingType};
use bert::{BertModel, BertVariant};
use decoder::{DecoderModel, DecoderVariant};
use gpt2::Gpt2Model;
use qwen2_5_vl::Qwen25VlModel;

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

/// How an architecture name is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchInfo {
    pub architecture: String,
    pub family: Family,
    pub kind: ArchKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert(BertVariant),
    Gpt2,
    Decoder(DecoderVariant),
    /// Qwen2.5-VL: vision tower + M-RoPE Qwen2 language model.
    Qwen25Vl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchKind {
    SequenceClassification,
    TokenClassification,
    /// `*ForCausalLM` / `*LMHeadModel`: served only through `--convert classify`.
    Generative,
}

pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
    "XLMRobertaForSequenceClassification",
    "XLMRobertaForTokenClassification",
    "ErnieForSequenceClassification",
    "ErnieForTokenClassification",
    "GPT2ForSequenceClassification",
    "GPT2LMHeadModel (--convert classify)",
    "LlamaForSequenceClassification",
    "LlamaForCausalLM (--convert classify)",
    "MistralForSequenceClassification",
    "MistralForCausalLM (--convert classify)",
    "Qwen2ForSequenceClassification",
    "Qwen2ForCausalLM (--convert classify)",
    "Qwen3ForSequenceClassification",
    "Qwen3ForCausalLM (--convert classify)",
    "Qwen2_5_VLForSequenceClassification",
    "Qwen2_5_VLForConditionalGeneration (--convert classify)",
];

const SUFFIXES: &[(&str, ArchKind)] = &[
    (
        "ForSequenceClassification",
        ArchKind::SequenceClassification,
    ),
    ("ForTokenClassification", ArchKind::TokenClassification),
    ("ForCausalLM", ArchKind::Generative),
    ("ForConditionalGeneration", ArchKind::Generative),
    ("LMHeadModel", ArchKind::Generative),
];

impl ArchInfo {
    pub fn from_name(arch: &str) -> Result<Self> {
        for (suffix, kind) in SUFFIXES {
            let Some(base) = arch.strip_suffix(suffix) else {
                continue;
            };
            let family = if let Some(v) = BertVariant::from_arch(base) {
                Some(Family::Bert(v))
            } else if base == "GPT2" {
                Some(Family::Gpt2)
            } else if base == "Qwen2_5_VL" {
                Some(Family::Qwen25Vl)
            } else {
                DecoderVariant::from_arch(base).map(Family::Decoder)
            };
            let supported = match (family, kind) {
                (Some(Family::Bert(_)), ArchKind::Generative) => false,
                (
                    Some(Family::Gpt2 | Family::Decoder(_) | Family::Qwen25Vl),
                    ArchKind::TokenClassification,
                ) => false,
                // Only the multimodal family is a "conditional generation" model.
                (Some(Family::Gpt2 | Family::Decoder(_)), ArchKind::Generative)
                    if arch.ends_with("ForConditionalGeneration") =>
                {
                    false
                }
                (Some(_), _) => true,
                (None, _) => false,
            };
            if let (true, Some(family)) = (supported, family) {
                return Ok(ArchInfo {
                    architecture: arch.to_string(),
                    family,
                    kind: *kind,
                });
            }
        }
        Err(unsupported_architecture(arch))
    }

    /// The pooling a classifier of this family uses unless configured otherwise.
    pub fn default_pooling(&self) -> PoolingType {
        match self.family {
            Family::Bert(_) => PoolingType::Cls,
            Family::Gpt2 | Family::Decoder(_) | Family::Qwen25Vl => PoolingType::Last,
        }
    }

    pub fn default_task(&self) -> PoolingTask {
        match self.kind {
            ArchKind::TokenClassification => PoolingTask::TokenClassify,
            _ => PoolingTask::Classify,
        }
    }

    /// Decoders attend causally; encoders see the whole sequence.
    pub fn is_causal(&self) -> bool {
        !matches!(self.family, Family::Bert(_))
    }
}

pub fn unsupported_architecture(arch: &str) -> EngineError {
    EngineError::Config(format!(
        "architecture `{arch}` is not supported. Supported architectures: {}",
        SUPPORTED_ARCHITECTURES.join(", ")
    ))
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
}

/// Builds the backbone and head for a resolved architecture.
pub fn load_model(
    arch: &ArchInfo,
    config: &HfConfig,
    weights: &Weights,
    num_labels: usize,
    from_token: Option<&TokenClassifierSpec>,
) -> Result<LoadedModel> {
    let token_cls = arch.kind == ArchKind::TokenClassification;
    match arch.family {
        Family::Bert(variant) => {
            let backbone = BertModel::load(variant, config, weights)?;
            let head = bert::load_head(variant, token_cls, config, weights, num_labels)?;
            Ok(LoadedModel {
                backbone: Box::new(backbone),
                head,
            })
        }
        Family::Gpt2 => {
            let backbone = Gpt2Model::load(config, weights)?;
            // GPT-2 always ties its LM head to the token embeddings.
            let head = decoder_head(
                weights,
                &["transformer.", ""],
                backbone.hidden_size(),
                num_labels,
                from_token,
                Some(backbone.embeddings()),
            )?;
            Ok(LoadedModel {
                backbone: Box::new(backbone),
                head,
            })
        }
        Family::Qwen25Vl => {
            let backbone = Qwen25VlModel::load(config, weights)?;
            let head = decoder_lm_head(backbone.language_model(), weights, num_labels, from_token)?;
            Ok(LoadedModel {
                backbone: Box::new(backbone),
                head,
            })
        }
        Family::Decoder(variant) => {
            let backbone = DecoderModel::load(variant, config, weights)?;
            let head = decoder_lm_head(&backbone, weights, num_labels, from_token)?;
            Ok(LoadedModel {
                backbone: Box::new(backbone),
                head,
            })
        }
    }
}

/// A Llama-family decoder's head; the LM head is tied to the embeddings when
/// the config says so or the checkpoint has none.
fn decoder_lm_head(
    lm: &DecoderModel,
    weights: &Weights,
    num_labels: usize,
    from_token: Option<&TokenClassifierSpec>,
) -> Result<ClassifierHead> {
    let tied =
        (lm.ties_embeddings() || !weights.contains("lm_head.weight")).then(|| lm.embeddings());
    decoder_head(
        weights,
        &["model.language_model.", "model.", ""],
        lm.hidden_size(),
        num_labels,
        from_token,
        tied,
    )
}

/// The `score` head of a decoder classifier, taken from the checkpoint or
/// built from LM-head rows (`classifier_from_token`).
fn decoder_head(
    weights: &Weights,
    bases: &[&str],
    hidden: usize,
    num_labels: usize,
    from_token: Option<&TokenClassifierSpec>,
    tied_embeddings: Option<&Tensor>,
) -> Result<ClassifierHead> {
    let top = weights.root(&["", "language_model.", "model."]);
    let Some(spec) = from_token else {
        let score = top.pp("score");
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
    };
    let lm_head = match weights.root(&[""]).pp("lm_head").shape_of("weight") {
        Some(shape) => weights
            .root(&[""])
            .pp("lm_head")
            .get_as("weight", &[shape[0], hidden], DType::F32)?,
        None => match tied_embeddings {
            Some(e) => e.to_dtype(DType::F32)?,
            None => {
                return Err(EngineError::Weight(format!(
                    "missing weight `lm_head.weight` (needed by classifier_from_token; looked under {bases:?})"
                )))
            }
        },
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
    let weight = match spec.method {
        TokenMethod::From2WaySoftmax => {
            if ids.len() != 2 {
                return Err(EngineError::Config(format!(
                    "method from_2_way_softmax needs exactly 2 classifier_from_token entries, got {}",
                    ids.len()
                )));
            }
            (rows.get(1)? - rows.get(0)?)?.unsqueeze(0)?
        }
        TokenMethod::NoPostProcessing => rows,
    };
    Ok(ClassifierHead::linear(crate::layers::Linear::new(
        weight.contiguous()?,
        None,
    )))
}
