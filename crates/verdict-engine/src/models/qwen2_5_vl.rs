//! Qwen2.5-VL: a ViT with window attention and 2-D rotary positions whose
//! merged patches replace the image/video placeholder tokens of a Qwen2
//! language model that runs with 3-D (M-RoPE) positions.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::decoder::{DecoderModel, DecoderVariant};
use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{
    gated_mlp, packed_attention, AttentionMask, HiddenAct, Linear, RmsNorm, RotaryEmbedding,
};
use crate::multimodal::{Modality, VisualInput};

/// Where the two halves live: transformers v5 checkpoints nest both under
/// `model.`, older ones keep `visual.` and `model.` at the top.
const LM_BASES: &[&str] = &[
    "model.language_model.",
    "language_model.model.",
    "model.",
    "",
];
const VISION_BASES: &[&str] = &["model.visual.", "visual."];

#[derive(Debug, Clone, Deserialize)]
struct VisionConfig {
    depth: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_heads: usize,
    // Older configs say `in_chans` (and carry `spatial_patch_size` beside
    // `patch_size`); read separately so both spellings may appear at once.
    #[serde(default)]
    in_channels: Option<usize>,
    #[serde(default)]
    in_chans: Option<usize>,
    #[serde(default)]
    patch_size: Option<usize>,
    #[serde(default)]
    spatial_patch_size: Option<usize>,
    #[serde(default = "default_two")]
    spatial_merge_size: usize,
    #[serde(default = "default_two")]
    temporal_patch_size: usize,
    #[serde(default = "default_window")]
    window_size: usize,
    out_hidden_size: usize,
    #[serde(default)]
    fullatt_block_indexes: Vec<usize>,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_tokens_per_second")]
    tokens_per_second: f64,
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    rope_theta: Option<f64>,
}

impl VisionConfig {
    fn channels(&self) -> usize {
        self.in_channels.or(self.in_chans).unwrap_or(3)
    }

    fn patch(&self) -> usize {
        self.patch_size.or(self.spatial_patch_size).unwrap_or(14)
    }
}

fn default_two() -> usize {
    2
}
fn default_window() -> usize {
    112
}
fn default_act() -> String {
    "silu".into()
}
fn default_tokens_per_second() -> f64 {
    4.0
}

/// Token ids and M-RoPE layout the language model needs from the top-level config.
#[derive(Debug, Clone)]
pub struct VlTokens {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub spatial_merge_size: usize,
}

