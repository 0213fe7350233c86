//! Packed variable-length attention on CUDA, as a candle `CustomOp3` over our own
//! kernels (`kernels/attention.cu`, compiled to PTX by build.rs): one launch per
//! layer instead of a loop over the sequences of the batch.
//!
//! `VERDICT_CUDA_ATTN` picks the path: `auto` (default: the tensor-core flash
//! kernel for bf16/f16 with head dim 64 or 128, else the one-warp-per-row kernel),
//! `rows` (always the row kernel), `loop` (candle ops per sequence, the old path).
//! `VERDICT_CUDA_ATTN_CHECK=1` also runs the loop and reports the largest difference.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, DType, Layout, Shape, Tensor};

use super::cuda_ops::{held_optional, held_slice, launch_cfg, CudaOp, KernelOp, Launch, Ptx};
use crate::error::Result;

const ATTENTION: Ptx = Ptx::new(
    "verdict_attention",
    include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
);
/// Query rows per block of the flash kernel.
const BLOCK_M: usize = 64;
/// The row kernel keeps d / 32 values per lane in registers.
const MAX_ROW_DIM: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Rows,
    Loop,
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        match std::env::var("VERDICT_CUDA_ATTN")
            .as_deref()
            .unwrap_or("auto")
        {
            "loop" => Mode::Loop,
            "rows" => Mode::Rows,
            _ => Mode::Auto,
        }
    })
}

