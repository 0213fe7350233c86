use candle_core::Tensor;

use crate::error::Result;
use crate::layers::Linear;

/// A classification head, run in fp32 on pooled (or per-token) hidden states.
pub struct ClassifierHead {
    /// BERT's pooler or RoBERTa's `classifier.dense`, followed by tanh.
    dense: Option<DenseTanh>,
    out: Linear,
    /// `classifier_from_token` on an LM whose logits are soft-capped.
    capped: Option<SoftCappedTokens>,
}

/// The LM logits of the chosen tokens capped to `cap * tanh(l / cap)`, as
/// transformers' `*ForCausalLM` returns them (Gemma-2's `final_logit_softcapping`);
/// with `two_way` the single label is then `capped[1] - capped[0]`.
struct SoftCappedTokens {
    cap: f64,
    two_way: bool,
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
            out,
            capped: None,
        }
    }

    /// LM-head rows of the `classifier_from_token` tokens whose logits are
    /// soft-capped, then used as they are or (`two_way`) as `second - first`.
    pub fn soft_capped_tokens(rows: Linear, cap: f64, two_way: bool) -> Self {
        ClassifierHead {
            dense: None,
            out: rows,
            capped: Some(SoftCappedTokens { cap, two_way }),
        }
    }

    /// `out(tanh(dense(x)))`.
    pub fn dense_tanh(dense: Linear, out: Linear, is_pooler: bool) -> Self {
        ClassifierHead {
            dense: Some(DenseTanh { dense, is_pooler }),
            out,
            capped: None,
        }
    }

    pub fn num_labels(&self) -> usize {
        match &self.capped {
            Some(c) if c.two_way => 1,
            _ => self.out.out_dim(),
        }
    }

    /// Logits for pooled sequences: fp32 `[B, H]` -> `[B, labels]`.
    pub fn forward_sequences(&self, pooled: &Tensor) -> Result<Tensor> {
        let logits = match &self.dense {
            Some(d) => self.out.forward(&d.dense.forward(pooled)?.tanh()?)?,
            None => self.out.forward(pooled)?,
        };
        self.cap(logits)
    }

    /// Logits for every token: fp32 `[T, H]` -> `[T, labels]`.
    pub fn forward_tokens(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.dense {
            Some(d) if !d.is_pooler => self.out.forward(&d.dense.forward(hidden)?.tanh()?)?,
            _ => self.out.forward(hidden)?,
        };
        self.cap(logits)
    }

    fn cap(&self, logits: Tensor) -> Result<Tensor> {
        let Some(c) = &self.capped else {
            return Ok(logits);
        };
        let capped = ((logits / c.cap)?.tanh()? * c.cap)?;
        if !c.two_way {
            return Ok(capped);
        }
        Ok((capped.narrow(1, 1, 1)? - capped.narrow(1, 0, 1)?)?)
    }
}
