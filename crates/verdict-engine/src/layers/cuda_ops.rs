//! Fused memory-bound steps on CUDA (`kernels/fused.cu`): bias + activation after a
//! matmul, and `act(gate) * up` of the gated MLPs. Each replaces two or three candle
//! ops (and candle's strided broadcast path for the bias) with one pass.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor,
};

use super::HiddenAct;
use crate::error::Result;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "verdict_fused";

/// Settings for serving on one CUDA device, applied once before the weights load.
///
/// - The stream-ordered allocator's pool keeps what it has grown to. Its default
///   release threshold of zero hands all free memory back to the driver at every
///   synchronisation, which for us is the end of every batch, so each batch had to
///   grow the pool again: new device memory mapped on the host, while the GPU waits.
/// - No per-allocation CUDA events: cudarc creates a read and a write event for every
///   buffer (and destroys them on free) to order work across streams; all our work is
///   on one stream, where they are never recorded.
///
/// `VERDICT_CUDA_POOL=0` and `VERDICT_CUDA_EVENTS=1` turn these off, for comparisons.
pub(crate) fn configure_device(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let flag = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if flag("VERDICT_CUDA_POOL").as_deref() != Some("0") {
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().w()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut keep = u64::MAX;
        // SAFETY: plain driver calls on a live context; `keep` outlives the call.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().w()?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
            .result()
            .w()?;
        }
    }
    if flag("VERDICT_CUDA_EVENTS").as_deref() != Some("1") {
        // SAFETY: verdict queues all of a device's work on its one stream (the calling
        // thread's default stream), so no buffer is used on two streams at once.
        unsafe { dev.disable_event_tracking() };
    }
    Ok(())
}

fn act_code(act: Option<HiddenAct>) -> i32 {
    match act {
        None => 0,
        Some(HiddenAct::Gelu) => 1,
        Some(HiddenAct::GeluTanh) => 2,
        Some(HiddenAct::Silu) => 3,
        Some(HiddenAct::Relu) => 4,
    }
}

/// Contiguous, starting on a 16-byte boundary (the kernels' vector loads need it).
fn aligned(t: &Tensor) -> Result<Tensor> {
    let ok = t.is_contiguous()
        && (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16);
    Ok(if ok { t.clone() } else { t.force_contiguous()? })
}

/// `act(x + bias)` over the last dimension; `None` when the dtypes do not match.
pub(super) fn bias_act(
    x: &Tensor,
    bias: Option<&Tensor>,
    act: Option<HiddenAct>,
) -> Result<Option<Tensor>> {
    if bias.is_some_and(|b| b.dtype() != x.dtype() || b.rank() != 1) {
        return Ok(None);
    }
    let op = BiasAct { act: act_code(act) };
    let x = aligned(x)?;
    Ok(Some(match bias {
        Some(b) => x.apply_op2_no_bwd(&aligned(b)?, &op)?,
        None => x.apply_op1_no_bwd(&op)?,
    }))
}

/// `act(gate) * up`, both the same shape.
pub(super) fn act_mul(gate: &Tensor, up: &Tensor, act: HiddenAct) -> Result<Tensor> {
    let op = ActMul {
        act: act_code(Some(act)),
    };
    Ok(aligned(gate)?.apply_op2_no_bwd(&aligned(up)?, &op)?)
}

