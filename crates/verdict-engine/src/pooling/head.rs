use candle_core::Tensor;

use crate::error::Result;
use crate::layers::{Linear, NamedAct};

/// A classification head, run in fp32 on pooled (or per-token) hidden states.
pub struct ClassifierHead {
    /// BERT's pooler or RoBERTa's `classifier.dense`, followed by tanh; DeBERTa's
    /// `ContextPooler`, followed by `pooler_hidden_act`.
    dense: Option<DenseAct>,
    out: Linear,
}

struct DenseAct {
    dense: Linear,
    act: NamedAct,
    /// True for BERT's pooler: per-token classification skips it, as the
    /// token-classification models have no pooler.
    is_pooler: bool,
}

impl ClassifierHead {
    /// A single linear layer (`score`, `classifier`).
    pub fn linear(out: Linear) -> Self {
        ClassifierHead { dense: None, out }
    }

    /// `out(tanh(dense(x)))`.
    pub fn dense_tanh(dense: Linear, out: Linear, is_pooler: bool) -> Self {
        Self::dense_act(dense, NamedAct::Tanh, out, is_pooler)
    }

    /// `out(act(dense(x)))`.
    pub fn dense_act(dense: Linear, act: NamedAct, out: Linear, is_pooler: bool) -> Self {
        ClassifierHead {
            dense: Some(DenseAct {
                dense,
                act,
                is_pooler,
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
            Some(d) => self.out.forward(&d.act.forward(&d.dense.forward(pooled)?)?),
            None => self.out.forward(pooled),
        }
    }

    /// Logits for every token: fp32 `[T, H]` -> `[T, labels]`.
    pub fn forward_tokens(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.dense {
            Some(d) if !d.is_pooler => self.out.forward(&d.act.forward(&d.dense.forward(hidden)?)?),
            _ => self.out.forward(hidden),
        }
    }
}
