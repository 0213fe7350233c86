//! Fused memory-bound steps on CUDA (`kernels/fused.cu`): bias + activation after a
//! matmul, `act(gate) * up` of the gated MLPs, residual add + RMSNorm, and bias +
//! rotary embedding over a packed QKV projection. Each replaces two to five candle
//! ops (and candle's strided broadcast path for the bias) with one pass.
//!
//! For comparisons, `VERDICT_CUDA_NORM=0` sends the norms back to candle's ops and
//! `VERDICT_CUDA_ROPE=0` the rotary embedding (see also `VERDICT_CUDA_QKV` in qkv.rs).
//!
//! Also the plumbing our CUDA ops share (here and in cuda_attention.rs): [`Ptx`] loads
//! their kernels, [`KernelOp`] + [`CudaOp`] turn one into a candle custom op.

use std::ops::Range;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t;
use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor,
};

use super::HiddenAct;
use crate::error::Result;

const FUSED: Ptx = Ptx::new(
    "verdict_fused",
    include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")),
);

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

/// One of our PTX modules (`kernels/*.cu`, compiled by build.rs).
pub(super) struct Ptx {
    module: &'static str,
    source: &'static str,
}

impl Ptx {
    pub(super) const fn new(module: &'static str, source: &'static str) -> Self {
        Self { module, source }
    }

    /// The kernel `name` (candle loads the module once per device).
    pub(super) fn kernel(&self, dev: &CudaDevice, name: &str) -> candle_core::Result<Kernel> {
        let func = dev.get_or_load_custom_func(name, self.module, self.source)?;
        Ok(Kernel {
            func: func.into_cuda_function(),
            stream: dev.cuda_stream(),
        })
    }
}

/// A loaded kernel and the stream it runs on (candle's own handle has no public name).
pub(super) struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    pub(super) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// A grid of `blocks` (x, y) blocks of `threads` threads, no dynamic shared memory.
pub(super) fn launch_cfg(blocks: (usize, usize), threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0 as u32, blocks.1 as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A CUDA-only op over one to three operands of one dtype (bf16, f16 or f32); wrapped
/// in [`CudaOp`] it is a candle custom op.
pub(super) trait KernelOp {
    const NAME: &'static str;
    /// The operands' names, in order, for the dtype error.
    const OPERANDS: &'static [&'static str];

    /// Launches the kernel, which must write every element of `call.out`.
    fn launch<T: DeviceRepr + CudaDType>(&self, call: Launch<'_, T>) -> candle_core::Result<()>;

    /// The result's shape, given the first operand's layout and the operand count.
    fn out_shape(&self, first: &Layout, _operands: usize) -> Shape {
        first.shape().clone()
    }
}

/// An operand's device memory from its layout's start, and the layout.
pub(super) struct Operand<'a, T> {
    pub(super) view: CudaView<'a, T>,
    pub(super) layout: &'a Layout,
}

/// One launch of a [`KernelOp`]: `dtype` ("bf16", "f16", "f32") ends the kernel
/// names; `out` (not empty) is uninitialised.
pub(super) struct Launch<'a, T> {
    pub(super) dev: &'a CudaDevice,
    pub(super) dtype: &'static str,
    pub(super) operands: &'a [Operand<'a, T>],
    pub(super) out: &'a mut CudaSlice<T>,
}

/// Candle's custom-op traits for a [`KernelOp`], with no CPU path.
pub(super) struct CudaOp<K>(pub(super) K);

impl<K: KernelOp> CudaOp<K> {
    fn forward(
        &self,
        operands: &[(&CudaStorage, &Layout)],
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (first, layout) = operands[0];
        if operands.iter().any(|(s, _)| s.dtype() != first.dtype()) {
            return Err(dtype_error::<K>(operands.len()));
        }
        let dev = first.device().clone();
        let shape = self.0.out_shape(layout, operands.len());
        let n = shape.elem_count();
        let slice = match &first.slice {
            CudaStorageSlice::BF16(_) => {
                CudaStorageSlice::BF16(self.launch_as(&dev, "bf16", operands, n)?)
            }
            CudaStorageSlice::F16(_) => {
                CudaStorageSlice::F16(self.launch_as(&dev, "f16", operands, n)?)
            }
            CudaStorageSlice::F32(_) => {
                CudaStorageSlice::F32(self.launch_as(&dev, "f32", operands, n)?)
            }
            _ => return Err(dtype_error::<K>(operands.len())),
        };
        Ok((CudaStorage { slice, device: dev }, shape))
    }

