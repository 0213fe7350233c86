//! Fused memory-bound steps on CUDA (`kernels/fused.cu`): bias + activation after a
//! matmul, `act(gate) * up` of the gated MLPs, residual add + RMSNorm, and bias +
//! rotary embedding over a packed QKV projection. Each replaces two to five candle
//! ops (and candle's strided broadcast path for the bias) with one pass.
//!
//! For comparisons, `VERDICT_CUDA_NORM=0` sends the norms back to candle's ops and
//! `VERDICT_CUDA_ROPE=0` the rotary embedding (see also `VERDICT_CUDA_QKV` in qkv.rs).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor,
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
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                .result()
                .w()?;
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

/// Raw device slice of a CUDA tensor's storage, by dtype, for launches.
macro_rules! with_slices {
    ($storage:expr, $suffix:ident, $slice:ident, $body:expr) => {
        match &$storage.slice {
            CudaStorageSlice::BF16($slice) => {
                let $suffix = "bf16";
                CudaStorageSlice::BF16($body)
            }
            CudaStorageSlice::F16($slice) => {
                let $suffix = "f16";
                CudaStorageSlice::F16($body)
            }
            CudaStorageSlice::F32($slice) => {
                let $suffix = "f32";
                CudaStorageSlice::F32($body)
            }
            _ => candle_core::bail!("verdict fused op: bf16, f16 or f32 only"),
        }
    };
}

/// The CUDA storage of a tensor held by an op (weights, biases): its slice of type `T`
/// from the tensor's start, checked against the dtype of the launch.
fn held_slice<T: DeviceRepr + CudaDType>(
    t: &Tensor,
    f: impl FnOnce(&CudaView<'_, T>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("verdict fused op: a held tensor is not on the GPU")
    };
    let slice = cs.as_cuda_slice::<T>()?;
    f(&slice.slice(layout.start_offset()..))
}

/// False when the environment variable `name` is set to `0` (read once per name).
pub(super) fn fused_enabled(name: &'static str) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<&'static str, bool>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *seen
        .entry(name)
        .or_insert_with(|| !std::env::var(name).is_ok_and(|v| v == "0"))
}

/// `(x + delta, rms_norm(x + delta) * weight)` in one pass over the rows (`delta` None:
/// just the norm, and the first value is None). None when the kernel does not apply.
pub(super) fn add_rms_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<Option<(Option<Tensor>, Tensor)>> {
    let cols = x.dims().last().copied().unwrap_or(0);
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    if !fused_enabled("VERDICT_CUDA_NORM")
        || cols == 0
        || weight.dims() != [cols]
        || !same(weight)
        || !aligned_in_place(weight)
        || delta.is_some_and(|d| d.shape() != x.shape() || !same(d))
    {
        return Ok(None);
    }
    let op = AddRmsNorm {
        eps,
        cols,
        weight: weight.clone(),
    };
    let x = aligned(x)?;
    Ok(Some(match delta {
        Some(d) => {
            let both = x.apply_op2_no_bwd(&aligned(d)?, &op)?;
            let (sum, normed) = (both.get(0)?, both.get(1)?);
            (Some(sum.reshape(x.shape())?), normed.reshape(x.shape())?)
        }
        None => (None, x.apply_op1_no_bwd(&op)?),
    }))
}

/// A held weight must already be contiguous at a 16-byte boundary.
fn aligned_in_place(t: &Tensor) -> bool {
    t.is_contiguous() && (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
}

struct AddRmsNorm {
    eps: f32,
    cols: usize,
    weight: Tensor,
}

impl AddRmsNorm {
    /// Writes `[sum; normed]` (delta given) or `normed` into a new buffer.
    fn launch<T: DeviceRepr + CudaDType>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        x: &CudaSlice<T>,
        xl: &Layout,
        delta: Option<(&CudaSlice<T>, &Layout)>,
    ) -> candle_core::Result<CudaSlice<T>> {
        let n = xl.shape().elem_count();
        let rows = n / self.cols;
        let outputs = if delta.is_some() { 2 } else { 1 };
        // SAFETY: the kernel writes every element of each output.
        let out = unsafe { dev.alloc::<T>(outputs * n)? };
        if n == 0 {
            return Ok(out);
        }
        let v = 16 / std::mem::size_of::<T>();
        let nvec = self.cols / v;
        let vpt = if !self.cols.is_multiple_of(v) {
            0
        } else {
            [1usize, 2, 4]
                .into_iter()
                .find(|&p| nvec.div_ceil(p) <= 256)
                .unwrap_or(0)
        };
        let threads = if vpt == 0 {
            256
        } else {
            nvec.div_ceil(vpt).next_multiple_of(32)
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = dev.get_or_load_custom_func(&format!("add_rmsnorm_{suffix}"), MODULE, PTX)?;
        let xv = x.slice(xl.start_offset()..);
        let (cols, vpt) = (self.cols as i32, vpt as i32);
        held_slice::<T>(&self.weight, |w| {
            let mut b = func.builder();
            let null = 0u64;
            b.arg(&xv);
            let dv = delta.map(|(s, l)| s.slice(l.start_offset()..));
            let sum = out.slice(0..n);
            let normed = out.slice((outputs - 1) * n..);
            match &dv {
                Some(d) => b.arg(d).arg(w).arg(&sum),
                None => b.arg(&null).arg(w).arg(&null),
            };
            b.arg(&normed).arg(&cols).arg(&self.eps).arg(&vpt);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })?;
        Ok(out)
    }
}

impl CustomOp1 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "verdict-rms-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("verdict-rms-norm runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let slice = with_slices!(s, sfx, x, self.launch(&dev, sfx, x, l, None)?);
        Ok((CudaStorage { slice, device: dev }, l.shape().clone()))
    }
}

