use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::HfConfig;
use crate::error::{EngineError, Result};

type Params = serde_json::Map<String, serde_json::Value>;

/// Rotary position embedding (rotate-half layout, as Llama/Qwen/Mistral in transformers).
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// Multiplies cos/sin (YaRN's mscale, LongRoPE's attention factor); 1.0 otherwise.
    attention_scaling: f32,
    /// LongRoPE (Phi-3): the frequencies for sequences longer than the original context.
    long: Option<LongFrequencies>,
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
            long: None,
            device_tables: Arc::default(),
        }
    }

    /// Builds the frequencies from `rope_theta`, `partial_rotary_factor` and
    /// `rope_scaling`, or from `rope_parameters` (how transformers v5 writes them).
    pub fn from_config(cfg: &HfConfig, head_dim: usize) -> Result<Self> {
        let params = cfg.get("rope_parameters").and_then(|v| v.as_object());
        let param = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
        let base = cfg.f64("rope_theta").or_else(|| param("rope_theta"));
        let scaling = cfg
            .get("rope_scaling")
            .and_then(|v| v.as_object())
            .or(params);
        Self::build(cfg, head_dim, base, scaling)
    }

    /// The rotary of one attention kind of a model that keeps one per kind (Gemma-3):
    /// transformers v5 writes `rope_parameters` keyed by layer type; older configs
    /// give full attention `rope_theta`/`rope_scaling` and sliding layers plain RoPE
    /// over `rope_local_base_freq`.
    pub fn for_layer_type(cfg: &HfConfig, head_dim: usize, layer_type: &str) -> Result<Self> {
        let per_type = cfg
            .get("rope_parameters")
            .and_then(|p| p.get(layer_type))
            .and_then(|v| v.as_object());
        match per_type {
            Some(params) => {
                let base = params.get("rope_theta").and_then(|v| v.as_f64());
                Self::build(cfg, head_dim, base, Some(params))
            }
            None if layer_type == "sliding_attention" => {
                let base = cfg.f64("rope_local_base_freq").or(Some(10000.0));
                Self::build(cfg, head_dim, base, None)
            }
            None => Self::from_config(cfg, head_dim),
        }
    }

    fn build(
        cfg: &HfConfig,
        head_dim: usize,
        base: Option<f64>,
        scaling: Option<&Params>,
    ) -> Result<Self> {
        let base = base.unwrap_or(10000.0) as f32;
        let partial = cfg
            .f64("partial_rotary_factor")
            .or_else(|| scaling.and_then(|p| p.get("partial_rotary_factor")?.as_f64()))
            .unwrap_or(1.0);
        // Partial rotary (Phi-4-mini's 0.75): the first `dim` features of a head rotate.
        let dim = ((head_dim as f64) * partial) as usize;
        if dim == 0 || dim > head_dim || !dim.is_multiple_of(2) {
            return Err(EngineError::Config(format!(
                "partial_rotary_factor {partial} gives a rotary dim of {dim} for head_dim {head_dim} (must be even, 2..=head_dim)"
            )));
        }
        let mut inv_freq = Self::with_base(base, dim).inv_freq;
        let mut attention_scaling = 1.0f32;
        let mut long = None;
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
                "longrope" | "su" => {
                    let (short, lr, factor) = longrope(cfg, scaling, &inv_freq)?;
                    inv_freq = short;
                    attention_scaling = factor;
                    long = Some(lr);
                }
                other => {
                    return Err(EngineError::Config(format!(
                        "unsupported rope_scaling type `{other}` (supported: default, linear, llama3, yarn, ntk, longrope)"
                    )))
                }
            }
        }
        Ok(RotaryEmbedding {
            inv_freq,
            attention_scaling,
            long,
            device_tables: Arc::default(),
        })
    }

    /// Per token, whether it reads LongRoPE's long frequencies: every token of a
    /// sequence longer than the original context does, as transformers picks the
    /// factors from the longest position it is given (one sequence at a time).
    /// Sequences are told apart by their positions restarting at 0.
    fn long_tokens(&self, positions: &[u32]) -> Option<Vec<bool>> {
        let long = self.long.as_ref()?;
        let mut flags = vec![false; positions.len()];
        let mut start = 0;
        while start < positions.len() {
            let end = positions[start + 1..]
                .iter()
                .position(|&p| p == 0)
                .map_or(positions.len(), |i| start + 1 + i);
            let seq_len = positions[start..end]
                .iter()
                .max()
                .map_or(0, |&p| p as usize + 1);
            if seq_len > long.original_max {
                flags[start..end].iter_mut().for_each(|f| *f = true);
            }
            start = end;
        }
        Some(flags)
    }

    /// The frequencies for one token (LongRoPE's long set where `long` says so).
    fn freqs(&self, long: Option<&[bool]>, token: usize) -> &[f32] {
        match (&self.long, long) {
            (Some(lr), Some(flags)) if flags[token] => &lr.inv_freq,
            _ => &self.inv_freq,
        }
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
        // With LongRoPE the table holds the short rows, then as many long rows.
        let sets = if self.long.is_some() { 2 } else { 1 };
        let mut tables = self.device_tables.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match tables.as_ref() {
            Some((cos, _)) => {
                cos.dim(0)? >= need * sets
                    && cos.dtype() == dtype
                    && cos.device().same_device(device)
            }
            None => false,
        };
        if !fresh {
            let rows = need.next_multiple_of(4096);
            let all: Vec<u32> = (0..rows as u32).collect();
            let half = self.inv_freq.len();
            // The short rows by position alone: read as one sequence, positions
            // past LongRoPE's original context would pick the long frequencies.
            let (cos, sin) = self.cos_sin_rows(&all, None)?;
            let (cos, sin) = upload_tables(cos, sin, (rows, half), dtype, device)?;
            *tables = Some(match &self.long {
                Some(_) => {
                    let (lcos, lsin) = self.cos_sin_rows(&all, Some(&vec![true; rows]))?;
                    let (lcos, lsin) = upload_tables(lcos, lsin, (rows, half), dtype, device)?;
                    (Tensor::cat(&[cos, lcos], 0)?, Tensor::cat(&[sin, lsin], 0)?)
                }
                None => (cos, sin),
            });
        }
        let (cos, sin) = tables.as_ref().expect("tables were just built");
        let rows = cos.dim(0)? / sets;
        let index: Vec<u32> = match self.long_tokens(positions) {
            Some(flags) => positions
                .iter()
                .zip(flags)
                .map(|(&p, long)| if long { p + rows as u32 } else { p })
                .collect(),
            None => positions.to_vec(),
        };
        let idx = Tensor::from_slice(&index, index.len(), device)?;
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
        let long = self.long_tokens(positions);
        let (cos, sin) = self.cos_sin_rows(positions, long.as_deref())?;
        let half = self.inv_freq.len();
        upload_tables(cos, sin, (positions.len(), half), dtype, device)
    }

    /// cos and sin values `[T * head_dim/2]`, each token with its frequency set.
    fn cos_sin_rows(
        &self,
        positions: &[u32],
        long: Option<&[bool]>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for (token, &p) in positions.iter().enumerate() {
            for &f in self.freqs(long, token) {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        Ok((cos, sin))
    }

    /// Rotates `x` laid out `[T, heads, head_dim]`; with tables narrower than half a
    /// head (partial rotary) only the first features rotate, the rest pass through.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rot, d) = (2 * cos.dim(1)?, x.dim(2)?);
        if rot < d {
            let rotated = Self::apply(&x.narrow(2, 0, rot)?, cos, sin)?;
            return Ok(Tensor::cat(&[&rotated, &x.narrow(2, rot, d - rot)?], 2)?);
        }
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

/// LongRoPE's second frequency set.
#[derive(Debug, Clone)]
struct LongFrequencies {
    inv_freq: Vec<f32>,
    /// Sequences longer than this use `inv_freq`.
    original_max: usize,
}

/// LongRoPE (`longrope`, Phi-3's `su`) as transformers computes it: each base
/// frequency divided by `short_factor[i]` or `long_factor[i]`, and cos/sin scaled by
/// `attention_factor` (default `sqrt(1 + ln(factor) / ln(original))`, `factor`
/// defaulting to `max_position_embeddings / original_max_position_embeddings`).
/// Returns (short frequencies, long set, attention factor).
fn longrope(
    cfg: &HfConfig,
    scaling: &Params,
    base_freq: &[f32],
) -> Result<(Vec<f32>, LongFrequencies, f32)> {
    let list = |key: &str| -> Result<Vec<f32>> {
        let values = scaling
            .get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| EngineError::Config(format!("longrope rope_scaling needs `{key}`")))?;
        let out: Option<Vec<f32>> = values
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32))
            .collect();
        match out {
            Some(out) if out.len() == base_freq.len() => Ok(out),
            _ => Err(EngineError::Config(format!(
                "longrope `{key}` must be {} numbers (rotary dim / 2)",
                base_freq.len()
            ))),
        }
    };
    let (short, long) = (list("short_factor")?, list("long_factor")?);
    let max_pos = cfg.f64("max_position_embeddings");
    let num = |k: &str| scaling.get(k).and_then(|v| v.as_f64());
    // A top-level original_max_position_embeddings (Phi-3's) wins over the scaling dict's.
    let original = cfg
        .f64("original_max_position_embeddings")
        .or_else(|| num("original_max_position_embeddings"))
        .or(max_pos)
        .ok_or_else(|| {
            EngineError::Config(
                "longrope needs original_max_position_embeddings or max_position_embeddings".into(),
            )
        })?;
    let factor = num("factor").unwrap_or_else(|| max_pos.map_or(1.0, |m| m / original));
    let attention_factor = num("attention_factor").unwrap_or_else(|| {
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / original.ln()).sqrt()
        }
    }) as f32;
    let divide = |factors: &[f32]| -> Vec<f32> {
        base_freq.iter().zip(factors).map(|(f, e)| f / e).collect()
    };
    Ok((
        divide(&short),
        LongFrequencies {
            inv_freq: divide(&long),
            original_max: original as usize,
        },
        attention_factor,
    ))
}