    fn launch_as<T: DeviceRepr + CudaDType>(
        &self,
        dev: &CudaDevice,
        dtype: &'static str,
        operands: &[(&CudaStorage, &Layout)],
        n: usize,
    ) -> candle_core::Result<CudaSlice<T>> {
        let operands = operands
            .iter()
            .map(|&(s, layout)| {
                let view = s.as_cuda_slice::<T>()?.slice(layout.start_offset()..);
                Ok(Operand { view, layout })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // SAFETY: `KernelOp::launch` writes every element.
        let mut out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            self.0.launch(Launch {
                dev,
                dtype,
                operands: &operands,
                out: &mut out,
            })?;
        }
        Ok(out)
    }
}

/// "NAME: x must be ..." for one operand, "NAME: x and y must share ..." for more.
fn dtype_error<K: KernelOp>(operands: usize) -> candle_core::Error {
    let names = &K::OPERANDS[..operands.min(K::OPERANDS.len())];
    let which = match names.split_last() {
        Some((last, [])) => format!("{last} must be"),
        Some((last, init)) => format!("{} and {last} must share", init.join(", ")),
        None => "operands must share".to_string(),
    };
    candle_core::Error::Msg(format!("{}: {which} bf16, f16 or f32", K::NAME)).bt()
}

/// `CustomOp1` to `CustomOp3` differ only in their number of operands.
macro_rules! impl_custom_op {
    ($op:ident $(, $s:ident: $l:ident)+) => {
        impl<K: KernelOp> $op for CudaOp<K> {
            fn name(&self) -> &'static str {
                K::NAME
            }

            fn cpu_fwd(
                &self,
                $($s: &CpuStorage, $l: &Layout),+
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                let _ = ($($s, $l),+);
                candle_core::bail!("{} runs on CUDA only", K::NAME)
            }

            fn cuda_fwd(
                &self,
                $($s: &CudaStorage, $l: &Layout),+
            ) -> candle_core::Result<(CudaStorage, Shape)> {
                self.forward(&[$(($s, $l)),+])
            }
        }
    };
}

impl_custom_op!(CustomOp1, s1: l1);
impl_custom_op!(CustomOp2, s1: l1, s2: l2);
impl_custom_op!(CustomOp3, s1: l1, s2: l2, s3: l3);

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
    Ok(if aligned_in_place(t) {
        t.clone()
    } else {
        t.force_contiguous()?
    })
}

