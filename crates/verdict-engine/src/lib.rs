//! verdict-engine: load Hugging Face sequence classifiers and run them on
//! packed batches, matching transformers' numbers. No HTTP here: the server
//! crate and the CLI drive this library.

pub mod checkpoint;
pub mod engine;
pub mod error;
pub mod input;
pub mod layers;
pub mod llm;
pub mod lora;
pub mod models;
pub mod multimodal;
pub mod pooling;
pub mod priority;
pub mod scheduler;
#[cfg(test)]
mod test_util;
pub mod tokenize;

pub use engine::{
    Convert, DTypeArg, DeviceArg, EngineArgs, MediaLimits, ModelInfo, MultimodalInfo, PooledData,
    Runner, SequenceInput,
};
pub use error::{EngineError, Result};
pub use input::{PairLimits, Prompt, TokenizeOptions};
pub use llm::{
    into_classification, into_scores, ClassificationRequestOutput, Engine, InvalidPrompt, Llm,
    LoraRequest, ParamsArg, PendingCall, PoolingParams, PoolingRequestOutput, ScoringRequestOutput,
};
pub use lora::{LoraInfo, LoraLimits, LoraModuleArg, LoraRegistry};
pub use pooling::{PoolerConfig, PoolingTask, PoolingType, StepParams};
pub use tokenize::{ChatMessage, ChatOptions, TruncationSide};
