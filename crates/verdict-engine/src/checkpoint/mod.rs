//! Finding a checkpoint on disk, reading its config, and memory-mapping its weights.

mod config;
mod resolve;
mod weights;

pub use config::{merge_json, HfConfig};
pub use resolve::{resolve_model_dir, ModelFiles};
pub use weights::{WeightPath, Weights};