/// A held weight must already be contiguous at a 16-byte boundary.
fn aligned_in_place(t: &Tensor) -> bool {
    t.is_contiguous() && (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
}

/// The CUDA storage of a tensor held by an op (weights, biases): its slice of type `T`
/// from the tensor's start, checked against the dtype of the launch.
pub(super) fn held_slice<T: DeviceRepr + CudaDType>(
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

/// [`held_slice`] for an optional tensor (a bias, a position term): `f` gets `None`
/// when there is none.
pub(super) fn held_optional<T: DeviceRepr + CudaDType>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&CudaView<'_, T>>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    match t {
        Some(t) => held_slice::<T>(t, |view| f(Some(view))),
        None => f(None),
    }
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

/// Up to 16 blocks per SM of an H100 (132 SMs); the kernels loop over the rest.
fn elementwise_cfg(vectors: usize) -> LaunchConfig {
    launch_cfg((vectors.div_ceil(256).clamp(1, 132 * 16), 1), 256)
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
    let op = CudaOp(BiasAct { act: act_code(act) });
    let x = aligned(x)?;
    Ok(Some(match bias {
        Some(b) => x.apply_op2_no_bwd(&aligned(b)?, &op)?,
        None => x.apply_op1_no_bwd(&op)?,
    }))
}

/// `act(gate) * up`, both the same shape.
pub(super) fn act_mul(gate: &Tensor, up: &Tensor, act: HiddenAct) -> Result<Tensor> {
    let op = CudaOp(ActMul {
        act: act_code(Some(act)),
    });
    Ok(aligned(gate)?.apply_op2_no_bwd(&aligned(up)?, &op)?)
}

struct BiasAct {
    act: i32,
}

impl KernelOp for BiasAct {
    const NAME: &'static str = "verdict-bias-act";
    const OPERANDS: &'static [&'static str] = &["x", "bias"];

    fn launch<T: DeviceRepr + CudaDType>(&self, call: Launch<'_, T>) -> candle_core::Result<()> {
        let x = &call.operands[0];
        let bias = call.operands.get(1);
        let n = x.layout.shape().elem_count();
        let cols = x.layout.dims().last().copied().unwrap_or(1).max(1);
        let rows = (n / cols) as i64;
        let func = FUSED.kernel(call.dev, &format!("bias_act_{}", call.dtype))?;
        let vec = 16 / std::mem::size_of::<T>();
        let cfg = elementwise_cfg(n.div_ceil(vec));
        let cols = cols as i32;
        let mut b = func.builder();
        b.arg(&x.view);
        let null = 0u64;
        match bias {
            Some(bias) => b.arg(&bias.view),
            None => b.arg(&null),
        };
        b.arg(call.out).arg(&rows).arg(&cols).arg(&self.act);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

struct ActMul {
    act: i32,
}

impl KernelOp for ActMul {
    const NAME: &'static str = "verdict-act-mul";
    const OPERANDS: &'static [&'static str] = &["gate", "up"];

    fn launch<T: DeviceRepr + CudaDType>(&self, call: Launch<'_, T>) -> candle_core::Result<()> {
        let (gate, up) = (&call.operands[0], &call.operands[1]);
        if gate.layout.shape() != up.layout.shape() {
            candle_core::bail!(
                "verdict-act-mul: gate {:?} and up {:?}",
                gate.layout.shape(),
                up.layout.shape()
            );
        }
        let n = gate.layout.shape().elem_count();
        let func = FUSED.kernel(call.dev, &format!("act_mul_{}", call.dtype))?;
        let vec = 16 / std::mem::size_of::<T>();
        let cfg = elementwise_cfg(n.div_ceil(vec));
        let n = n as i64;
        let mut b = func.builder();
        b.arg(&gate.view).arg(&up.view).arg(call.out);
        b.arg(&n).arg(&self.act);
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// Which norm [`add_norm`] applies.
#[derive(Debug, Clone, Copy)]
pub(super) enum NormKind<'a> {
    /// `s * rsqrt(mean(s^2) + eps) * (weight + w_offset)`.
    Rms { w_offset: f32 },
    /// `(s - mean) * rsqrt(var + eps) * weight + bias`.
    Layer { bias: Option<&'a Tensor> },
}

/// What [`add_norm`] returns: the norm of `x + delta`, and the sum itself when asked.
pub(super) struct AddNorm {
    pub(super) sum: Option<Tensor>,
    pub(super) normed: Tensor,
}

/// `norm(x + delta)` in one pass over the rows (`delta` None: the norm of `x`), also
/// returning `x + delta` with `keep_sum`; `delta_bias` (the bias of the layer that
/// produced `delta`) is added to each row of `delta` in the same pass. None when the
/// kernel does not apply.
pub(super) fn add_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    delta_bias: Option<&Tensor>,
    keep_sum: bool,
    weight: &Tensor,
    kind: NormKind,
    eps: f32,
) -> Result<Option<AddNorm>> {
    let cols = x.dims().last().copied().unwrap_or(0);
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    let held_ok = |t: &Tensor| t.dims() == [cols] && same(t) && aligned_in_place(t);
    let (w_offset, bias) = match kind {
        NormKind::Rms { w_offset } => (w_offset, None),
        NormKind::Layer { bias } => (0.0, bias),
    };
    if !fused_enabled("VERDICT_CUDA_NORM")
        || cols == 0
        || !held_ok(weight)
        || bias.is_some_and(|b| !held_ok(b))
        || delta_bias.is_some_and(|b| delta.is_none() || !held_ok(b))
        || delta.is_some_and(|d| d.shape() != x.shape() || !same(d))
    {
        return Ok(None);
    }
    let op = CudaOp(AddNormOp {
        eps,
        w_offset,
        center: matches!(kind, NormKind::Layer { .. }),
        keep_sum: keep_sum && delta.is_some(),
        cols,
        weight: weight.clone(),
        bias: bias.cloned(),
        delta_bias: delta_bias.cloned(),
    });
    let x = aligned(x)?;
    Ok(Some(match delta {
        Some(d) if keep_sum => {
            let both = x.apply_op2_no_bwd(&aligned(d)?, &op)?;
            AddNorm {
                sum: Some(both.get(0)?.reshape(x.shape())?),
                normed: both.get(1)?.reshape(x.shape())?,
            }
        }
        Some(d) => AddNorm {
            sum: None,
            normed: x.apply_op2_no_bwd(&aligned(d)?, &op)?,
        },
        None => AddNorm {
            sum: None,
            normed: x.apply_op1_no_bwd(&op)?,
        },
    }))
}

struct AddNormOp {
    eps: f32,
    w_offset: f32,
    /// LayerNorm (subtract the mean) rather than RMSNorm.
    center: bool,
    /// Write `x + delta` before the norm.
    keep_sum: bool,
    cols: usize,
    weight: Tensor,
    bias: Option<Tensor>,
    delta_bias: Option<Tensor>,
}

impl KernelOp for AddNormOp {
    const NAME: &'static str = "verdict-add-norm";
    const OPERANDS: &'static [&'static str] = &["x", "delta"];

    /// Writes `[sum; normed]` (with `keep_sum`) or `normed`.
    fn launch<T: DeviceRepr + CudaDType>(&self, call: Launch<'_, T>) -> candle_core::Result<()> {
        let x = &call.operands[0];
        let delta = call.operands.get(1);
        let n = x.layout.shape().elem_count();
        let rows = n / self.cols;
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
        let cfg = launch_cfg((rows, 1), threads);
        let func = FUSED.kernel(call.dev, &format!("add_norm_{}", call.dtype))?;
        let (cols, vpt, center) = (self.cols as i32, vpt as i32, self.center as i32);
        let null = 0u64;
        held_slice::<T>(&self.weight, |w| {
            let launch = |delta_bias: Option<&CudaView<'_, T>>,
                          b_arg: Option<&CudaView<'_, T>>|
             -> candle_core::Result<()> {
                let mut b = func.builder();
                b.arg(&x.view);
                match delta {
                    Some(d) => b.arg(&d.view),
                    None => b.arg(&null),
                };
                match delta_bias {
                    Some(db) => b.arg(db),
                    None => b.arg(&null),
                };
                b.arg(w);
                match b_arg {
                    Some(bias) => b.arg(bias),
                    None => b.arg(&null),
                };
                let sum = call.out.slice(0..n);
                let normed = call.out.slice(if self.keep_sum { n.. } else { 0.. });
                if self.keep_sum {
                    b.arg(&sum);
                } else {
                    b.arg(&null);
                }
                b.arg(&normed)
                    .arg(&cols)
                    .arg(&self.eps)
                    .arg(&vpt)
                    .arg(&self.w_offset)
                    .arg(&center);
                // SAFETY: the argument list matches the kernel's signature.
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            };
            held_optional::<T>(self.delta_bias.as_ref(), |delta_bias| {
                held_optional::<T>(self.bias.as_ref(), |bias| launch(delta_bias, bias))
            })
        })
    }

    /// `[2, rows, cols]` (sum and normed) with `keep_sum`, else the shape of `x`.
    fn out_shape(&self, x: &Layout, _operands: usize) -> Shape {
        if !self.keep_sum {
            return x.shape().clone();
        }
        let rows = x.shape().elem_count() / self.cols;
        Shape::from((2, rows, self.cols))
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
        || !d.is_multiple_of(2)
        || cos.dims() != [t, d / 2]
        || sin.dims() != [t, d / 2]
        || !same(cos)
        || !same(sin)
        || bias.is_some_and(|b| b.dims() != [width] || !same(b) || !aligned_in_place(b))
    {
        return Ok(None);
    }
    let op = CudaOp(QkvRope {
        bias: bias.cloned(),
        heads: all,
        rot_heads: heads + kv_heads,
        d,
    });
    let out = aligned(qkv)?.apply_op3_no_bwd(&aligned(cos)?, &aligned(sin)?, &op)?;
    Ok(Some(out))
}

struct QkvRope {
    bias: Option<Tensor>,
    heads: usize,
    rot_heads: usize,
    d: usize,
}

impl KernelOp for QkvRope {
    const NAME: &'static str = "verdict-qkv-rope";
    const OPERANDS: &'static [&'static str] = &["qkv", "cos", "sin"];

    fn launch<T: DeviceRepr + CudaDType>(&self, call: Launch<'_, T>) -> candle_core::Result<()> {
        let (x, cos, sin) = (&call.operands[0], &call.operands[1], &call.operands[2]);
        let n = x.layout.shape().elem_count();
        let tokens = (n / (self.heads * self.d)) as i64;
        let func = FUSED.kernel(call.dev, &format!("qkv_rope_{}", call.dtype))?;
        let v = 16 / std::mem::size_of::<T>();
        let cfg = elementwise_cfg(n / 2 / v);
        let (heads, rot, d) = (self.heads as i32, self.rot_heads as i32, self.d as i32);
        let run = |bias: Option<&CudaView<'_, T>>| {
            let null = 0u64;
            let mut b = func.builder();
            b.arg(&x.view);
            match bias {
                Some(bv) => b.arg(bv),
                None => b.arg(&null),
            };
            b.arg(&cos.view).arg(&sin.view).arg(&mut *call.out);
            b.arg(&tokens).arg(&heads).arg(&rot).arg(&d);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        };
        held_optional::<T>(self.bias.as_ref(), run)
    }

    /// `[tokens, heads, d]`.
    fn out_shape(&self, x: &Layout, _operands: usize) -> Shape {
        let tokens = x.shape().elem_count() / (self.heads * self.d);
        Shape::from((tokens, self.heads, self.d))
    }
}

