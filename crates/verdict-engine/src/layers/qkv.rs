//! The query/key/value projections of a rotary-attention layer (decoders, GTE), with
//! the per-head norms and the rotary embedding that follow them.
//!
//! On the CPU these stay three linear layers, so each output is contiguous for the
//! packed CPU attention. On a GPU the three weights are concatenated at load time into
//! one `[(heads + 2 kv_heads) * d, hidden]` matrix: one matmul instead of three, and on
//! CUDA one pass after it adds the bias and rotates the query and key heads, leaving
//! q, k and v as views of one buffer that the attention kernel reads in place.
//! `VERDICT_CUDA_QKV=split` keeps three projections on the GPU too, for comparisons.

use candle_core::Tensor;

use super::{Linear, RmsNorm, RotaryEmbedding};
use crate::checkpoint::WeightPath;
use crate::error::Result;

#[derive(Debug, Clone)]
enum Projection {
    Split { q: Linear, k: Linear, v: Linear },
    Packed(Linear),
}

#[derive(Debug, Clone)]
pub struct QkvProjection {
    proj: Projection,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl QkvProjection {
    /// Loads `q_proj`, `k_proj` and `v_proj` under `att`, with biases when `bias`.
    pub fn load(
        att: &WeightPath,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let (qd, kd) = (heads * head_dim, kv_heads * head_dim);
        let proj = if split_on(att) {
            Projection::Split {
                q: Linear::load(&att.pp("q_proj"), hidden, qd, bias)?,
                k: Linear::load(&att.pp("k_proj"), hidden, kd, bias)?,
                v: Linear::load(&att.pp("v_proj"), hidden, kd, bias)?,
            }
        } else {
            let parts = [("q_proj", qd), ("k_proj", kd), ("v_proj", kd)];
            Projection::Packed(Linear::load_packed(att, &parts, hidden, bias)?)
        };
        Ok(QkvProjection {
            proj,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// Loads one fused projection stored as `[(heads + 2 kv_heads) * d, hidden]`
    /// (Phi-3's `qkv_proj`: query rows, then key rows, then value rows).
    pub fn load_fused(
        wp: &WeightPath,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let (qd, kd) = (heads * head_dim, kv_heads * head_dim);
        let weight = wp.get("weight", &[qd + 2 * kd, hidden])?;
        let bias = if bias {
            Some(wp.get("bias", &[qd + 2 * kd])?)
        } else {
            None
        };
        let proj = if split_on(wp) {
            let part = |start: usize, rows: usize| -> Result<Linear> {
                let b = match &bias {
                    Some(b) => Some(b.narrow(0, start, rows)?.contiguous()?),
                    None => None,
                };
                let lora = wp.lora_target_rows(hidden, start..start + rows);
                Ok(Linear::new(weight.narrow(0, start, rows)?.contiguous()?, b).with_lora(lora))
            };
            Projection::Split {
                q: part(0, qd)?,
                k: part(qd, kd)?,
                v: part(qd + kd, kd)?,
            }
        } else {
            let lora = wp.lora_target(hidden, qd + 2 * kd);
            Projection::Packed(Linear::new(weight, bias).with_lora(lora))
        };
        Ok(QkvProjection {
            proj,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// q `[T, heads, d]`, k and v `[T, kv_heads, d]` for `x` `[T, hidden]`: projected,
    /// through the per-head norms when given (Qwen3), and rotated with `cos`/`sin`
    /// `[T, d / 2]`.
    pub fn forward(
        &self,
        x: &Tensor,
        qk_norm: Option<(&RmsNorm, &RmsNorm)>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let t = x.dim(0)?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = match &self.proj {
            Projection::Split { q, k, v } => (
                q.forward(x)?.reshape((t, h, d))?,
                k.forward(x)?.reshape((t, kvh, d))?,
                v.forward(x)?.reshape((t, kvh, d))?,
            ),
            Projection::Packed(lin) => {
                #[cfg(feature = "cuda")]
                if qk_norm.is_none() && x.device().is_cuda() {
                    let y = lin.forward_no_bias(x)?;
                    if let Some(all) =
                        super::cuda_ops::qkv_rope(&y, lin.bias(), cos, sin, h, kvh, d)?
                    {
                        return Ok((
                            all.narrow(1, 0, h)?,
                            all.narrow(1, h, kvh)?,
                            all.narrow(1, h + kvh, kvh)?,
                        ));
                    }
                    let y = match lin.bias() {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    };
                    return split_and_rotate(&y.reshape((t, h + 2 * kvh, d))?, h, kvh, cos, sin);
                }
                let all = lin.forward(x)?.reshape((t, h + 2 * kvh, d))?;
                (
                    all.narrow(1, 0, h)?.contiguous()?,
                    all.narrow(1, h, kvh)?.contiguous()?,
                    all.narrow(1, h + kvh, kvh)?.contiguous()?,
                )
            }
        };
        let (q, k) = match qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q, k),
        };
        Ok((
            RotaryEmbedding::apply(&q, cos, sin)?,
            RotaryEmbedding::apply(&k, cos, sin)?,
            v,
        ))
    }
}

/// Three projections on the CPU (contiguous outputs for its attention), or when
/// `VERDICT_CUDA_QKV=split` asks for them.
fn split_on(wp: &WeightPath) -> bool {
    wp.weights().device().is_cpu() || std::env::var("VERDICT_CUDA_QKV").is_ok_and(|v| v == "split")
}

/// q, k and v copied out of a `[T, heads + 2 kv_heads, d]` projection, q and k rotated.
#[cfg(feature = "cuda")]
fn split_and_rotate(
    all: &Tensor,
    h: usize,
    kvh: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let q = all.narrow(1, 0, h)?.contiguous()?;
    let k = all.narrow(1, h, kvh)?.contiguous()?;
    let v = all.narrow(1, h + kvh, kvh)?.contiguous()?;
    Ok((
        RotaryEmbedding::apply(&q, cos, sin)?,
        RotaryEmbedding::apply(&k, cos, sin)?,
        v,
    ))
}
