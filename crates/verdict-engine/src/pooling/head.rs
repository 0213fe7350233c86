use candle_core::Tensor;

use crate::error::Result;
use crate::layers::Linear;

/// A classification head, run in fp32 on pooled (or per-token) hidden states.
pub struct ClassifierHead {
    /// A hidden layer before the output projection, when the head has one.
    hidden: Option<HiddenLayer>,
    out: Linear,
}

struct HiddenLayer {
    dense: Linear,
    act: HeadAct,
    /// True for BERT's pooler: per-token classification skips it, as the
    /// token-classification models have no pooler.
    is_pooler: bool,
}

#[derive(Clone, Copy)]
enum HeadAct {
    Tanh,
    Relu,
}

impl ClassifierHead {
    /// A single linear layer (`score`, `classifier`).
    pub fn linear(out: Linear) -> Self {
        ClassifierHead { hidden: None, out }
    }

    /// `out(tanh(dense(x)))`.
    pub fn dense_tanh(dense: Linear, out: Linear, is_pooler: bool) -> Self {
        ClassifierHead {
            hidden: Some(HiddenLayer {
                dense,
                act: HeadAct::Tanh,
                is_pooler,
            }),
            out,
        }
    }

    /// `out(relu(dense(x)))`: DistilBERT's `pre_classifier` head and the reward models' `score` Sequential.
    pub fn dense_relu(dense: Linear, out: Linear) -> Self {
        ClassifierHead {
            hidden: Some(HiddenLayer {
                dense,
                act: HeadAct::Relu,
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
        let y = self.dense.forward(x)?;
        Ok(match self.act {
            HeadAct::Tanh => y.tanh()?,
            HeadAct::Relu => y.relu()?,
        })
    }
}