/// `y += u b` in place, as one cuBLAS GEMM with beta 1. `y` `[T, out]` must be
/// contiguous and not shared; `u` `[T, K]`; `b` `[K, out]`, contiguous or the
/// transpose of a contiguous `[out, K]` (a layer's weight, read as stored).
pub(crate) fn add_matmul_in_place(y: &Tensor, u: &Tensor, b: &Tensor) -> Result<()> {
    let u = u.contiguous()?;
    let (k, _) = b.dims2()?;
    let b = if b.stride() == [1, k] || b.is_contiguous() {
        b.clone()
    } else {
        b.contiguous()?
    };
    y.inplace_op3(&u, &b, &AddMatmul)?;
    Ok(())
}

struct AddMatmul;

impl candle_core::InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "verdict-add-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("verdict-add-matmul runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        y: &mut CudaStorage,
        y_layout: &Layout,
        u: &CudaStorage,
        u_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (rows, out) = y_layout.shape().dims2()?;
        let (u_rows, rank) = u_layout.shape().dims2()?;
        let (b_rank, b_out) = b_layout.shape().dims2()?;
        if u_rows != rows || b_rank != rank || b_out != out {
            candle_core::bail!(
                "verdict-add-matmul: [{rows}, {out}] += [{u_rows}, {rank}] x [{b_rank}, {b_out}]"
            );
        }
        // b as stored `[K, out]`, or the transpose of a stored `[out, K]`.
        let b_transposed = !b_layout.is_contiguous();
        if !(y_layout.is_contiguous()
            && u_layout.is_contiguous()
            && (!b_transposed || b_layout.stride() == [1, rank]))
        {
            candle_core::bail!("verdict-add-matmul: operands must be contiguous");
        }
        if rows == 0 || out == 0 || rank == 0 {
            return Ok(());
        }
        let blas = y.device.cublas_handle();
        let stream = y.device.cuda_stream();
        let (y_start, u_start, b_start) = (
            y_layout.start_offset(),
            u_layout.start_offset(),
            b_layout.start_offset(),
        );
        fn run<T: DeviceRepr>(
            (blas, stream): (&CudaBlas, &Arc<CudaStream>),
            data_type: cudaDataType_t,
            (y, u, b): (&mut CudaSlice<T>, &CudaSlice<T>, &CudaSlice<T>),
            (y_start, u_start, b_start): (usize, usize, usize),
            gemm: RowMajorGemm,
        ) -> candle_core::Result<()> {
            let (y_ptr, _y_guard) = y.device_ptr_mut(stream);
            let (u_ptr, _u_guard) = u.device_ptr(stream);
            let (b_ptr, _b_guard) = b.device_ptr(stream);
            let at = |ptr: u64, start: usize| ptr + (start * std::mem::size_of::<T>()) as u64;
            // SAFETY: the layouts were checked against the shapes, on the handle's stream.
            unsafe {
                gemm.run(
                    blas,
                    data_type,
                    at(u_ptr, u_start),
                    at(b_ptr, b_start),
                    at(y_ptr, y_start),
                )
            }
        }
        let gemm = RowMajorGemm {
            rows,
            cols: out,
            k: rank,
            lda: rank,
            ldb: if b_transposed { rank } else { out },
            b_transposed,
            ldc: out,
            beta: 1.0,
        };
        let handles = (blas.as_ref(), &stream);
        let offsets = (y_start, u_start, b_start);
        match (&mut y.slice, &u.slice, &b.slice) {
            (
                CudaStorageSlice::BF16(ys),
                CudaStorageSlice::BF16(us),
                CudaStorageSlice::BF16(bs),
            ) => run(
                handles,
                cudaDataType_t::CUDA_R_16BF,
                (ys, us, bs),
                offsets,
                gemm,
            ),
            (CudaStorageSlice::F16(ys), CudaStorageSlice::F16(us), CudaStorageSlice::F16(bs)) => {
                run(
                    handles,
                    cudaDataType_t::CUDA_R_16F,
                    (ys, us, bs),
                    offsets,
                    gemm,
                )
            }
            (CudaStorageSlice::F32(ys), CudaStorageSlice::F32(us), CudaStorageSlice::F32(bs)) => {
                run(
                    handles,
                    cudaDataType_t::CUDA_R_32F,
                    (ys, us, bs),
                    offsets,
                    gemm,
                )
            }
            _ => candle_core::bail!(
                "verdict-add-matmul: y, u and b must share a dtype (bf16, f16 or f32)"
            ),
        }
    }
}