/// `VERDICT_CUDA_ATTN_CHECK` is set: compare every call against the per-sequence loop.
pub(super) fn check_enabled() -> bool {
    static CHECK: OnceLock<bool> = OnceLock::new();
    *CHECK.get_or_init(|| {
        std::env::var("VERDICT_CUDA_ATTN_CHECK").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Prints the difference between the kernel and the loop when it is the largest so far.
pub(super) fn report_check(out: &Tensor, reference: &Tensor, heads: usize) -> Result<()> {
    static WORST: AtomicU32 = AtomicU32::new(0);
    let diff = (out.to_dtype(DType::F32)? - reference.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let prev = f32::from_bits(WORST.load(Ordering::Relaxed));
    if diff.is_nan() || diff > prev {
        WORST.store(diff.to_bits(), Ordering::Relaxed);
        eprintln!(
            "attention check: max |kernel - loop| = {diff:.3e} ({:?}, {} tokens, {heads} heads, d {})",
            out.dtype(),
            out.dim(0)?,
            out.dim(1)? / heads.max(1),
        );
    }
    Ok(())
}

/// Runs the kernel when it applies; `None` sends the caller to the candle loop.
#[allow(clippy::too_many_arguments)]
pub(super) fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    causal: bool,
    window: Option<usize>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    let (_, heads, d) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    if mode() == Mode::Loop || d > MAX_ROW_DIM || cu_seqlens.len() < 2 {
        return Ok(None);
    }
    let op = CudaOp(PackedAttention {
        cu: cu_seqlens.iter().map(|&c| c as i32).collect(),
        heads,
        kv_heads,
        d,
        causal,
        // The kernels keep |i - j| < window without `causal`: a radius r is r + 1.
        window: window.map_or(0, |w| {
            let w = if causal { w } else { w.saturating_add(1) };
            w.min(i32::MAX as usize) as i32
        }),
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        softcap_log2: softcap.map_or(0.0, |c| (c * std::f64::consts::LOG2_E) as f32),
        allow_flash: mode() == Mode::Auto,
        positions: None,
    });
    Ok(Some(token_rows(q)?.apply_op3_no_bwd(
        &token_rows(k)?,
        &token_rows(v)?,
        &op,
    )?))
}

/// `t` `[T, heads, d]` as the kernels read it: tokens any stride apart (a view into a
/// packed QKV projection stays as it is), heads `d` apart, elements contiguous.
fn token_rows(t: &Tensor) -> Result<Tensor> {
    let (_, h, d) = t.dims3()?;
    let s = t.stride();
    Ok(if s[2] == 1 && (s[1] == d || h == 1) {
        t.clone()
    } else {
        t.contiguous()?
    })
}

/// DeBERTa's position terms for the flash kernel (see kernels/attention.cu).
pub(super) struct PositionTerms {
    /// c2p `[heads, T, rel_w]`: each query against the key projection of every table
    /// row the batch reaches.
    pub(super) c2p: Option<Tensor>,
    /// p2c `[heads, T, rel_w]`: each key against the query projection of those rows.
    pub(super) p2c: Option<Tensor>,
    /// u32 `[2 rel_mid + 1]`: the row (from the first reached) of distance `i - j`,
    /// at `i - j + rel_mid`; it grows by at most 1 per unit of distance.
    pub(super) rel: Tensor,
    pub(super) rel_mid: usize,
    /// Entries per row of c2p and p2c, a multiple of 8 (the kernel loads 16 bytes).
    pub(super) rel_w: usize,
}

/// Bidirectional packed attention with DeBERTa's disentangled position terms added
/// to the scores inside the flash kernel; `None` where that kernel does not apply
/// (f32, head dims other than 64 and 128): the caller takes another path.
pub(super) fn disentangled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    positions: PositionTerms,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (_, heads, d) = q.dims3()?;
    let flash_dtype = matches!(q.dtype(), DType::BF16 | DType::F16);
    if mode() != Mode::Auto || !flash_dtype || !(d == 64 || d == 128) || cu_seqlens.len() < 2 {
        return Ok(None);
    }
    let op = CudaOp(PackedAttention {
        cu: cu_seqlens.iter().map(|&c| c as i32).collect(),
        heads,
        kv_heads: k.dim(1)?,
        d,
        causal: false,
        window: 0,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        softcap_log2: 0.0,
        allow_flash: true,
        positions: Some(positions),
    });
    Ok(Some(token_rows(q)?.apply_op3_no_bwd(
        &token_rows(k)?,
        &token_rows(v)?,
        &op,
    )?))
}

struct PackedAttention {
    cu: Vec<i32>,
    heads: usize,
    kv_heads: usize,
    d: usize,
    causal: bool,
    window: i32,
    scale_log2: f32,
    /// The soft-cap in the kernels' log2 units (cap * log2 e); 0 when off.
    softcap_log2: f32,
    allow_flash: bool,
    /// DeBERTa's position terms: flash kernel only.
    positions: Option<PositionTerms>,
}

/// Elements between consecutive tokens of a `[T, heads, d]` tensor.
fn token_stride(l: &Layout) -> i64 {
    l.stride()[0] as i64
}

/// The last batch's `cu_seqlens ++ tiles` on the device: every layer of a
/// forward pass shares it, so it is uploaded once per batch.
struct Metadata {
    device: DeviceId,
    cu: Vec<i32>,
    data: Rc<CudaSlice<i32>>,
    tiles: usize,
}

thread_local! {
    static METADATA: RefCell<Option<Metadata>> = const { RefCell::new(None) };
}

impl PackedAttention {
    /// `cu_seqlens` followed by the flash kernel's (sequence, first query row) tiles,
    /// on the device, and the number of tiles.
    fn metadata(&self, dev: &CudaDevice) -> candle_core::Result<(Rc<CudaSlice<i32>>, usize)> {
        METADATA.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some(m) = cell.as_ref() {
                if m.device == dev.id() && m.cu == self.cu {
                    return Ok((m.data.clone(), m.tiles));
                }
            }
            let mut meta = self.cu.clone();
            for s in 0..self.cu.len() - 1 {
                let len = (self.cu[s + 1] - self.cu[s]) as usize;
                for q0 in (0..len).step_by(BLOCK_M) {
                    meta.extend([s as i32, q0 as i32]);
                }
            }
            let tiles = (meta.len() - self.cu.len()) / 2;
            let meta = Rc::new(dev.clone_htod(meta.as_slice())?);
            *cell = Some(Metadata {
                device: dev.id(),
                cu: self.cu.clone(),
                data: meta.clone(),
                tiles,
            });
            Ok((meta, tiles))
        })
    }
}

