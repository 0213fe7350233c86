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

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::Result;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "verdict_attention";
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
pub(super) fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    causal: bool,
    window: Option<usize>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (_, heads, d) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    if mode() == Mode::Loop || d > MAX_ROW_DIM || cu_seqlens.len() < 2 {
        return Ok(None);
    }
    let fix = |t: &Tensor| -> Result<Tensor> {
        let (_, h, _) = t.dims3()?;
        let s = t.stride();
        Ok(if s[2] == 1 && (s[1] == d || h == 1) {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let op = PackedAttention {
        cu: cu_seqlens.iter().map(|&c| c as i32).collect(),
        heads,
        kv_heads,
        d,
        causal,
        window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        allow_flash: mode() == Mode::Auto,
    };
    Ok(Some(fix(q)?.apply_op3_no_bwd(&fix(k)?, &fix(v)?, &op)?))
}

struct PackedAttention {
    cu: Vec<i32>,
    heads: usize,
    kv_heads: usize,
    d: usize,
    causal: bool,
    window: i32,
    scale_log2: f32,
    allow_flash: bool,
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

    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        q: &CudaSlice<T>,
        ql: &Layout,
        k: &CudaSlice<T>,
        kl: &Layout,
        v: &CudaSlice<T>,
        vl: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let total = ql.dims()[0];
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.d);
        let (q_ts, k_ts, v_ts) = (token_stride(ql), token_stride(kl), token_stride(vl));
        let qv = q.slice(ql.start_offset()..);
        let kv = k.slice(kl.start_offset()..);
        let vv = v.slice(vl.start_offset()..);
        // SAFETY: every element is written by the kernel below.
        let mut out = unsafe { dev.alloc::<T>(total * heads * d)? };
        if total == 0 {
            return Ok(out);
        }
        let nseq = self.cu.len() - 1;
        let causal = self.causal as i32;
        let aligned = [q_ts, k_ts, v_ts].iter().all(|s| s % 8 == 0)
            && [ql, kl, vl].iter().all(|l| l.start_offset() % 8 == 0);
        let flash = self.allow_flash && suffix != "f32" && (d == 64 || d == 128) && aligned;
        let (meta, tiles) = self.metadata(dev)?;
        let cu = meta.slice(0..self.cu.len());
        if flash {
            let tl = meta.slice(self.cu.len()..);
            let func = dev.get_or_load_custom_func(&format!("flash_{suffix}_d{d}"), MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (tiles as u32, heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&qv).arg(&kv).arg(&vv).arg(&mut out).arg(&cu).arg(&tl);
            let (h, kvh) = (heads as i32, kv_heads as i32);
            b.arg(&h).arg(&kvh).arg(&q_ts).arg(&k_ts).arg(&v_ts);
            b.arg(&causal).arg(&self.window).arg(&self.scale_log2);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        } else {
            let func = dev.get_or_load_custom_func(&format!("attn_rows_{suffix}"), MODULE, PTX)?;
            let warps = total * heads;
            let cfg = LaunchConfig {
                grid_dim: (warps.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n, t) = (nseq as i32, total as i32);
            let (h, kvh, dd) = (heads as i32, kv_heads as i32, d as i32);
            let mut b = func.builder();
            b.arg(&qv).arg(&kv).arg(&vv).arg(&mut out).arg(&cu);
            b.arg(&n).arg(&t).arg(&h).arg(&kvh).arg(&dd);
            b.arg(&q_ts).arg(&k_ts).arg(&v_ts);
            b.arg(&causal).arg(&self.window).arg(&self.scale_log2);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(out)
    }
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "verdict-packed-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("verdict-packed-attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = qs.device().clone();
        let total = ql.dims()[0];
        let slice = match (&qs.slice, &ks.slice, &vs.slice) {
            (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                CudaStorageSlice::BF16(self.launch(&dev, "bf16", q, ql, k, kl, v, vl)?)
            }
            (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
                CudaStorageSlice::F16(self.launch(&dev, "f16", q, ql, k, kl, v, vl)?)
            }
            (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
                CudaStorageSlice::F32(self.launch(&dev, "f32", q, ql, k, kl, v, vl)?)
            }
            _ => candle_core::bail!(
                "verdict-packed-attention: q, k and v must share one of bf16, f16, f32"
            ),
        };
        let out = CudaStorage { slice, device: dev };
        Ok((out, Shape::from((total, self.heads * self.d))))
    }
}