/// One row-major GEMM `c[rows, cols] = a[rows, k] b[k, cols] + beta c` on device
/// pointers, each operand's rows `ld*` elements apart; `b_transposed`: `b` is the
/// transpose of a stored `[cols, k]` (a layer's weight, read as stored).
struct RowMajorGemm {
    rows: usize,
    cols: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    b_transposed: bool,
    ldc: usize,
    beta: f32,
}

impl RowMajorGemm {
    /// Row-major `c = a b` is column-major `c^T = b^T a^T`: cuBLAS's A is `b`, its B
    /// is `a`. fp32 accumulation for every dtype, as candle's own matmuls.
    ///
    /// # Safety
    /// The pointers must cover the shapes with their leading dimensions, in memory
    /// of `data_type` on the handle's stream.
    unsafe fn run(
        &self,
        blas: &CudaBlas,
        data_type: cudaDataType_t,
        a: u64,
        b: u64,
        c: u64,
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result, sys};
        if self.rows == 0 || self.cols == 0 || self.k == 0 {
            return Ok(());
        }
        let alpha = 1f32;
        let op_b = if self.b_transposed {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        };
        result::gemm_ex(
            *blas.handle(),
            op_b,
            sys::cublasOperation_t::CUBLAS_OP_N,
            self.cols as i32,
            self.rows as i32,
            self.k as i32,
            &alpha as *const f32 as *const _,
            b as *const _,
            data_type,
            self.ldb as i32,
            a as *const _,
            data_type,
            self.lda as i32,
            &self.beta as *const f32 as *const _,
            c as *mut _,
            data_type,
            self.ldc as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
    }
}