impl KernelOp for PackedAttention {
    const NAME: &'static str = "verdict-packed-attention";
    const OPERANDS: &'static [&'static str] = &["q", "k", "v"];

    fn launch<T: DeviceRepr + CudaDType>(&self, call: Launch<'_, T>) -> candle_core::Result<()> {
        let (q, k, v) = (&call.operands[0], &call.operands[1], &call.operands[2]);
        let (ql, kl, vl) = (q.layout, k.layout, v.layout);
        let total = ql.dims()[0];
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.d);
        let (q_ts, k_ts, v_ts) = (token_stride(ql), token_stride(kl), token_stride(vl));
        let nseq = self.cu.len() - 1;
        let causal = self.causal as i32;
        let aligned = [q_ts, k_ts, v_ts].iter().all(|s| s % 8 == 0)
            && [ql, kl, vl].iter().all(|l| l.start_offset() % 8 == 0);
        let flash = self.allow_flash && call.dtype != "f32" && (d == 64 || d == 128) && aligned;
        if self.positions.is_some() && !flash {
            candle_core::bail!("verdict-packed-attention: position terms need the flash kernel");
        }
        let (meta, tiles) = self.metadata(call.dev)?;
        let cu = meta.slice(0..self.cu.len());
        if flash {
            let tl = meta.slice(self.cu.len()..);
            let variant = match &self.positions {
                Some(p) if p.rel_w % 8 != 0 => candle_core::bail!(
                    "verdict-packed-attention: position rows {} apart, not a multiple of 8",
                    p.rel_w
                ),
                Some(_) => "flash_rel",
                None => "flash",
            };
            let func = ATTENTION.kernel(call.dev, &format!("{variant}_{}_d{d}", call.dtype))?;
            let cfg = launch_cfg((tiles, heads), 128);
            let launch = |c2p: Option<&CudaView<'_, T>>,
                          p2c: Option<&CudaView<'_, T>>,
                          rel: Option<&CudaView<'_, u32>>|
             -> candle_core::Result<()> {
                let null = 0u64;
                let mut b = func.builder();
                b.arg(&q.view).arg(&k.view).arg(&v.view).arg(&*call.out);
                b.arg(&cu).arg(&tl);
                let (h, kvh) = (heads as i32, kv_heads as i32);
                b.arg(&h).arg(&kvh).arg(&q_ts).arg(&k_ts).arg(&v_ts);
                b.arg(&causal).arg(&self.window).arg(&self.scale_log2);
                b.arg(&self.softcap_log2);
                match c2p {
                    Some(t) => b.arg(t),
                    None => b.arg(&null),
                };
                match p2c {
                    Some(t) => b.arg(t),
                    None => b.arg(&null),
                };
                match rel {
                    Some(t) => b.arg(t),
                    None => b.arg(&null),
                };
                let (rel_mid, rel_w) = self
                    .positions
                    .as_ref()
                    .map_or((0, 0), |p| (p.rel_mid as i32, p.rel_w as i32));
                let total = total as i64;
                b.arg(&rel_mid).arg(&rel_w).arg(&total);
                // SAFETY: the argument list matches the kernel's signature.
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            };
            match &self.positions {
                None => launch(None, None, None)?,
                Some(p) => held_slice::<u32>(&p.rel, |rel| {
                    held_optional::<T>(p.c2p.as_ref(), |c2p| {
                        held_optional::<T>(p.p2c.as_ref(), |p2c| launch(c2p, p2c, Some(rel)))
                    })
                })?,
            }
        } else {
            let func = ATTENTION.kernel(call.dev, &format!("attn_rows_{}", call.dtype))?;
            // One warp per (token, head), four warps per block.
            let cfg = launch_cfg(((total * heads).div_ceil(4), 1), 128);
            let (n, t) = (nseq as i32, total as i32);
            let (h, kvh, dd) = (heads as i32, kv_heads as i32, d as i32);
            let mut b = func.builder();
            b.arg(&q.view).arg(&k.view).arg(&v.view).arg(call.out);
            b.arg(&cu);
            b.arg(&n).arg(&t).arg(&h).arg(&kvh).arg(&dd);
            b.arg(&q_ts).arg(&k_ts).arg(&v_ts);
            b.arg(&causal).arg(&self.window).arg(&self.scale_log2);
            b.arg(&self.softcap_log2);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(())
    }

    /// `[total tokens, heads * d]`.
    fn out_shape(&self, q: &Layout, _operands: usize) -> Shape {
        Shape::from((q.dims()[0], self.heads * self.d))
    }
}
