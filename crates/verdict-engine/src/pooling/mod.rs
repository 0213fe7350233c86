//! Pooling (which hidden rows represent a sequence), classification heads,
//! calibration and activations: everything between the backbone and the probabilities.

mod config;
mod head;

pub use config::{PoolerConfig, PoolingTask, PoolingType, StepParams};
pub use head::ClassifierHead;

use candle_core::{DType, Tensor};

use crate::checkpoint::HfConfig;
use crate::error::{EngineError, Result};

/// The function applied to calibrated logits when `use_activation` is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Softmax over the labels when there are at least 2, sigmoid for 1.
    Classify,
    Sigmoid,
    Identity,
    Tanh,
    Relu,
}

impl Activation {
    /// vLLM's choice (aligned with transformers' loss selection): problem_type,
    /// then the sentence-transformers activation, then the label count.
    pub fn from_config(cfg: &HfConfig) -> Result<Self> {
        match cfg.problem_type() {
            Some("regression") => return Ok(Activation::Identity),
            Some("single_label_classification") => return Ok(Activation::Classify),
            Some("multi_label_classification") => return Ok(Activation::Sigmoid),
            Some(other) => {
                return Err(EngineError::Config(format!(
                    "unknown problem_type `{other}` (expected regression, single_label_classification or multi_label_classification)"
                )))
            }
            None => {}
        }
        if let Some(name) = cfg.sentence_transformers_activation() {
            let Some(module) = name.strip_prefix("torch.nn.modules.") else {
                return Err(EngineError::Config(format!(
                    "sentence-transformers activation `{name}` must be a torch.nn.modules class"
                )));
            };
            let class = module.rsplit('.').next().unwrap_or(module);
            return match class {
                "Identity" => Ok(Activation::Identity),
                "Sigmoid" | "Softmax" => Ok(Activation::Classify),
                "Tanh" => Ok(Activation::Tanh),
                "ReLU" => Ok(Activation::Relu),
                other => Err(EngineError::Config(format!(
                    "sentence-transformers activation `{other}` is not supported"
                ))),
            };
        }
        Ok(Activation::Classify)
    }

    /// Applies the activation over the last dimension of `[rows, labels]` fp32 logits.
    pub fn apply(&self, logits: &Tensor) -> Result<Tensor> {
        let labels = logits.dim(candle_core::D::Minus1)?;
        Ok(match self {
            Activation::Classify if labels >= 2 => candle_nn::ops::softmax_last_dim(logits)?,
            Activation::Classify | Activation::Sigmoid => candle_nn::ops::sigmoid(logits)?,
            Activation::Identity => logits.clone(),
            Activation::Tanh => logits.tanh()?,
            Activation::Relu => logits.relu()?,
        })
    }
}

/// `(logit - logit_mean) / logit_sigma`, each step only when configured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Calibration {
    pub mean: Option<f64>,
    pub sigma: Option<f64>,
}

impl Calibration {
    pub fn apply(&self, logits: Tensor) -> Result<Tensor> {
        let mut x = logits;
        if let Some(m) = self.mean {
            x = (x - m)?;
        }
        if let Some(s) = self.sigma {
            x = (x / s)?;
        }
        Ok(x)
    }
}

/// Rows of `hidden` (`[T, H]`) that represent each sequence, as fp32 `[B, H]`.
pub fn pool_sequences(
    hidden: &Tensor,
    cu_seqlens: &[usize],
    pooling: PoolingType,
) -> Result<Tensor> {
    let device = hidden.device();
    match pooling {
        PoolingType::Cls | PoolingType::Last => {
            let rows: Vec<u32> = cu_seqlens
                .windows(2)
                .map(|w| if pooling == PoolingType::Cls { w[0] } else { w[1] - 1 } as u32)
                .collect();
            let idx = Tensor::from_vec(rows, cu_seqlens.len() - 1, device)?;
            Ok(hidden.index_select(&idx, 0)?.to_dtype(DType::F32)?)
        }
        PoolingType::Mean if !device.is_cpu() => means_by_matmul(hidden, cu_seqlens),
        PoolingType::Mean => {
            let mut means = Vec::with_capacity(cu_seqlens.len() - 1);
            for w in cu_seqlens.windows(2) {
                let len = w[1] - w[0];
                let rows = hidden.narrow(0, w[0], len)?.to_dtype(DType::F32)?;
                means.push((rows.sum_keepdim(0)? / len as f64)?);
            }
            Ok(Tensor::cat(&means, 0)?)
        }
        PoolingType::All | PoolingType::Step => Err(EngineError::Config(
            "ALL and STEP pooling yield rows per token; they are not sequence poolings".into(),
        )),
    }
}

/// Every sequence's mean row as one matmul (the GPU's way: a loop costs a few launches
/// per sequence): row b of the weights is 1/len over sequence b's tokens, 0 elsewhere.
fn means_by_matmul(hidden: &Tensor, cu_seqlens: &[usize]) -> Result<Tensor> {
    let device = hidden.device();
    let seqs = cu_seqlens.len() - 1;
    let mut owner = Vec::with_capacity(hidden.dim(0)?);
    let mut inv_len = Vec::with_capacity(seqs);
    for (b, w) in cu_seqlens.windows(2).enumerate() {
        owner.extend(std::iter::repeat_n(b as u32, w[1] - w[0]));
        inv_len.push(1.0 / (w[1] - w[0]).max(1) as f32);
    }
    let tokens = owner.len();
    let owner = Tensor::from_vec(owner, (1, tokens), device)?;
    let inv_len = Tensor::from_vec(inv_len, (seqs, 1), device)?;
    let weights = Tensor::arange(0u32, seqs as u32, device)?
        .reshape((seqs, 1))?
        .broadcast_eq(&owner)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&inv_len)?;
    Ok(weights.matmul(&hidden.to_dtype(DType::F32)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's one-matmul means equal the CPU's per-sequence loop.
    #[test]
    fn means_by_matmul_match_the_loop() {
        let cu_seqlens = [0usize, 3, 4, 11];
        let values: Vec<f32> = (0..11 * 5).map(|i| (i as f32 * 0.31).sin()).collect();
        let hidden = Tensor::from_vec(values, (11, 5), &candle_core::Device::Cpu).unwrap();
        let looped = pool_sequences(&hidden, &cu_seqlens, PoolingType::Mean).unwrap();
        let by_matmul = means_by_matmul(&hidden, &cu_seqlens).unwrap();
        let gap = crate::test_util::max_abs_diff(&looped, &by_matmul);
        assert!(gap < 1e-6, "largest difference {gap}");
    }
}