/// Each segment's low-rank update `x[rows] a_t[:, columns] b_t[columns, :]`, and
/// zeros in the rows no segment covers: `x` `[T, in]`, `a_t` `[in, R]` and `b_t`
/// `[R, out]` (the layer's factors of every loaded adapter, side by side) give
/// `[T, out]`, from one shrink GEMM `U = x a_t` and one expand GEMM per segment on
/// views of the operands, with no copy.
pub(crate) fn segmented_low_rank(
    x: &Tensor,
    a_t: &Tensor,
    b_t: &Tensor,
    segments: &[crate::lora::LoraSegment],
) -> Result<Tensor> {
    let op = SegmentedLowRank {
        segments: segments
            .iter()
            .map(|s| (s.rows.clone(), s.columns.clone()))
            .collect(),
    };
    Ok(x.contiguous()?.apply_op3_no_bwd(a_t, b_t, &op)?)
}

struct SegmentedLowRank {
    segments: Vec<(Range<usize>, Range<usize>)>,
}

impl SegmentedLowRank {
    fn run<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        dev: &CudaDevice,
        data_type: cudaDataType_t,
        (x, a, b): (&CudaSlice<T>, &CudaSlice<T>, &CudaSlice<T>),
        (x_start, a_start, b_start): (usize, usize, usize),
        (rows, inp, stacked, out): (usize, usize, usize, usize),
    ) -> candle_core::Result<CudaSlice<T>> {
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (first, last) = match (self.segments.first(), self.segments.last()) {
            (Some(first), Some(last)) => (first.0.start, last.0.end),
            _ => (0, 0),
        };
        // SAFETY: segments write their rows, and the gaps between them are zeroed below.
        let mut y = unsafe { dev.alloc::<T>(rows * out)? };
        // SAFETY: the shrink writes rows `first..last`, the rows the segments read.
        let u = unsafe { dev.alloc::<T>(rows.max(1) * stacked)? };
        let mut covered = 0;
        for (seg_rows, _) in self.segments.iter().chain([&(rows..rows, 0..0)]) {
            if seg_rows.start > covered {
                let mut gap = y.slice_mut(covered * out..seg_rows.start * out);
                stream.memset_zeros(&mut gap).w()?;
            }
            covered = seg_rows.end;
        }
        // The pointers' guards end before `y` is handed back.
        {
            let (x_ptr, _x_guard) = x.device_ptr(&stream);
            let (a_ptr, _a_guard) = a.device_ptr(&stream);
            let (b_ptr, _b_guard) = b.device_ptr(&stream);
            let (u_ptr, _u_guard) = u.device_ptr(&stream);
            let (y_ptr, _y_guard) = y.device_ptr_mut(&stream);
            let at = |ptr: u64, start: usize| ptr + (start * std::mem::size_of::<T>()) as u64;
            // The shrink runs over all the stacked columns at once: one GEMM over every
            // adapted row keeps the GPU busy, where one thin GEMM per segment (a rank's
            // columns over a few thousand rows) left most of it idle and was slower,
            // though it does an eighth of the work with 8 adapters.
            let shrink = RowMajorGemm {
                rows: last - first,
                cols: stacked,
                k: inp,
                lda: inp,
                ldb: stacked,
                b_transposed: false,
                ldc: stacked,
                beta: 0.0,
            };
            // SAFETY: rows first..last of x and u, all of a_t; on the handle's stream.
            unsafe {
                shrink.run(
                    &blas,
                    data_type,
                    at(x_ptr, x_start + first * inp),
                    at(a_ptr, a_start),
                    at(u_ptr, first * stacked),
                )?;
            }
            // Each segment expands only its own adapter's columns of U.
            for (rows, columns) in &self.segments {
                let expand = RowMajorGemm {
                    rows: rows.len(),
                    cols: out,
                    k: columns.len(),
                    lda: stacked,
                    ldb: out,
                    b_transposed: false,
                    ldc: out,
                    beta: 0.0,
                };
                // SAFETY: the rows and columns were checked against the operands' shapes;
                // every pointer is on `stream`, the handle's.
                unsafe {
                    expand.run(
                        &blas,
                        data_type,
                        at(u_ptr, rows.start * stacked + columns.start),
                        at(b_ptr, b_start + columns.start * out),
                        at(y_ptr, rows.start * out),
                    )?;
                }
            }
        }
        Ok(y)
    }
}