impl CustomOp2 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "verdict-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("verdict-add-rms-norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let slice = match (&s.slice, &ds.slice) {
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(d)) => {
                CudaStorageSlice::BF16(self.launch(&dev, "bf16", x, l, Some((d, dl)))?)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(d)) => {
                CudaStorageSlice::F16(self.launch(&dev, "f16", x, l, Some((d, dl)))?)
            }
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(d)) => {
                CudaStorageSlice::F32(self.launch(&dev, "f32", x, l, Some((d, dl)))?)
            }
            _ => {
                candle_core::bail!("verdict-add-rms-norm: x and delta must share bf16, f16 or f32")
            }
        };
        let rows = l.shape().elem_count() / self.cols;
        Ok((
            CudaStorage { slice, device: dev },
            Shape::from((2, rows, self.cols)),
        ))
    }
}

/// Bias and rotary embedding over a packed `[T, (heads + 2 kv_heads) * d]` projection:
/// returns `[T, heads + 2 kv_heads, d]` with the query and key heads rotated. None when
/// the kernel does not apply (odd head sizes, mixed dtypes).
pub(super) fn qkv_rope(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<Option<Tensor>> {
    let (t, width) = qkv.dims2()?;
    let all = heads + 2 * kv_heads;
    let v = 16 / qkv.dtype().size_in_bytes();
    let same = |x: &Tensor| x.dtype() == qkv.dtype() && x.device().same_device(qkv.device());
    if !fused_enabled("VERDICT_CUDA_ROPE")
        || width != all * d
        || !(d / 2).is_multiple_of(v)
        || d % 2 != 0
        || cos.dims() != [t, d / 2]
        || sin.dims() != [t, d / 2]
        || !same(cos)
        || !same(sin)
        || bias.is_some_and(|b| b.dims() != [width] || !same(b) || !aligned_in_place(b))
    {
        return Ok(None);
    }
    let op = QkvRope {
        bias: bias.cloned(),
        heads: all,
        rot_heads: heads + kv_heads,
        d,
    };
    let out = aligned(qkv)?.apply_op3_no_bwd(&aligned(cos)?, &aligned(sin)?, &op)?;
    Ok(Some(out))
}

struct QkvRope {
    bias: Option<Tensor>,
    heads: usize,
    rot_heads: usize,
    d: usize,
}

impl QkvRope {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr + CudaDType>(
        &self,
        dev: &CudaDevice,
        suffix: &str,
        x: &CudaSlice<T>,
        xl: &Layout,
        c: &CudaSlice<T>,
        cl: &Layout,
        s: &CudaSlice<T>,
        sl: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let n = xl.shape().elem_count();
        let tokens = (n / (self.heads * self.d)) as i64;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n == 0 {
            return Ok(out);
        }
        let func = dev.get_or_load_custom_func(&format!("qkv_rope_{suffix}"), MODULE, PTX)?;
        let v = 16 / std::mem::size_of::<T>();
        let cfg = elementwise_cfg(n / 2 / v);
        let (xv, cv, sv) = (
            x.slice(xl.start_offset()..),
            c.slice(cl.start_offset()..),
            s.slice(sl.start_offset()..),
        );
        let (heads, rot, d) = (self.heads as i32, self.rot_heads as i32, self.d as i32);
        let mut run = |bias: Option<&CudaView<'_, T>>| {
            let null = 0u64;
            let mut b = func.builder();
            b.arg(&xv);
            match bias {
                Some(bv) => b.arg(bv),
                None => b.arg(&null),
            };
            b.arg(&cv).arg(&sv).arg(&mut out);
            b.arg(&tokens).arg(&heads).arg(&rot).arg(&d);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        };
        match &self.bias {
            Some(bias) => held_slice::<T>(bias, |bv| run(Some(bv)))?,
            None => run(None)?,
        }
        Ok(out)
    }
}

impl CustomOp3 for QkvRope {
    fn name(&self) -> &'static str {
        "verdict-qkv-rope"
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
        candle_core::bail!("verdict-qkv-rope runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let slice = match (&xs.slice, &cs.slice, &ss.slice) {
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(s)) => {
                CudaStorageSlice::BF16(self.launch(&dev, "bf16", x, xl, c, cl, s, sl)?)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(c), CudaStorageSlice::F16(s)) => {
                CudaStorageSlice::F16(self.launch(&dev, "f16", x, xl, c, cl, s, sl)?)
            }
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(c), CudaStorageSlice::F32(s)) => {
                CudaStorageSlice::F32(self.launch(&dev, "f32", x, xl, c, cl, s, sl)?)
            }
            _ => candle_core::bail!("verdict-qkv-rope: bf16, f16 or f32, all the same"),
        };
        let tokens = xl.shape().elem_count() / (self.heads * self.d);
        Ok((
            CudaStorage { slice, device: dev },
            Shape::from((tokens, self.heads, self.d)),
        ))
    }
}
