//! The architecture registry: one row per model family stem. The supported
//! list (README table, error messages) and the dispatch to each family's
//! loader are derived from these rows; adding a family is its model file plus
//! one row here.

use super::bert::BertVariant;
use super::deberta::DebertaVariant;
use super::decoder::DecoderVariant;
use super::{
    load_bert, load_deberta, load_decoder, load_gpt2, load_modernbert, load_qwen2_5_vl,
    LoadRequest, LoadedModel, TokenClassifierSpec,
};
use crate::checkpoint::{HfConfig, Weights};
use crate::error::{EngineError, Result};
use crate::pooling::{PoolingTask, PoolingType};

/// Which model code serves an architecture (with its switches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert(BertVariant),
    ModernBert,
    Deberta(DebertaVariant),
    Gpt2,
    Decoder(DecoderVariant),
    /// Qwen2.5-VL: vision tower + M-RoPE Qwen2 language model.
    Qwen25Vl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchKind {
    SequenceClassification,
    TokenClassification,
    /// `*ForCausalLM` / `*LMHeadModel` / `*ForConditionalGeneration`:
    /// served only through `--convert classify`.
    Generative,
    /// A per-token reward head (`*ForRewardModel`, `*ForProcessRewardModel`).
    Reward(RewardKind),
}

/// Which reward model a `Reward` class is; vLLM gives each its own defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardKind {
    /// One reward per token (the sequence reward is the last); ALL pooling,
    /// raw values unless `use_activation` is asked for.
    Outcome,
    /// Good/bad probabilities at step-tag tokens; STEP pooling, softmax.
    Process,
}

impl RewardKind {
    /// The label count vLLM forces for the head.
    pub fn num_labels(self) -> usize {
        match self {
            RewardKind::Outcome => 1,
            RewardKind::Process => 2,
        }
    }
}

/// The class names a row serves, as suffixes of its stem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchClass {
    Sequence,
    Token,
    /// A generative class with this suffix (`ForCausalLM`, `LMHeadModel`, ...).
    Generative(&'static str),
    Reward(RewardKind),
}

impl ArchClass {
    fn suffix(self) -> &'static str {
        match self {
            ArchClass::Sequence => "ForSequenceClassification",
            ArchClass::Token => "ForTokenClassification",
            ArchClass::Generative(suffix) => suffix,
            ArchClass::Reward(RewardKind::Outcome) => "ForRewardModel",
            ArchClass::Reward(RewardKind::Process) => "ForProcessRewardModel",
        }
    }

    fn kind(self) -> ArchKind {
        match self {
            ArchClass::Sequence => ArchKind::SequenceClassification,
            ArchClass::Token => ArchKind::TokenClassification,
            ArchClass::Generative(_) => ArchKind::Generative,
            ArchClass::Reward(kind) => ArchKind::Reward(kind),
        }
    }
}

type LoadFn = fn(&LoadRequest) -> Result<LoadedModel>;

/// One family stem: `{stem}ForSequenceClassification`, ...
#[derive(Debug)]
pub struct ArchRow {
    pub stem: &'static str,
    pub family: Family,
    pub classes: &'static [ArchClass],
    /// Decoders attend causally and pool the last token; encoders see the
    /// whole sequence and pool CLS (unless the loaded head says otherwise).
    pub causal: bool,
    load: LoadFn,
}

const ENCODER: &[ArchClass] = &[ArchClass::Sequence, ArchClass::Token];
const CAUSAL_LM: &[ArchClass] = &[ArchClass::Sequence, ArchClass::Generative("ForCausalLM")];
/// Qwen2 also has the Qwen2.5-Math reward heads.
const QWEN2: &[ArchClass] = &[
    ArchClass::Sequence,
    ArchClass::Generative("ForCausalLM"),
    ArchClass::Reward(RewardKind::Outcome),
    ArchClass::Reward(RewardKind::Process),
];

const fn encoder(stem: &'static str, family: Family, load: LoadFn) -> ArchRow {
    ArchRow {
        stem,
        family,
        classes: ENCODER,
        causal: false,
        load,
    }
}

const fn decoder(stem: &'static str, variant: DecoderVariant) -> ArchRow {
    decoder_with(stem, variant, CAUSAL_LM)
}