impl CustomOp3 for SegmentedLowRank {
    fn name(&self) -> &'static str {
        "verdict-segmented-low-rank"
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
        candle_core::bail!("verdict-segmented-low-rank runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, inp) = x_layout.shape().dims2()?;
        let (a_in, stacked) = a_layout.shape().dims2()?;
        let (b_stacked, out) = b_layout.shape().dims2()?;
        if a_in != inp || b_stacked != stacked {
            candle_core::bail!(
                "verdict-segmented-low-rank: [{rows}, {inp}] x [{a_in}, {stacked}] x [{b_stacked}, {out}]"
            );
        }
        if !(x_layout.is_contiguous() && a_layout.is_contiguous() && b_layout.is_contiguous()) {
            candle_core::bail!("verdict-segmented-low-rank: operands must be contiguous");
        }
        let mut previous_end = 0;
        for (seg_rows, columns) in &self.segments {
            if seg_rows.start < previous_end || seg_rows.end > rows || columns.end > stacked {
                candle_core::bail!(
                    "verdict-segmented-low-rank: segment rows {seg_rows:?} columns {columns:?} \
                     out of order or outside [{rows}, {stacked}]"
                );
            }
            previous_end = seg_rows.end;
        }
        let dev = &x.device;
        let starts = (
            x_layout.start_offset(),
            a_layout.start_offset(),
            b_layout.start_offset(),
        );
        let dims = (rows, inp, stacked, out);
        macro_rules! run_as {
            ($variant:ident, $data_type:ident, $operands:expr) => {
                CudaStorageSlice::$variant(self.run(
                    dev,
                    cudaDataType_t::$data_type,
                    $operands,
                    starts,
                    dims,
                )?)
            };
        }
        use CudaStorageSlice::{BF16, F16, F32};
        let slice = match (&x.slice, &a.slice, &b.slice) {
            (BF16(xs), BF16(a_s), BF16(bs)) => run_as!(BF16, CUDA_R_16BF, (xs, a_s, bs)),
            (F16(xs), F16(a_s), F16(bs)) => run_as!(F16, CUDA_R_16F, (xs, a_s, bs)),
            (F32(xs), F32(a_s), F32(bs)) => run_as!(F32, CUDA_R_32F, (xs, a_s, bs)),
            _ => candle_core::bail!(
                "verdict-segmented-low-rank: x, a_t and b_t must share a dtype (bf16, f16 or f32)"
            ),
        };
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((rows, out)),
        ))
    }
}

