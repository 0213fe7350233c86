//! Building blocks shared by the model families: linear layers, norms,
//! activations, rotary embeddings and packed attention.

mod attention;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda_attention;
#[cfg(feature = "cuda")]
mod cuda_ops;
mod disentangled;
mod qkv;
mod rotary;
mod simd;

pub use attention::{packed_attention, packed_attention_capped, AttentionMask};
#[cfg(feature = "cuda")]
pub(crate) use cuda_ops::{add_matmul_in_place, segmented_low_rank};
pub use disentangled::{
    disentangled_attention, DisentangledPlan, PositionProjections, RelativePositions,
};
pub use qkv::QkvProjection;
pub use rotary::RotaryEmbedding;

use candle_core::{DType, Module, Tensor};

use crate::checkpoint::WeightPath;
use crate::error::{EngineError, Result};
use crate::lora::{TargetId, TargetPart, TargetSpec};

/// Prepares a device for serving (see `cuda_ops::configure_device`); nothing on the CPU.
pub fn configure_device(device: &candle_core::Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        return cuda_ops::configure_device(dev);
    }
    let _ = device;
    Ok(())
}

/// `y = x W^T + b` with `W` given as `[out, in]` like torch.nn.Linear.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The bias as plain floats for the CPU fast path.
    cpu_bias: Option<Vec<f32>>,
    /// Set when LoRA adapters may adapt this layer (see `crate::lora`).
    lora: Option<TargetId>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// `[out, in]`, as the checkpoint stores it.
    OutIn(Tensor),
    /// `[in, out]` contiguous, for f32 on the CPU: gemm then reads the weight
    /// in place instead of repacking all of it on every call.
    InOut(Tensor),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let on_cpu_f32 = weight.device().is_cpu() && weight.dtype() == DType::F32;
        let weight = match on_cpu_f32.then(|| weight.t().and_then(|t| t.contiguous())) {
            Some(Ok(t)) => LinearWeight::InOut(t),
            _ => LinearWeight::OutIn(weight),
        };
        Self::with_weight(weight, bias)
    }

    fn with_weight(weight: LinearWeight, bias: Option<Tensor>) -> Self {
        let cpu_bias = bias
            .as_ref()
            .filter(|b| b.device().is_cpu() && b.dtype() == DType::F32)
            .and_then(|b| b.to_vec1::<f32>().ok());
        Linear {
            weight,
            bias,
            cpu_bias,
            lora: None,
        }
    }

    /// Marks the layer as a LoRA target (a no-op for `None`).
    pub fn with_lora(mut self, target: Option<TargetId>) -> Self {
        self.lora = target;
        self
    }

    pub fn load(wp: &WeightPath, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias {
            Some(wp.get("bias", &[out_dim])?)
        } else {
            None
        };
        let w = wp.weights();
        let lora = wp.lora_target(in_dim, out_dim);
        if w.device().is_cpu() && w.dtype() == DType::F32 {
            let wt = wp.get_transposed_f32("weight", out_dim, in_dim)?;
            return Ok(Self::with_weight(LinearWeight::InOut(wt), bias).with_lora(lora));
        }
        let weight = wp.get("weight", &[out_dim, in_dim])?;
        Ok(Linear::new(weight, bias).with_lora(lora))
    }

    /// Two layers stored as one (Phi-3's `gate_up_proj`): the first `out_dim` rows
    /// of the weight are the first layer, the next `out_dim` the second.
    pub fn load_halves(
        wp: &WeightPath,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<(Self, Self)> {
        let weight = wp.get("weight", &[2 * out_dim, in_dim])?;
        let bias = if bias {
            Some(wp.get("bias", &[2 * out_dim])?)
        } else {
            None
        };
        let half = |i: usize| -> Result<Self> {
            let b = match &bias {
                Some(b) => Some(b.narrow(0, i * out_dim, out_dim)?.contiguous()?),
                None => None,
            };
            let w = weight.narrow(0, i * out_dim, out_dim)?.contiguous()?;
            let rows = i * out_dim..(i + 1) * out_dim;
            Ok(Linear::new(w, b).with_lora(wp.lora_target_rows(in_dim, rows)))
        };
        Ok((half(0)?, half(1)?))
    }

    /// Modules under `parent` that read the same input, as one layer: `parts` are
    /// (name, output rows), their weights (and biases, with `bias`) stacked in that
    /// order. LoRA adapts each part's rows of the output.
    pub fn load_packed(
        parent: &WeightPath,
        parts: &[(&str, usize)],
        in_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for &(name, rows) in parts {
            let p = parent.pp(name);
            weights.push(p.get("weight", &[rows, in_dim])?);
            if bias {
                biases.push(p.get("bias", &[rows])?);
            }
        }
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if bias {
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        let lora = parent.weights().register_lora_target(|| {
            let mut target_parts = Vec::with_capacity(parts.len());
            let mut offset = 0;
            for &(name, rows) in parts {
                target_parts.push(TargetPart {
                    module: parent.pp(name).module_name()?,
                    module_rows: 0..rows,
                    offset,
                });
                offset += rows;
            }
            Some(TargetSpec {
                in_dim,
                out_dim: offset,
                parts: target_parts,
            })
        });
        Ok(Linear::new(weight, bias).with_lora(lora))
    }

    /// Loads a linear layer with a bias when the checkpoint has one.
    pub fn load_optional_bias(wp: &WeightPath, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::load(wp, in_dim, out_dim, wp.contains("bias"))
    }

    /// Loads in a given dtype (classification heads stay in fp32).
    pub fn load_as(
        wp: &WeightPath,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Self> {
        let weight = wp.get_as("weight", &[out_dim, in_dim], dtype)?;
        let bias = if bias {
            Some(wp.get_as("bias", &[out_dim], dtype)?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }

    /// GPT-2's Conv1D stores `[in, out]`, the CPU layout already.
    pub fn load_conv1d(wp: &WeightPath, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = wp.get("weight", &[in_dim, out_dim])?;
        let bias = Some(wp.get("bias", &[out_dim])?);
        if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            return Ok(Self::with_weight(LinearWeight::InOut(weight), bias));
        }
        Ok(Linear::new(weight.t()?, bias))
    }

    pub fn out_dim(&self) -> usize {
        match &self.weight {
            LinearWeight::OutIn(w) => w.dims()[0],
            LinearWeight::InOut(w) => w.dims()[1],
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_inner(x, None)
    }

    /// `x W^T` (plus the adapters' update) without the bias, for callers that fuse
    /// the bias into a later pass.
    #[cfg(feature = "cuda")]
    pub(crate) fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        match self.adapted(x)? {
            Some(y) => Ok(y),
            None => self.matmul(x),
        }
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::InOut(wt) => x.matmul(wt)?,
            LinearWeight::OutIn(w) => x.matmul(&w.t()?)?,
        })
    }

    /// `x W^T` with the updates of the adapters of the rows being run, when one
    /// adapts this layer.
    fn adapted(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(target) = self.lora else {
            return Ok(None);
        };
        let weight_t = match &self.weight {
            LinearWeight::OutIn(w) if w.is_contiguous() => Some(w.t()?),
            _ => None,
        };
        crate::lora::adapted_matmul(target, x, weight_t.as_ref(), || self.matmul(x))
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `act(x W^T + b)`; on the CPU the activation is fused into the output pass.
    pub fn forward_act(&self, x: &Tensor, act: HiddenAct) -> Result<Tensor> {
        self.forward_inner(x, Some(act))
    }

    fn forward_inner(&self, x: &Tensor, act: Option<HiddenAct>) -> Result<Tensor> {
        if let Some(y) = self.adapted(x)? {
            return self.bias_act(y, act);
        }
        if let LinearWeight::InOut(wt) = &self.weight {
            if let Some(y) = cpu::linear_f32(x, wt, self.cpu_bias.as_deref(), act)? {
                return Ok(y);
            }
        }
        self.bias_act(self.matmul(x)?, act)
    }

    /// `act(y + b)`, in one pass on CUDA.
    fn bias_act(&self, y: Tensor, act: Option<HiddenAct>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if y.device().is_cuda() && (self.bias.is_some() || act.is_some()) {
            if let Some(out) = cuda_ops::bias_act(&y, self.bias.as_ref(), act)? {
                return Ok(out);
            }
        }
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match act {
            Some(a) => a.forward(&y),
            None => Ok(y),
        }
    }
}

/// `act(gate(x)) * up(x)`, the gated MLP's first half; one fused pass after the two
/// matmuls on CUDA and on the CPU.
pub fn gated_mlp(gate: &Linear, up: &Linear, x: &Tensor, act: HiddenAct) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda_ops::act_mul(&gate.forward(x)?, &up.forward(x)?, act);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let (g, u) = (gate.forward(x)?, up.forward(x)?);
        if let Some(out) = cpu::act_mul_f32(&g, &u, act)? {
            return Ok(out);
        }
        return Ok((act.forward(&g)? * u)?);
    }
    Ok((gate.forward_act(x, act)? * up.forward(x)?)?)
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Accepts `weight/bias` and the legacy `gamma/beta` names.
    pub fn load(wp: &WeightPath, dim: usize, eps: f64) -> Result<Self> {
        let (w, b) = if !wp.contains("weight") && wp.contains("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(LayerNorm {
            weight: wp.get(w, &[dim])?,
            bias: wp.get(b, &[dim])?,
            eps: eps as f32,
        })
    }

    /// Loads in a given dtype; without `bias` (`norm_bias: false`) the bias is zero.
    pub fn load_as(
        wp: &WeightPath,
        dim: usize,
        eps: f64,
        bias: bool,
        dtype: DType,
    ) -> Result<Self> {
        let weight = wp.get_as("weight", &[dim], dtype)?;
        let bias = if bias {
            wp.get_as("bias", &[dim], dtype)?
        } else {
            weight.zeros_like()?
        };
        Ok(LayerNorm {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.cuda(x, None, None, false)? {
            return Ok(y.normed);
        }
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }

    /// `norm(x + delta)`, the step of a post-norm block; one pass on CUDA.
    pub fn forward_add(&self, x: &Tensor, delta: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.cuda(x, Some(delta), None, false)? {
            return Ok(y.normed);
        }
        self.forward(&(x + delta)?)
    }

    /// `norm(residual + linear(input))`, a post-norm block's output step; on CUDA the
    /// linear layer's bias joins the norm's pass instead of taking its own.
    pub fn forward_add_linear(
        &self,
        residual: &Tensor,
        linear: &Linear,
        input: &Tensor,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if residual.device().is_cuda() {
            let delta = linear.forward_no_bias(input)?;
            if let Some(y) = self.cuda(residual, Some(&delta), linear.bias(), false)? {
                return Ok(y.normed);
            }
            return self.forward_add(residual, &linear.bias_act(delta, None)?);
        }
        self.forward_add(residual, &linear.forward(input)?)
    }

    /// `(x + delta, norm(x + delta))`, the residual step of a pre-norm block; one pass
    /// on CUDA.
    pub fn forward_residual(&self, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(cuda_ops::AddNorm {
            sum: Some(sum),
            normed,
        }) = self.cuda(x, Some(delta), None, true)?
        {
            return Ok((sum, normed));
        }
        let sum = (x + delta)?;
        let y = self.forward(&sum)?;
        Ok((sum, y))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        delta_bias: Option<&Tensor>,
        keep_sum: bool,
    ) -> Result<Option<cuda_ops::AddNorm>> {
        if !x.device().is_cuda() {
            return Ok(None);
        }
        let kind = cuda_ops::NormKind::Layer {
            bias: Some(&self.bias),
        };
        cuda_ops::add_norm(x, delta, delta_bias, keep_sum, &self.weight, kind, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
    /// Gemma scales by `(1 + w)` and computes the whole norm in fp32: this is
    /// `1 + w` in fp32 for the non-CUDA path (the CUDA kernel adds the 1 itself).
    unit_offset: Option<Tensor>,
}

impl RmsNorm {
    pub fn load(wp: &WeightPath, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: wp.get("weight", &[dim])?,
            eps: eps as f32,
            unit_offset: None,
        })
    }

    /// Gemma's norm: `x / rms(x) * (1 + w)`, all in fp32, rounded once at the end.
    pub fn load_unit_offset(wp: &WeightPath, dim: usize, eps: f64) -> Result<Self> {
        let weight = wp.get("weight", &[dim])?;
        let unit_offset = Some((weight.to_dtype(DType::F32)? + 1.0)?);
        Ok(RmsNorm {
            weight,
            eps: eps as f32,
            unit_offset,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let kind = cuda_ops::NormKind::Rms {
                w_offset: self.w_offset(),
            };
            if let Some(y) = cuda_ops::add_norm(x, None, None, false, &self.weight, kind, self.eps)?
            {
                return Ok(y.normed);
            }
        }
        match &self.unit_offset {
            Some(w) => Ok(
                candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, w, self.eps)?
                    .to_dtype(x.dtype())?,
            ),
            None => Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?),
        }
    }

    #[cfg(feature = "cuda")]
    fn w_offset(&self) -> f32 {
        if self.unit_offset.is_some() {
            1.0
        } else {
            0.0
        }
    }

    /// The residual step of a pre-norm block: `(x + delta, norm(x + delta))`, in one
    /// pass on CUDA.
    pub fn forward_residual(&self, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let kind = cuda_ops::NormKind::Rms {
                w_offset: self.w_offset(),
            };
            if let Some(cuda_ops::AddNorm {
                sum: Some(sum),
                normed,
            }) = cuda_ops::add_norm(x, Some(delta), None, true, &self.weight, kind, self.eps)?
            {
                return Ok((sum, normed));
            }
        }
        let sum = (x + delta)?;
        let y = self.forward(&sum)?;
        Ok((sum, y))
    }
}