const fn decoder_with(
    stem: &'static str,
    variant: DecoderVariant,
    classes: &'static [ArchClass],
) -> ArchRow {
    ArchRow {
        stem,
        family: Family::Decoder(variant),
        classes,
        causal: true,
        load: load_decoder,
    }
}

const fn bert(stem: &'static str, variant: BertVariant) -> ArchRow {
    encoder(stem, Family::Bert(variant), load_bert)
}

pub const REGISTRY: &[ArchRow] = &[
    bert("Bert", BertVariant::Bert),
    bert("Roberta", BertVariant::Roberta),
    bert("XLMRoberta", BertVariant::Roberta),
    bert("Camembert", BertVariant::Roberta),
    bert("Ernie", BertVariant::Ernie),
    bert("DistilBert", BertVariant::DistilBert),
    // GTE "new" (remote code, model_type `new`); vLLM names the class GteNew.
    bert("New", BertVariant::GteNew),
    ArchRow {
        stem: "GteNew",
        family: Family::Bert(BertVariant::GteNew),
        classes: &[ArchClass::Sequence],
        causal: false,
        load: load_bert,
    },
    encoder("ModernBert", Family::ModernBert, load_modernbert),
    encoder("Deberta", Family::Deberta(DebertaVariant::V1), load_deberta),
    encoder(
        "DebertaV2",
        Family::Deberta(DebertaVariant::V2),
        load_deberta,
    ),
    ArchRow {
        stem: "GPT2",
        family: Family::Gpt2,
        classes: &[ArchClass::Sequence, ArchClass::Generative("LMHeadModel")],
        causal: true,
        load: load_gpt2,
    },
    decoder("Llama", DecoderVariant::Llama),
    decoder("Mistral", DecoderVariant::Mistral),
    decoder_with("Qwen2", DecoderVariant::Qwen2, QWEN2),
    decoder("Qwen3", DecoderVariant::Qwen3),
    decoder("Gemma", DecoderVariant::Gemma),
    decoder("Gemma2", DecoderVariant::Gemma2),
    // Gemma-3 text: `Gemma3ForCausalLM` and `Gemma3TextForSequenceClassification`
    // (`Gemma3ForSequenceClassification` is the image-text model).
    ArchRow {
        stem: "Gemma3",
        family: Family::Decoder(DecoderVariant::Gemma3),
        classes: &[ArchClass::Generative("ForCausalLM")],
        causal: true,
        load: load_decoder,
    },
    ArchRow {
        stem: "Gemma3Text",
        family: Family::Decoder(DecoderVariant::Gemma3),
        classes: &[ArchClass::Sequence],
        causal: true,
        load: load_decoder,
    },
    decoder("Phi3", DecoderVariant::Phi3),
    decoder("Granite", DecoderVariant::Granite),
    ArchRow {
        stem: "Qwen2_5_VL",
        family: Family::Qwen25Vl,
        classes: &[
            ArchClass::Sequence,
            ArchClass::Generative("ForConditionalGeneration"),
        ],
        causal: true,
        load: load_qwen2_5_vl,
    },
];

/// Every served class name, generative ones marked as needing `--convert classify`.
pub fn supported_architectures() -> Vec<String> {
    REGISTRY
        .iter()
        .flat_map(|row| {
            row.classes.iter().map(move |class| {
                let name = format!("{}{}", row.stem, class.suffix());
                match class {
                    ArchClass::Generative(_) => format!("{name} (--convert classify)"),
                    _ => name,
                }
            })
        })
        .collect()
}

/// How an architecture name is served.
#[derive(Debug, Clone)]
pub struct ArchInfo {
    pub architecture: String,
    pub family: Family,
    pub kind: ArchKind,
    row: &'static ArchRow,
}

impl ArchInfo {
    pub fn from_name(arch: &str) -> Result<Self> {
        REGISTRY
            .iter()
            .find_map(|row| {
                let class = row
                    .classes
                    .iter()
                    .find(|class| arch.strip_prefix(row.stem) == Some(class.suffix()))?;
                Some(ArchInfo {
                    architecture: arch.to_string(),
                    family: row.family,
                    kind: class.kind(),
                    row,
                })
            })
            .ok_or_else(|| unsupported_architecture(arch))
    }

