use candle_core::Tensor;

use crate::error::Result;
use crate::layers::{HiddenAct, LayerNorm, Linear};

/// A classification head, run in fp32 on pooled (or per-token) hidden states.
pub struct ClassifierHead {
    /// BERT's pooler or RoBERTa's `classifier.dense`, followed by tanh.
    dense: Option<DenseTanh>,
    /// ModernBERT's prediction head, before `out` on pooled rows and on every token.
    prediction: Option<PredictionHead>,
    out: Linear,
}

/// `norm(act(dense(x)))`.
struct PredictionHead {
    dense: Linear,
    act: HiddenAct,
    norm: LayerNorm,
}

impl PredictionHead {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.dense.forward_act(x, self.act)?)
    }
}

struct DenseTanh {
    dense: Linear,
    /// True for BERT's pooler: per-token classification skips it, as the
    /// token-classification models have no pooler.
    is_pooler: bool,
}

impl ClassifierHead {
    /// A single linear layer (`score`, `classifier`).
    pub fn linear(out: Linear) -> Self {
        ClassifierHead {
            dense: None,
            prediction: None,
            out,
        }
    }

    /// `out(tanh(dense(x)))`.
    pub fn dense_tanh(dense: Linear, out: Linear, is_pooler: bool) -> Self {
        ClassifierHead {
            dense: Some(DenseTanh { dense, is_pooler }),
            prediction: None,
            out,
        }
    }

    /// `out(norm(act(dense(x))))` (ModernBERT), on pooled rows and on every token alike.
    pub fn prediction(dense: Linear, act: HiddenAct, norm: LayerNorm, out: Linear) -> Self {
        ClassifierHead {
            dense: None,
            prediction: Some(PredictionHead { dense, act, norm }),
            out,
        }
    }

    pub fn num_labels(&self) -> usize {
        self.out.out_dim()
    }

    /// Logits for pooled sequences: fp32 `[B, H]` -> `[B, labels]`.
    pub fn forward_sequences(&self, pooled: &Tensor) -> Result<Tensor> {
        if let Some(p) = &self.prediction {
            return self.out.forward(&p.forward(pooled)?);
        }
        match &self.dense {
            Some(d) => self.out.forward(&d.dense.forward(pooled)?.tanh()?),
            None => self.out.forward(pooled),
        }
    }

    /// Logits for every token: fp32 `[T, H]` -> `[T, labels]`.
    pub fn forward_tokens(&self, hidden: &Tensor) -> Result<Tensor> {
        if let Some(p) = &self.prediction {
            return self.out.forward(&p.forward(hidden)?);
        }
        match &self.dense {
            Some(d) if !d.is_pooler => self.out.forward(&d.dense.forward(hidden)?.tanh()?),
            _ => self.out.forward(hidden),
        }
    }
}