/// Each head's rows of `x` against that head's table: `x` `[T, heads, d]` (tokens any
/// stride apart, e.g. the query columns of a packed QKV projection), `table`
/// `[heads, d, count]` (the last dim contiguous, rows and heads any stride apart, e.g.
/// a column range of a wider table); returns `[heads, T, count]`, from one strided
/// batched GEMM with no copy of either operand.
pub(super) fn head_matmul(x: &Tensor, table: &Tensor) -> Result<Tensor> {
    let (heads, d, count) = table.dims3()?;
    let (tokens, x_heads, x_d) = x.dims3()?;
    if (x_heads, x_d) != (heads, d) || x.stride()[1..] != [d, 1] || table.stride()[2] != 1 {
        return Err(candle_core::Error::Msg(format!(
            "verdict-head-matmul: x {:?} (strides {:?}) against table {:?} (strides {:?})",
            x.dims(),
            x.stride(),
            table.dims(),
            table.stride()
        ))
        .into());
    }
    let op = CudaOp(HeadMatmul {
        heads,
        d,
        count,
        tokens,
    });
    Ok(x.apply_op2_no_bwd(table, &op)?)
}

struct HeadMatmul {
    heads: usize,
    d: usize,
    count: usize,
    tokens: usize,
}

impl KernelOp for HeadMatmul {
    const NAME: &'static str = "verdict-head-matmul";
    const OPERANDS: &'static [&'static str] = &["x", "table"];

    /// Row-major `out_h[T, count] = x_h[T, d] table_h[d, count]` is column-major
    /// `out_h^T = table_h^T x_h^T`: cuBLAS's A is the table (ld its row stride), its B
    /// is x (ld its row stride, heads `d` apart).
    fn launch<T: DeviceRepr + CudaDType>(&self, call: Launch<'_, T>) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result, sys};
        let (x, table) = (&call.operands[0], &call.operands[1]);
        let data_type = match call.dtype {
            "bf16" => sys::cudaDataType_t::CUDA_R_16BF,
            "f16" => sys::cudaDataType_t::CUDA_R_16F,
            _ => sys::cudaDataType_t::CUDA_R_32F,
        };
        let x_ld = x.layout.stride()[0];
        let t_stride = table.layout.stride();
        let stream = call.dev.cuda_stream();
        let blas = call.dev.cublas_handle();
        let (alpha, beta) = (1f32, 0f32);
        let (t_ptr, _t_guard) = table.view.device_ptr(&stream);
        let (x_ptr, _x_guard) = x.view.device_ptr(&stream);
        let (out_ptr, _out_guard) = call.out.device_ptr_mut(&stream);
        // SAFETY: the operands' views start at their layouts' offsets and cover the
        // strided extents checked in `head_matmul`; `out` holds heads * T * count.
        unsafe {
            result::gemm_strided_batched_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_N,
                self.count as i32,
                self.tokens as i32,
                self.d as i32,
                &alpha as *const f32 as *const _,
                t_ptr as *const _,
                data_type,
                t_stride[1] as i32,
                t_stride[0] as i64,
                x_ptr as *const _,
                data_type,
                x_ld as i32,
                self.d as i64,
                &beta as *const f32 as *const _,
                out_ptr as *mut _,
                data_type,
                self.count as i32,
                (self.tokens * self.count) as i64,
                self.heads as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(())
    }

    fn out_shape(&self, _x: &Layout, _operands: usize) -> Shape {
        Shape::from((self.heads, self.tokens, self.count))
    }
}