fn elementwise_cfg(vectors: usize) -> LaunchConfig {
    let blocks = vectors.div_ceil(256).clamp(1, 132 * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

struct BiasAct {
    act: i32,
}

impl BiasAct {
    fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        x: &CudaSlice<T>,
        xl: &Layout,
        bias: Option<(&CudaSlice<T>, &Layout)>,
    ) -> candle_core::Result<CudaSlice<T>> {
        let n = xl.shape().elem_count();
        let cols = xl.dims().last().copied().unwrap_or(1).max(1);
        let rows = (n / cols) as i64;
        let xv = x.slice(xl.start_offset()..);
        // SAFETY: every element is written by the kernel.
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(out);
        }
        let func = dev.get_or_load_custom_func(&format!("bias_act_{suffix}"), MODULE, PTX)?;
        let vec = 16 / std::mem::size_of::<T>();
        let cfg = elementwise_cfg(n.div_ceil(vec));
        let cols = cols as i32;
        let mut b = func.builder();
        b.arg(&xv);
        let bv = bias.map(|(s, l)| s.slice(l.start_offset()..));
        let null = 0u64;
        match &bv {
            Some(v) => b.arg(v),
            None => b.arg(&null),
        };
        b.arg(&mut out).arg(&rows).arg(&cols).arg(&self.act);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp1 for BiasAct {
    fn name(&self) -> &'static str {
        "verdict-bias-act"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("verdict-bias-act runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let slice = match &s.slice {
            CudaStorageSlice::BF16(x) => {
                CudaStorageSlice::BF16(self.launch(&dev, "bf16", x, l, None)?)
            }
            CudaStorageSlice::F16(x) => {
                CudaStorageSlice::F16(self.launch(&dev, "f16", x, l, None)?)
            }
            CudaStorageSlice::F32(x) => {
                CudaStorageSlice::F32(self.launch(&dev, "f32", x, l, None)?)
            }
            _ => candle_core::bail!("verdict-bias-act: x must be bf16, f16 or f32"),
        };
        Ok((CudaStorage { slice, device: dev }, l.shape().clone()))
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "verdict-bias-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("verdict-bias-act runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let slice = match (&s.slice, &bs.slice) {
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(b)) => {
                CudaStorageSlice::BF16(self.launch(&dev, "bf16", x, l, Some((b, bl)))?)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(b)) => {
                CudaStorageSlice::F16(self.launch(&dev, "f16", x, l, Some((b, bl)))?)
            }
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(b)) => {
                CudaStorageSlice::F32(self.launch(&dev, "f32", x, l, Some((b, bl)))?)
            }
            _ => candle_core::bail!("verdict-bias-act: x and bias must share bf16, f16 or f32"),
        };
        Ok((CudaStorage { slice, device: dev }, l.shape().clone()))
    }
}

struct ActMul {
    act: i32,
}

impl ActMul {
    fn launch<T: DeviceRepr>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        g: &CudaSlice<T>,
        gl: &Layout,
        u: &CudaSlice<T>,
        ul: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let n = gl.shape().elem_count();
        let gv = g.slice(gl.start_offset()..);
        let uv = u.slice(ul.start_offset()..);
        // SAFETY: every element is written by the kernel.
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(out);
        }
        let func = dev.get_or_load_custom_func(&format!("act_mul_{suffix}"), MODULE, PTX)?;
        let vec = 16 / std::mem::size_of::<T>();
        let cfg = elementwise_cfg(n.div_ceil(vec));
        let n = n as i64;
        let mut b = func.builder();
        b.arg(&gv).arg(&uv).arg(&mut out).arg(&n).arg(&self.act);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp2 for ActMul {
    fn name(&self) -> &'static str {
        "verdict-act-mul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("verdict-act-mul runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!(
                "verdict-act-mul: gate {:?} and up {:?}",
                gl.shape(),
                ul.shape()
            );
        }
        let dev = gs.device().clone();
        let slice = match (&gs.slice, &us.slice) {
            (CudaStorageSlice::BF16(g), CudaStorageSlice::BF16(u)) => {
                CudaStorageSlice::BF16(self.launch(&dev, "bf16", g, gl, u, ul)?)
            }
            (CudaStorageSlice::F16(g), CudaStorageSlice::F16(u)) => {
                CudaStorageSlice::F16(self.launch(&dev, "f16", g, gl, u, ul)?)
            }
            (CudaStorageSlice::F32(g), CudaStorageSlice::F32(u)) => {
                CudaStorageSlice::F32(self.launch(&dev, "f32", g, gl, u, ul)?)
            }
            _ => candle_core::bail!("verdict-act-mul: gate and up must share bf16, f16 or f32"),
        };
        Ok((CudaStorage { slice, device: dev }, gl.shape().clone()))
    }
}