    /// The pooling a classifier of this family uses unless its head or the
    /// pooler config says otherwise.
    pub fn default_pooling(&self) -> PoolingType {
        if let ArchKind::Reward(kind) = self.kind {
            return match kind {
                RewardKind::Outcome => PoolingType::All,
                RewardKind::Process => PoolingType::Step,
            };
        }
        if self.row.causal {
            PoolingType::Last
        } else {
            PoolingType::Cls
        }
    }

    pub fn default_task(&self) -> PoolingTask {
        match self.kind {
            ArchKind::TokenClassification | ArchKind::Reward(_) => PoolingTask::TokenClassify,
            _ => PoolingTask::Classify,
        }
    }

    /// The pooling tasks the architecture serves (one is active per engine).
    pub fn supported_tasks(&self) -> Vec<PoolingTask> {
        match self.kind {
            ArchKind::TokenClassification | ArchKind::Reward(_) => {
                vec![PoolingTask::TokenClassify]
            }
            _ => vec![PoolingTask::Classify, PoolingTask::TokenClassify],
        }
    }

    /// Families whose backbone layers LoRA adapters may target: the BERT family,
    /// ModernBERT, DeBERTa-v2/v3 and the Llama-family decoders. (DeBERTa v1's fused
    /// `in_proj` is reordered at load, so PEFT's rows would not line up.)
    pub fn supports_lora(&self) -> bool {
        matches!(
            self.family,
            Family::Bert(_)
                | Family::ModernBert
                | Family::Deberta(DebertaVariant::V2)
                | Family::Decoder(_)
        )
    }

    /// Decoders attend causally; encoders see the whole sequence.
    pub fn is_causal(&self) -> bool {
        self.row.causal
    }

    /// Whether the family has an LM head (`classifier_from_token` needs one).
    pub fn has_lm_head(&self) -> bool {
        self.row
            .classes
            .iter()
            .any(|c| matches!(c, ArchClass::Generative(_)))
    }
}

pub fn unsupported_architecture(arch: &str) -> EngineError {
    EngineError::Config(format!(
        "architecture `{arch}` is not supported. Supported architectures: {}",
        supported_architectures().join(", ")
    ))
}

/// Builds the backbone and head for a resolved architecture.
pub fn load_model(
    arch: &ArchInfo,
    config: &HfConfig,
    weights: &Weights,
    num_labels: usize,
    from_token: Option<&TokenClassifierSpec>,
    lm_head_logits: bool,
) -> Result<LoadedModel> {
    (arch.row.load)(&LoadRequest {
        arch,
        config,
        weights,
        num_labels,
        from_token,
        lm_head_logits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_architecture_resolves() {
        for name in supported_architectures() {
            let class = name.trim_end_matches(" (--convert classify)");
            let info = ArchInfo::from_name(class).unwrap_or_else(|e| panic!("{class}: {e}"));
            assert_eq!(
                info.kind == ArchKind::Generative,
                name.ends_with("(--convert classify)"),
                "{name}"
            );
        }
    }

    #[test]
    fn gte_new_is_served_under_both_class_names() {
        let remote = ArchInfo::from_name("NewForSequenceClassification").unwrap();
        let vllm = ArchInfo::from_name("GteNewForSequenceClassification").unwrap();
        assert_eq!(remote.family, Family::Bert(BertVariant::GteNew));
        assert_eq!(vllm.family, remote.family);
        assert_eq!(vllm.kind, ArchKind::SequenceClassification);
    }

    #[test]
    fn unknown_classes_are_refused_with_the_list() {
        for name in [
            "BertForCausalLM",
            "Qwen2ForTokenClassification",
            "Qwen3ForRewardModel",
            "LlamaForProcessRewardModel",
            "Qwen2ForConditionalGeneration",
            "GPT2ForCausalLM",
            "FooForSequenceClassification",
        ] {
            let msg = ArchInfo::from_name(name).unwrap_err().to_string();
            assert!(msg.contains("BertForSequenceClassification"), "{msg}");
        }
    }
}