impl VlTokens {
    pub fn from_config(config: &HfConfig) -> Self {
        let id = |key: &str, default: u32| {
            config
                .get_with_text(key)
                .and_then(serde_json::Value::as_u64)
                .map_or(default, |v| v as u32)
        };
        let merge = config
            .get("vision_config")
            .and_then(|v| v.get("spatial_merge_size"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(2) as usize;
        VlTokens {
            image_token_id: id("image_token_id", 151655),
            video_token_id: id("video_token_id", 151656),
            vision_start_token_id: id("vision_start_token_id", 151652),
            spatial_merge_size: merge,
        }
    }
}

/// The language model's config: `text_config` over the top level (older
/// checkpoints keep everything at the top), with M-RoPE's sections.
fn text_config(config: &HfConfig) -> Result<(HfConfig, Vec<usize>)> {
    let mut merged = config.raw().clone();
    if let Some(obj) = merged.as_object_mut() {
        obj.remove("vision_config");
        obj.remove("text_config");
    }
    if let Some(text) = config.raw().get("text_config") {
        crate::checkpoint::merge_json(&mut merged, text);
    }
    let text = HfConfig::from_value(merged, None)?;
    let sections = ["rope_scaling", "rope_parameters"]
        .iter()
        .find_map(|k| text.get(k)?.get("mrope_section")?.as_array().cloned())
        .map(|a| {
            a.iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
        })
        .unwrap_or(Some(vec![16, 24, 24]))
        .ok_or_else(|| EngineError::Config("mrope_section must be a list of integers".into()))?;
    Ok((text, sections))
}

struct VisionBlock {
    norm1: RmsNorm,
    qkv: Linear,
    proj: Linear,
    norm2: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// The vision tower: patch embedding, blocks, patch merger.
pub struct VisionTower {
    cfg: VisionConfig,
    patch_embed: Linear,
    /// Values per patch: channels x temporal patch x patch x patch.
    patch_dim: usize,
    blocks: Vec<VisionBlock>,
    merger_norm: RmsNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    act: HiddenAct,
    /// Rotary frequencies over a quarter of the head dim (height and width halves).
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
}

impl VisionTower {
    fn load(cfg: VisionConfig, weights: &Weights) -> Result<Self> {
        let d = cfg.hidden_size;
        if cfg.num_heads == 0 || !d.is_multiple_of(cfg.num_heads) {
            return Err(EngineError::Config(format!(
                "vision hidden_size {d} is not divisible by num_heads {}",
                cfg.num_heads
            )));
        }
        let head_dim = d / cfg.num_heads;
        if !head_dim.is_multiple_of(4) {
            return Err(EngineError::Config(format!(
                "vision head dim {head_dim} must be a multiple of 4 for 2-D rotary positions"
            )));
        }
        let root = weights.root(VISION_BASES);
        let p = cfg.patch();
        let t = cfg.temporal_patch_size;
        let c = cfg.channels();
        // A Conv3d whose stride equals its kernel is a matmul over flattened patches.
        let conv = root
            .pp("patch_embed")
            .pp("proj")
            .get("weight", &[d, c, t, p, p])?;
        let patch_embed = Linear::new(conv.reshape((d, c * t * p * p))?, None);
        let eps = 1e-6;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let b = root.pp("blocks").pp(i);
            let mlp = b.pp("mlp");
            blocks.push(VisionBlock {
                norm1: RmsNorm::load(&b.pp("norm1"), d, eps)?,
                qkv: Linear::load(&b.pp("attn").pp("qkv"), d, 3 * d, true)?,
                proj: Linear::load(&b.pp("attn").pp("proj"), d, d, true)?,
                norm2: RmsNorm::load(&b.pp("norm2"), d, eps)?,
                gate_proj: Linear::load(&mlp.pp("gate_proj"), d, cfg.intermediate_size, true)?,
                up_proj: Linear::load(&mlp.pp("up_proj"), d, cfg.intermediate_size, true)?,
                down_proj: Linear::load(&mlp.pp("down_proj"), cfg.intermediate_size, d, true)?,
            });
        }
        let merged = d * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let merger = root.pp("merger");
        let theta = cfg
            .rope_theta
            .or_else(|| cfg.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or(10000.0) as f32;
        let spatial_dim = head_dim / 2;
        let inv_freq = (0..spatial_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / spatial_dim as f32))
            .collect();
        Ok(VisionTower {
            patch_embed,
            patch_dim: c * t * p * p,
            blocks,
            merger_norm: RmsNorm::load(&merger.pp("ln_q"), d, eps)?,
            merger_fc1: Linear::load(&merger.pp("mlp").pp(0), merged, merged, true)?,
            merger_fc2: Linear::load(&merger.pp("mlp").pp(2), merged, cfg.out_hidden_size, true)?,
            act: HiddenAct::from_name(&cfg.hidden_act)?,
            inv_freq,
            device: weights.device().clone(),
            dtype: weights.dtype(),
            cfg,
        })
    }

    /// Runs all visual inputs of a batch at once; returns their merged
    /// embeddings `[sum of tokens, out_hidden_size]` in input order.
    fn forward(&self, visuals: &[&VisualInput]) -> Result<Tensor> {
        let d = self.cfg.hidden_size;
        let m = self.cfg.spatial_merge_size;
        let unit = m * m;
        let patch_dim = self.patch_dim;
        let mut pixels = Vec::new();
        for v in visuals {
            if v.patch_dim() != patch_dim {
                return Err(EngineError::validation(format!(
                    "visual input has patches of {} values, the vision tower expects {patch_dim}",
                    v.patch_dim()
                )));
            }
            let [_, h, w] = v.grid_thw;
            if !h.is_multiple_of(m) || !w.is_multiple_of(m) {
                return Err(EngineError::validation(format!(
                    "visual grid {:?} is not a multiple of the merge size {m}",
                    v.grid_thw
                )));
            }
            pixels.extend_from_slice(&v.pixel_values);
        }
        let n = pixels.len() / patch_dim;
        let layout = WindowLayout::new(visuals, &self.cfg);
        let pixels = Tensor::from_vec(pixels, (n, patch_dim), &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        let x = self.patch_embed.forward(&pixels)?;
        let order = Tensor::from_slice(
            &layout.window_index,
            layout.window_index.len(),
            &self.device,
        )?;
        let mut x = x
            .reshape((n / unit, unit * d))?
            .index_select(&order, 0)?
            .reshape((n, d))?;
        let (cos, sin) = self.rotary_tables(&layout.positions)?;
        let heads = self.cfg.num_heads;
        let head_dim = d / heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        for (i, block) in self.blocks.iter().enumerate() {
            let cu = if self.cfg.fullatt_block_indexes.contains(&i) {
                &layout.cu_frames
            } else {
                &layout.cu_windows
            };
            let qkv = block
                .qkv
                .forward(&block.norm1.forward(&x)?)?
                .reshape((n, 3, heads, head_dim))?;
            // transformers rotates the vision q/k in fp32 whatever the model dtype.
            let rotate = |t: Tensor| -> Result<Tensor> {
                let t = t.contiguous()?.to_dtype(DType::F32)?;
                Ok(RotaryEmbedding::apply(&t, &cos, &sin)?.to_dtype(self.dtype)?)
            };
            let q = rotate(qkv.narrow(1, 0, 1)?.squeeze(1)?)?;
            let k = rotate(qkv.narrow(1, 1, 1)?.squeeze(1)?)?;
            let v = qkv.narrow(1, 2, 1)?.squeeze(1)?.contiguous()?;
            let ctx = packed_attention(&q, &k, &v, cu, AttentionMask::Bidirectional, scale)?;
            x = (block.proj.forward(&ctx)? + &x)?;
            let normed = block.norm2.forward(&x)?;
            let gated = gated_mlp(&block.gate_proj, &block.up_proj, &normed, self.act)?;
            x = (block.down_proj.forward(&gated)? + &x)?;
        }
        let merged = self
            .merger_norm
            .forward(&x)?
            .reshape((n / unit, unit * d))?;
        let merged = self
            .merger_fc2
            .forward(&self.merger_fc1.forward_act(&merged, HiddenAct::Gelu)?)?;
        let mut inverse = vec![0u32; layout.window_index.len()];
        for (pos, &src) in layout.window_index.iter().enumerate() {
            inverse[src as usize] = pos as u32;
        }
        let inverse = Tensor::from_slice(&inverse, inverse.len(), &self.device)?;
        Ok(merged.index_select(&inverse, 0)?)
    }

    /// cos/sin `[N, head_dim/2]` (fp32): height frequencies then width frequencies.
    fn rotary_tables(&self, positions: &[[u32; 2]]) -> Result<(Tensor, Tensor)> {
        let quarter = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * quarter * 2);
        let mut sin = Vec::with_capacity(positions.len() * quarter * 2);
        for p in positions {
            for &coord in p {
                for &f in &self.inv_freq {
                    let angle = coord as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (positions.len(), quarter * 2);
        Ok((
            Tensor::from_vec(cos, shape, &Device::Cpu)?.to_device(&self.device)?,
            Tensor::from_vec(sin, shape, &Device::Cpu)?.to_device(&self.device)?,
        ))
    }
}

/// The vision tower's token order: merge units regrouped window by window,
/// with attention segments for windows and for whole frames.
struct WindowLayout {
    /// For each position in window order, the merge unit it came from.
    window_index: Vec<u32>,
    /// (height, width) patch coordinates, in window order.
    positions: Vec<[u32; 2]>,
    cu_windows: Vec<usize>,
    cu_frames: Vec<usize>,
}

impl WindowLayout {
    fn new(visuals: &[&VisualInput], cfg: &VisionConfig) -> Self {
        let m = cfg.spatial_merge_size;
        let unit = m * m;
        let window = (cfg.window_size / m / cfg.patch()).max(1);
        let mut layout = WindowLayout {
            window_index: Vec::new(),
            positions: Vec::new(),
            cu_windows: vec![0],
            cu_frames: vec![0],
        };
        // Patch coordinates in the processor's order: merge blocks row-major,
        // each block's m x m patches row-major, repeated per frame.
        let mut coords: Vec<[u32; 2]> = Vec::new();
        let mut unit_offset = 0usize;
        for v in visuals {
            let [t, h, w] = v.grid_thw;
            for _ in 0..t {
                for bh in 0..h / m {
                    for bw in 0..w / m {
                        for i in 0..m {
                            for j in 0..m {
                                coords.push([(bh * m + i) as u32, (bw * m + j) as u32]);
                            }
                        }
                    }
                }
                let last = *layout.cu_frames.last().unwrap_or(&0);
                layout.cu_frames.push(last + h * w);
            }
            let (lh, lw) = (h / m, w / m);
            let windows_h = (lh + window - lh % window) / window;
            let windows_w = (lw + window - lw % window) / window;
            for frame in 0..t {
                for wh in 0..windows_h {
                    for ww in 0..windows_w {
                        let mut count = 0;
                        for r in wh * window..((wh + 1) * window).min(lh) {
                            for c in ww * window..((ww + 1) * window).min(lw) {
                                layout
                                    .window_index
                                    .push((unit_offset + frame * lh * lw + r * lw + c) as u32);
                                count += 1;
                            }
                        }
                        if count > 0 {
                            let last = *layout.cu_windows.last().unwrap_or(&0);
                            layout.cu_windows.push(last + count * unit);
                        }
                    }
                }
            }
            unit_offset += t * lh * lw;
        }
        layout.positions = layout
            .window_index
            .iter()
            .flat_map(|&u| {
                let start = u as usize * unit;
                coords[start..start + unit].to_vec()
            })
            .collect();
        layout
    }
}

/// Qwen2.5-VL as a backbone: vision tower plus M-RoPE language model.
pub struct Qwen25VlModel {
    visual: VisionTower,
    lm: DecoderModel,
    tokens: VlTokens,
    mrope_sections: Vec<usize>,
    tokens_per_second: f64,
}

impl Qwen25VlModel {
    pub fn load(config: &HfConfig, weights: &Weights) -> Result<Self> {
        let vision_raw = config.get("vision_config").cloned().ok_or_else(|| {
            EngineError::Config("a Qwen2.5-VL config needs a `vision_config`".into())
        })?;
        let vision: VisionConfig = serde_json::from_value(vision_raw)
            .map_err(|e| EngineError::Config(format!("vision_config: {e}")))?;
        let (text, mrope_sections) = text_config(config)?;
        let lm = DecoderModel::load_under(DecoderVariant::Qwen2, &text, weights, LM_BASES)?;
        if vision.out_hidden_size != lm.hidden_size() {
            return Err(EngineError::Config(format!(
                "vision out_hidden_size {} differs from the language model's hidden_size {}",
                vision.out_hidden_size,
                lm.hidden_size()
            )));
        }
        let tokens_per_second = vision.tokens_per_second;
        Ok(Qwen25VlModel {
            visual: VisionTower::load(vision, weights)?,
            lm,
            tokens: VlTokens::from_config(config),
            mrope_sections,
            tokens_per_second,
        })
    }

    pub fn language_model(&self) -> &DecoderModel {
        &self.lm
    }

    /// (temporal, height, width) positions of one sequence, as transformers'
    /// `get_rope_index`: text advances all three by one; a visual input's
    /// tokens get its merged grid coordinates from the current position, and
    /// text after it resumes at the current position + max(grid h, grid w).
    fn rope_positions(&self, ids: &[u32], visuals: &[&VisualInput]) -> Result<Vec<[u32; 3]>> {
        let m = self.tokens.spatial_merge_size;
        let mut out = Vec::with_capacity(ids.len());
        let mut visuals = visuals.iter();
        let mut pos = 0u32;
        let mut i = 0;
        while i < ids.len() {
            let id = ids[i];
            let modality = if id == self.tokens.image_token_id {
                Some(Modality::Image)
            } else if id == self.tokens.video_token_id {
                Some(Modality::Video)
            } else {
                None
            };
            let Some(modality) = modality else {
                out.push([pos; 3]);
                pos += 1;
                i += 1;
                continue;
            };
            let v = visuals.next().ok_or_else(|| {
                EngineError::validation(
                    "the prompt has more image/video placeholder tokens than inputs",
                )
            })?;
            if v.modality != modality {
                return Err(EngineError::validation(
                    "image and video placeholders are not in the order of the inputs",
                ));
            }
            let [t, h, w] = v.grid_thw;
            let (lh, lw) = (h / m, w / m);
            let interval = match modality {
                Modality::Video => self.tokens_per_second * v.second_per_grid_t as f64,
                Modality::Image => 1.0,
            };
            let n = t * lh * lw;
            if i + n > ids.len() || ids[i..i + n].iter().any(|&x| x != id) {
                return Err(EngineError::validation(format!(
                    "a visual input needs {n} consecutive placeholder tokens"
                )));
            }
            for ti in 0..t {
                let tpos = (ti as f64 * interval) as u32;
                for r in 0..lh {
                    for c in 0..lw {
                        out.push([pos + tpos, pos + r as u32, pos + c as u32]);
                    }
                }
            }
            pos += lh.max(lw) as u32;
            i += n;
        }
        if visuals.next().is_some() {
            return Err(EngineError::validation(
                "the prompt has fewer image/video placeholder tokens than inputs",
            ));
        }
        Ok(out)
    }
}

impl Backbone for Qwen25VlModel {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let mut positions = Vec::with_capacity(batch.num_tokens());
        let mut all_visuals: Vec<&VisualInput> = Vec::new();
        for s in 0..batch.num_sequences() {
            let ids = &batch.input_ids[batch.cu_seqlens[s]..batch.cu_seqlens[s + 1]];
            let visuals: Vec<&VisualInput> = batch
                .visuals
                .get(s)
                .map(|v| v.iter().map(|x| x.as_ref()).collect())
                .unwrap_or_default();
            positions.extend(self.rope_positions(ids, &visuals)?);
            all_visuals.extend(visuals);
        }
        let dtype = self.lm.dtype();
        let device = self.lm.device().clone();
        let (cos, sin) =
            self.lm
                .rotary()
                .cos_sin_mrope(&positions, &self.mrope_sections, dtype, &device)?;
        let mut x = self.lm.embed(&batch.input_ids)?;
        if !all_visuals.is_empty() {
            let vision = self.visual.forward(&all_visuals)?.to_dtype(dtype)?;
            // Placeholder rows take the vision rows in order: gather from [text; vision].
            let t = batch.num_tokens();
            let mut next = t as u32;
            let gather: Vec<u32> = batch
                .input_ids
                .iter()
                .enumerate()
                .map(|(row, &id)| {
                    if id == self.tokens.image_token_id || id == self.tokens.video_token_id {
                        next += 1;
                        next - 1
                    } else {
                        row as u32
                    }
                })
                .collect();
            if (next as usize - t) != vision.dim(0)? {
                return Err(EngineError::validation(format!(
                    "the prompts have {} placeholder tokens but the images and videos give {} embeddings",
                    next as usize - t,
                    vision.dim(0)?
                )));
            }
            let gather = Tensor::from_vec(gather, t, &device)?;
            x = Tensor::cat(&[&x, &vision], 0)?.index_select(&gather, 0)?;
        }
        self.lm.forward_embeds(x, &cos, &sin, &batch.cu_seqlens)
    }

    fn hidden_size(&self) -> usize {
        self.lm.hidden_size()
    }

    fn vocab_size(&self) -> usize {
        self.lm.vocab_size()
    }

    fn max_positions(&self) -> Option<usize> {
        self.lm.max_positions()
    }

    fn dtype(&self) -> DType {
        self.lm.dtype()
    }
}
