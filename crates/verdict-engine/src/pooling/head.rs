use candle_core::Tensor;

use crate::error::Result;
use crate::layers::{HiddenAct, LayerNorm, Linear, NamedAct};

/// A classification head, run in fp32 on pooled (or per-token) hidden states.
pub struct ClassifierHead {
    /// A hidden layer before the output projection, when the head has one.
    hidden: Option<HiddenLayer>,
    out: Linear,
}

/// `norm(act(dense(x)))`, the norm only in ModernBERT's prediction head.
struct HiddenLayer {
    dense: Linear,
    act: NamedAct,
    norm: Option<LayerNorm>,
    /// True for BERT's pooler: per-token classification skips it, as the
    /// token-classification models have no pooler.
    is_pooler: bool,
}

impl ClassifierHead {
    /// A single linear layer (`score`, `classifier`).
    pub fn linear(out: Linear) -> Self {
        ClassifierHead { hidden: None, out }
    }

    fn with_hidden(dense: Linear, act: NamedAct, norm: Option<LayerNorm>, out: Linear) -> Self {
        ClassifierHead {
            hidden: Some(HiddenLayer {
                dense,
                act,
                norm,
                is_pooler: false,
            }),
            out,
        }
    }

    /// `out(tanh(dense(x)))`.
    pub fn dense_tanh(dense: Linear, out: Linear, is_pooler: bool) -> Self {
        Self::dense_act(dense, NamedAct::Tanh, out, is_pooler)
    }

    /// `out(act(dense(x)))`, e.g. DeBERTa's `ContextPooler` with `pooler_hidden_act`.
    pub fn dense_act(dense: Linear, act: NamedAct, out: Linear, is_pooler: bool) -> Self {
        let mut head = Self::with_hidden(dense, act, None, out);
        if let Some(h) = &mut head.hidden {
            h.is_pooler = is_pooler;
        }
        head
    }

    /// `out(relu(dense(x)))`: DistilBERT's `pre_classifier` head and the reward
    /// models' `score` Sequential.
    pub fn dense_relu(dense: Linear, out: Linear) -> Self {
        Self::with_hidden(dense, NamedAct::Hidden(HiddenAct::Relu), None, out)
    }

    /// `out(norm(act(dense(x))))` (ModernBERT), on pooled rows and on every token alike.
    pub fn prediction(dense: Linear, act: HiddenAct, norm: LayerNorm, out: Linear) -> Self {
        Self::with_hidden(dense, NamedAct::Hidden(act), Some(norm), out)
    }

    pub fn num_labels(&self) -> usize {
        self.out.out_dim()
    }

    /// Logits for pooled sequences: fp32 `[B, H]` -> `[B, labels]`.
    pub fn forward_sequences(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.hidden {
            Some(h) => self.out.forward(&h.forward(pooled)?),
            None => self.out.forward(pooled),
        }
    }

    /// Logits for every token: fp32 `[T, H]` -> `[T, labels]`.
    pub fn forward_tokens(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.hidden {
            Some(h) if !h.is_pooler => self.out.forward(&h.forward(hidden)?),
            _ => self.out.forward(hidden),
        }
    }
}

impl HiddenLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.act {
            NamedAct::Tanh => self.dense.forward(x)?.tanh()?,
            NamedAct::Hidden(act) => self.dense.forward_act(x, act)?,
        };
        match &self.norm {
            Some(norm) => norm.forward(&y),
            None => Ok(y),
        }
    }
}
