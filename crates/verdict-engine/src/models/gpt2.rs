//! GPT-2: learned absolute positions, pre-norm blocks, Conv1D weights.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{Backbone, PackedBatch};
use crate::checkpoint::{HfConfig, Weights};
use crate::error::{EngineError, Result};
use crate::layers::{in_row_chunks, packed_attention, AttentionMask, HiddenAct, LayerNorm, Linear};

const BASES: &[&str] = &["transformer.", "model.", ""];

#[derive(Debug, Deserialize)]
struct Gpt2Config {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    #[serde(default)]
    n_inner: Option<usize>,
    #[serde(default = "default_positions")]
    n_positions: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    activation_function: String,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
}

fn default_positions() -> usize {
    1024
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

pub struct Gpt2Model {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    act: HiddenAct,
    cfg: Gpt2Config,
    device: Device,
    dtype: DType,
}

impl Gpt2Model {
    pub fn load(config: &HfConfig, weights: &Weights) -> Result<Self> {
        let cfg: Gpt2Config = config.parse("GPT-2")?;
        if cfg.n_head == 0 || !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(EngineError::Config(format!(
                "n_embd {} is not divisible by n_head {}",
                cfg.n_embd, cfg.n_head
            )));
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            return Err(EngineError::Config(
                "scale_attn_by_inverse_layer_idx is not supported".into(),
            ));
        }
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let root = weights.root(BASES);
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let b = root.pp("h").pp(i);
            blocks.push(Block {
                ln_1: LayerNorm::load(&b.pp("ln_1"), h, cfg.layer_norm_epsilon)?,
                c_attn: Linear::load_conv1d(&b.pp("attn.c_attn"), h, 3 * h)?,
                c_proj: Linear::load_conv1d(&b.pp("attn.c_proj"), h, h)?,
                ln_2: LayerNorm::load(&b.pp("ln_2"), h, cfg.layer_norm_epsilon)?,
                c_fc: Linear::load_conv1d(&b.pp("mlp.c_fc"), h, inner)?,
                mlp_proj: Linear::load_conv1d(&b.pp("mlp.c_proj"), inner, h)?,
            });
        }
        Ok(Gpt2Model {
            wte: root.pp("wte").get("weight", &[cfg.vocab_size, h])?,
            wpe: root.pp("wpe").get("weight", &[cfg.n_positions, h])?,
            ln_f: LayerNorm::load(&root.pp("ln_f"), h, cfg.layer_norm_epsilon)?,
            blocks,
            act: HiddenAct::from_name(&cfg.activation_function)?,
            device: weights.device().clone(),
            dtype: weights.dtype(),
            cfg,
        })
    }

    /// The token embedding matrix (GPT-2 ties its LM head to it).
    pub fn embeddings(&self) -> &Tensor {
        &self.wte
    }
}

impl Backbone for Gpt2Model {
    fn forward(&self, batch: &PackedBatch) -> Result<Tensor> {
        let t = batch.input_ids.len();
        let (h, heads) = (self.cfg.n_embd, self.cfg.n_head);
        let d = h / heads;
        let ids = Tensor::from_slice(&batch.input_ids, t, &self.device)?;
        let pos = Tensor::from_slice(&batch.positions, t, &self.device)?;
        let mut x = (self.wte.embedding(&ids)? + self.wpe.embedding(&pos)?)?;
        let scale = if self.cfg.scale_attn_weights {
            1.0 / (d as f64).sqrt()
        } else {
            1.0
        };
        for b in &self.blocks {
            let qkv = b.c_attn.forward(&b.ln_1.forward(&x)?)?;
            let q = qkv.narrow(1, 0, h)?.reshape((t, heads, d))?;
            let k = qkv.narrow(1, h, h)?.reshape((t, heads, d))?;
            let v = qkv.narrow(1, 2 * h, h)?.reshape((t, heads, d))?;
            let ctx = packed_attention(
                &q,
                &k,
                &v,
                &batch.cu_seqlens,
                AttentionMask::Causal { window: None },
                scale,
            )?;
            x = (b.c_proj.forward(&ctx)? + &x)?;
            let mlp = in_row_chunks(&b.ln_2.forward(&x)?, |rows| {
                b.mlp_proj.forward(&b.c_fc.forward_act(rows, self.act)?)
            })?;
            x = (mlp + &x)?;
        }
        self.ln_f.forward(&x)
    }

    fn hidden_size(&self) -> usize {
        self.cfg.n_embd
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.cfg.n_positions)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
