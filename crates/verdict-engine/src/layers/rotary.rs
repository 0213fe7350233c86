use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::HfConfig;
use crate::error::{EngineError, Result};

/// Rotary position embedding (rotate-half layout, as Llama/Qwen/Mistral in transformers).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// Multiplies cos/sin (YaRN's mscale); 1.0 otherwise.
    attention_scaling: f32,
    /// On a GPU: cos/sin for positions 0..n, built on first use, so a batch
    /// uploads its positions rather than tables computed on the host.
    device_tables: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

impl RotaryEmbedding {
    /// Plain RoPE over the whole head with base `base` (for models that read
    /// their bases from their own config keys, like ModernBERT's global and local ones).
    pub fn with_base(base: f32, head_dim: usize) -> Self {
        RotaryEmbedding {
            inv_freq: (0..head_dim)
                .step_by(2)
                .map(|i| 1.0f32 / base.powf(i as f32 / head_dim as f32))
                .collect(),
            attention_scaling: 1.0,
            device_tables: Arc::default(),
        }
    }

    /// Builds the frequencies from `rope_theta`, `partial_rotary_factor` and
    /// `rope_scaling`, or from `rope_parameters` (how transformers v5 writes them).
    pub fn from_config(cfg: &HfConfig, head_dim: usize) -> Result<Self> {
        let params = cfg.get("rope_parameters").and_then(|v| v.as_object());
        let param = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
        let base = cfg
            .f64("rope_theta")
            .or_else(|| param("rope_theta"))
            .unwrap_or(10000.0) as f32;
        let partial = cfg
            .f64("partial_rotary_factor")
            .or_else(|| param("partial_rotary_factor"))
            .unwrap_or(1.0);
        let dim = ((head_dim as f64) * partial) as usize;
        if dim != head_dim {
            return Err(EngineError::Config(
                "partial_rotary_factor < 1 is not supported".into(),
            ));
        }
        let mut inv_freq = Self::with_base(base, dim).inv_freq;
        let mut attention_scaling = 1.0f32;
        let scaling = cfg
            .get("rope_scaling")
            .and_then(|v| v.as_object())
            .or(params);
        if let Some(scaling) = scaling {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            let num = |k: &str| scaling.get(k).and_then(|v| v.as_f64());
            let factor = num("factor").unwrap_or(1.0) as f32;
            match kind {
                // M-RoPE only changes which position each frequency reads (`cos_sin_mrope`).
                "default" | "mrope" => {}
                "linear" => inv_freq.iter_mut().for_each(|f| *f /= factor),
                "llama3" => {
                    let low = num("low_freq_factor").unwrap_or(1.0) as f32;
                    let high = num("high_freq_factor").unwrap_or(4.0) as f32;
                    let old_ctx = num("original_max_position_embeddings").unwrap_or(8192.0) as f32;
                    let low_wavelen = old_ctx / low;
                    let high_wavelen = old_ctx / high;
                    for f in inv_freq.iter_mut() {
                        let wavelen = 2.0 * std::f32::consts::PI / *f;
                        let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        *f = if medium {
                            let smooth = (old_ctx / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        };
                    }
                }
                "yarn" => {
                    let orig = num("original_max_position_embeddings")
                        .or_else(|| cfg.f64("max_position_embeddings"))
                        .unwrap_or(2048.0) as f32;
                    let beta_fast = num("beta_fast").unwrap_or(32.0) as f32;
                    let beta_slow = num("beta_slow").unwrap_or(1.0) as f32;
                    attention_scaling = num("attention_factor")
                        .map(|v| v as f32)
                        .unwrap_or_else(|| {
                            if factor <= 1.0 {
                                1.0
                            } else {
                                0.1 * factor.ln() + 1.0
                            }
                        });
                    let correction_dim = |rot: f32| {
                        (dim as f32 * (orig / (rot * 2.0 * std::f32::consts::PI)).ln())
                            / (2.0 * base.ln())
                    };
                    let low = correction_dim(beta_fast).floor().max(0.0);
                    let high = correction_dim(beta_slow).ceil().min(dim as f32 - 1.0);
                    let high = if low == high { high + 0.001 } else { high };
                    for (i, f) in inv_freq.iter_mut().enumerate() {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let interpolation = *f / factor;
                        *f = interpolation * (1.0 - extrapolation_factor) + *f * extrapolation_factor;
                    }
                }
                // GTE's fixed/mixed NTK scaling (its remote code, as vLLM's `ntk`): fixed
                // raises the base by `factor` and divides every frequency by
                // factor^(2/dim); mixed divides frequency i by exp(a (i+1)^b) instead,
                // a = ln(factor) / (dim/2)^b. The remote code rescales only when the
                // scaled length exceeds max_position_embeddings, i.e. factor > 1.
                "ntk" if factor > 1.0 => match num("mixed_b") {
                    None => {
                        let scaled_base = base * factor;
                        let shrink = factor.powf(2.0 / dim as f32);
                        for (i, f) in inv_freq.iter_mut().enumerate() {
                            *f = 1.0 / scaled_base.powf((2 * i) as f32 / dim as f32) / shrink;
                        }
                    }
                    Some(b) => {
                        let a = factor.ln() / (dim as f32 / 2.0).powf(b as f32);
                        for (i, f) in inv_freq.iter_mut().enumerate() {
                            *f /= (a * ((i + 1) as f32).powf(b as f32)).exp();
                        }
                    }
                },
                "ntk" => {}
                other => {
                    return Err(EngineError::Config(format!(
                        "unsupported rope_scaling type `{other}` (supported: default, linear, llama3, yarn, ntk)"
                    )))
                }
            }
        }
        Ok(RotaryEmbedding {
            inv_freq,
            attention_scaling,
            device_tables: Arc::default(),
        })
    }

    /// cos and sin tables `[T, head_dim/2]` for per-token positions.
    pub fn cos_sin(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        if !device.is_cpu() {
            return self.cos_sin_from_table(positions, dtype, device);
        }
        self.cos_sin_host(positions, dtype, device)
    }

    fn cos_sin_from_table(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let need = positions.iter().max().map_or(1, |&p| p as usize + 1);
        let mut tables = self.device_tables.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match tables.as_ref() {
            Some((cos, _)) => {
                cos.dim(0)? >= need && cos.dtype() == dtype && cos.device().same_device(device)
            }
            None => false,
        };
        if !fresh {
            let all: Vec<u32> = (0..need.next_multiple_of(4096) as u32).collect();
            *tables = Some(self.cos_sin_host(&all, dtype, device)?);
        }
        let (cos, sin) = tables.as_ref().expect("tables were just built");
        let idx = Tensor::from_slice(positions, positions.len(), device)?;
        Ok((cos.index_select(&idx, 0)?, sin.index_select(&idx, 0)?))
    }

    /// Multimodal RoPE (Qwen2-VL): each token has (temporal, height, width)
    /// positions, and frequency `i` reads the axis whose `sections` span holds it.
    pub fn cos_sin_mrope(
        &self,
        positions: &[[u32; 3]],
        sections: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        if sections.iter().sum::<usize>() != half {
            return Err(EngineError::Config(format!(
                "mrope_section {sections:?} must add up to head_dim / 2 = {half}"
            )));
        }
        let axis_of: Vec<usize> = sections
            .iter()
            .enumerate()
            .flat_map(|(axis, &n)| std::iter::repeat_n(axis % 3, n))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for (f, &axis) in self.inv_freq.iter().zip(&axis_of) {
                let angle = p[axis] as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        upload_tables(cos, sin, (positions.len(), half), dtype, device)
    }

    fn cos_sin_host(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        upload_tables(cos, sin, (positions.len(), half), dtype, device)
    }

    /// Rotates `x` laid out `[T, heads, head_dim]`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?.contiguous()?;
        Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)?)
    }
}

/// Host-built cos/sin tables as tensors of the model's dtype on its device.
fn upload_tables(
    cos: Vec<f32>,
    sin: Vec<f32>,
    shape: (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let to = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    Ok((to(cos)?, to(sin)?))
}
