use candle_core::Tensor;

use crate::error::Result;
use crate::layers::Linear;

/// A classification head, run in fp32 on pooled (or per-token) hidden states.
pub struct ClassifierHead {
    /// BERT's pooler, RoBERTa's `classifier.dense` or DistilBERT's
    /// `pre_classifier`, with its activation.
    dense: Option<DenseStage>,
    out: Linear,
}

/// The activation after a head's dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DenseAct {
    Tanh,
    Relu,
}

struct DenseStage {
    dense: Linear,
    act: DenseAct,
    /// True for BERT's pooler: per-token classification skips it, as the
    /// token-classification models have no pooler.
    is_pooler: bool,
}

impl DenseStage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.dense.forward(x)?;
        Ok(match self.act {
            DenseAct::Tanh => y.tanh()?,
            DenseAct::Relu => y.relu()?,
        })
    }
}

impl ClassifierHead {
    /// A single linear layer (`score`, `classifier`).
    pub fn linear(out: Linear) -> Self {
        ClassifierHead { dense: None, out }
    }

    /// `out(tanh(dense(x)))`.
    pub fn dense_tanh(dense: Linear, out: Linear, is_pooler: bool) -> Self {
        ClassifierHead {
            dense: Some(DenseStage {
                dense,
                act: DenseAct::Tanh,
                is_pooler,
            }),
            out,
        }
    }

    /// `out(relu(dense(x)))`: DistilBERT's `pre_classifier` → ReLU → `classifier`.
    pub fn dense_relu(dense: Linear, out: Linear) -> Self {
        ClassifierHead {
            dense: Some(DenseStage {
                dense,
                act: DenseAct::Relu,
                is_pooler: false,
            }),
            out,
        }
    }

    pub fn num_labels(&self) -> usize {
        self.out.out_dim()
    }

    /// Logits for pooled sequences: fp32 `[B, H]` -> `[B, labels]`.
    pub fn forward_sequences(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.dense {
            Some(d) => self.out.forward(&d.forward(pooled)?),
            None => self.out.forward(pooled),
        }
    }

    /// Logits for every token: fp32 `[T, H]` -> `[T, labels]`.
    pub fn forward_tokens(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.dense {
            Some(d) if !d.is_pooler => self.out.forward(&d.forward(hidden)?),
            _ => self.out.forward(hidden),
        }
    }
}