/// Rows of the MLP computed at once: its intermediate activations are the
/// largest buffers of a forward pass (tokens × intermediate_size), so a large
/// batch runs its MLP in slices of this many tokens to bound peak memory.
pub const MLP_ROWS: usize = 1024;

/// Applies a row-wise function in slices of `MLP_ROWS` rows (one call when the
/// input is small), concatenating the results. GPUs run it in one call: their
/// memory holds the whole batch, and slicing would cost matmul efficiency and a copy.
pub fn in_row_chunks(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let rows = x.dim(0)?;
    if rows <= MLP_ROWS || !x.device().is_cpu() {
        return f(x);
    }
    let mut outs = Vec::with_capacity(rows.div_ceil(MLP_ROWS));
    for start in (0..rows).step_by(MLP_ROWS) {
        let chunk = x.narrow(0, start, MLP_ROWS.min(rows - start))?;
        // LoRA updates find their rows by position in the batch.
        outs.push(crate::lora::offset_rows(start, || f(&chunk))?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// `norm(x + down(act(up(x))))`, a post-norm block's feed-forward step: on the CPU in
/// row chunks (bounding the intermediate activations), elsewhere in one call with
/// `down`'s bias inside the norm's pass.
pub fn post_norm_mlp(
    norm: &LayerNorm,
    up: &Linear,
    down: &Linear,
    act: HiddenAct,
    x: &Tensor,
) -> Result<Tensor> {
    if x.device().is_cpu() {
        let ffn = in_row_chunks(x, |rows| down.forward(&up.forward_act(rows, act)?))?;
        return norm.forward_add(&ffn, x);
    }
    norm.forward_add_linear(x, down, &up.forward_act(x, act)?)
}

/// Hidden activations by their transformers `hidden_act` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// Exact (erf) GELU: transformers' "gelu".
    Gelu,
    /// tanh-approximated GELU: "gelu_new", "gelu_pytorch_tanh", "gelu_fast".
    GeluTanh,
    Silu,
    Relu,
}

impl HiddenAct {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => HiddenAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => HiddenAct::GeluTanh,
            "silu" | "swish" => HiddenAct::Silu,
            "relu" => HiddenAct::Relu,
            other => {
                return Err(EngineError::Config(format!(
                    "unsupported hidden_act `{other}` (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, swish, relu)"
                )))
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            HiddenAct::Gelu => x.gelu_erf()?,
            HiddenAct::GeluTanh => x.gelu()?,
            HiddenAct::Silu => candle_nn::Activation::Silu.forward(x)?,
            HiddenAct::Relu => x.relu()?,
        })
    }
}

/// An activation a config names for a side branch (DeBERTa's `pooler_hidden_act`,
/// `conv_act`): any hidden activation, or tanh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedAct {
    Tanh,
    Hidden(HiddenAct),
}

impl NamedAct {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "tanh" => Ok(NamedAct::Tanh),
            other => HiddenAct::from_name(other)
                .map(NamedAct::Hidden)
                .map_err(|_| {
                    EngineError::Config(format!(
                        "unsupported activation `{other}` (supported: tanh, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, swish, relu)"
                    ))
                }),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            NamedAct::Tanh => Ok(x.tanh()?),
            NamedAct::Hidden(act) => act.forward(x),
        }
    }
}
