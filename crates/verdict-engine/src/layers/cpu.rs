//! CPU fast paths that candle's generic ops leave on the table: a linear layer
//! that writes its bias into the output before the matmul accumulates onto it
//! (one pass and one allocation fewer per layer).

use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{EngineError, Result};

/// Runs `f` on the contiguous f32 data of a CPU tensor; None for anything else.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let data = cpu.as_slice::<f32>().ok()?;
    let start = layout.start_offset();
    Some(f(&data[start..start + t.elem_count()]))
}

/// `len` floats written by `write`, without a zeroing pass first (a matmul with
/// `read_dst` false overwrites its output; zeroing it cost ~4% of an encoder's time).
///
/// # Safety
/// `write` must initialise all `len` floats behind the pointer it gets.
unsafe fn filled_f32(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut buf: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    write(buf.as_mut_ptr().cast::<f32>());
    // SAFETY: `write` initialised every element (the caller's contract); the
    // allocation is handed over whole, as a Vec of the same layout.
    unsafe {
        buf.set_len(len);
        let mut buf = std::mem::ManuallyDrop::new(buf);
        Vec::from_raw_parts(buf.as_mut_ptr().cast::<f32>(), len, buf.capacity())
    }
}

/// candle's thread count, read once: asking each time parses /proc/cpuinfo.
fn num_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Matmuls smaller than this run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 24;

/// Query rows per attention task: a task's scores are at most this many rows
/// by the keys they see, so an 8k-token sequence needs a few MiB per task, not T².
const ATTENTION_ROWS: usize = 256;

/// `x [m, k] · wt (+ bias)` with `wt` as `[k, n]`, for contiguous f32 CPU tensors.
/// Returns None when the tensors are not of that kind (the caller falls back to candle).
pub(crate) fn linear_f32(
    x: &Tensor,
    wt: &Tensor,
    bias: Option<&[f32]>,
    act: Option<super::HiddenAct>,
) -> Result<Option<Tensor>> {
    let (Ok((m, k)), Ok((k2, n))) = (x.dims2(), wt.dims2()) else {
        return Ok(None);
    };
    if k != k2 || m == 0 {
        return Ok(None);
    }
    let out = with_cpu_f32(x, |xs| {
        with_cpu_f32(wt, |ws| {
            let threads = num_threads();
            // Waking the pool costs more than it saves on a few rows.
            let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // dst (+)= x · wt; with `accumulate` dst holds the bias already.
            // SAFETY: the slices cover m*k, k*n and m*n elements with the strides given:
            // lhs row-major [m, k]; rhs row-major [k, n]; dst row-major [m, n].
            let matmul = |dst: *mut f32, accumulate: bool| unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst,
                    1,
                    n as isize,
                    accumulate,
                    xs.as_ptr(),
                    1,
                    k as isize,
                    ws.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                )
            };
            let mut dst = match bias {
                Some(b) => {
                    let mut d = Vec::with_capacity(m * n);
                    for _ in 0..m {
                        d.extend_from_slice(b);
                    }
                    matmul(d.as_mut_ptr(), true);
                    d
                }
                // SAFETY: without `accumulate` the matmul writes every element.
                None => unsafe { filled_f32(m * n, |dst| matmul(dst, false)) },
            };
            // The activation runs on the fresh buffer while it is still in cache.
            if let Some(act) = act {
                act_in_place(&mut dst, act);
            }
            dst
        })
    })
    .flatten();
    match out {
        Some(dst) => Ok(Some(Tensor::from_vec(dst, (m, n), &Device::Cpu)?)),
        None => Ok(None),
    }
}

fn act_in_place(xs: &mut [f32], act: super::HiddenAct) {
    match act {
        super::HiddenAct::Gelu => super::simd::gelu_erf_in_place(xs),
        super::HiddenAct::GeluTanh => super::simd::gelu_tanh_in_place(xs),
        super::HiddenAct::Silu => super::simd::silu_in_place(xs),
        super::HiddenAct::Relu => xs.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

/// `act(gate) * up` for contiguous f32 CPU tensors of one shape, in one pass over
/// L1-sized chunks (instead of an activation pass, then a multiply that allocates);
/// None for other tensors.
pub(crate) fn act_mul_f32(
    gate: &Tensor,
    up: &Tensor,
    act: super::HiddenAct,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    const CHUNK: usize = 4096;
    if gate.shape() != up.shape() {
        return Ok(None);
    }
    let n = gate.elem_count();
    let out = with_cpu_f32(gate, |g| {
        with_cpu_f32(up, |u| {
            let mut buf: Vec<MaybeUninit<f32>> = Vec::with_capacity(n);
            // SAFETY: MaybeUninit needs no initialisation.
            unsafe { buf.set_len(n) };
            let chunk = |(i, dst): (usize, &mut [MaybeUninit<f32>])| {
                let range = i * CHUNK..i * CHUNK + dst.len();
                for (d, &v) in dst.iter_mut().zip(&g[range.clone()]) {
                    d.write(v);
                }
                // SAFETY: every element was written just above.
                let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
                act_in_place(dst, act);
                for (d, &v) in dst.iter_mut().zip(&u[range]) {
                    *d *= v;
                }
            };
            if n >= 1 << 16 && num_threads() > 1 {
                buf.par_chunks_mut(CHUNK).enumerate().for_each(chunk);
            } else {
                buf.chunks_mut(CHUNK).enumerate().for_each(chunk);
            }
            let mut buf = std::mem::ManuallyDrop::new(buf);
            // SAFETY: all n elements are initialised; same allocation and layout.
            unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<f32>(), n, buf.capacity()) }
        })
    })
    .flatten();
    match out {
        Some(out) => Ok(Some(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?)),
        None => Ok(None),
    }
}

/// The output buffer shared by attention tasks; each task writes its own
/// (sequence rows × head columns) block, so writes never overlap.
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint regions (see `attention_f32`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// One block of attention scores (query rows `row0..row0 + rows` of a sequence,
/// against all its `len` keys), handed to a [`ScoreBias`].
pub(crate) struct ScoreBlock<'a> {
    /// Index of the sequence in the batch.
    pub seq: usize,
    /// Its first row in the packed buffers.
    pub start: usize,
    pub len: usize,
    pub head: usize,
    /// The block's first query row, within the sequence.
    pub row0: usize,
    pub rows: usize,
    /// `rows × len` scores, row-major, already multiplied by the scale.
    pub scores: &'a mut [f32],
}

/// Adds a term to each block of scores before the softmax (DeBERTa's relative
/// positions); only for unmasked (bidirectional, windowless) attention.
pub(crate) type ScoreBias<'a> = &'a (dyn Fn(ScoreBlock) + Sync);

/// Packed attention on contiguous f32 CPU tensors: `q` `[T, heads*d]`,
/// `k`/`v` `[T, kv_heads*d]`. One task per (sequence, head, block of
/// `ATTENTION_ROWS` query rows), each two single-threaded matmuls straight on the
/// packed buffers (no copies, no padding) over only the keys the block can see:
/// causal rows never look past their diagonal, windows skip the keys outside them,
/// and a long sequence never holds more than a block of scores per task.
/// `window` is the causal window when `causal`, else a radius: |i - j| <= window.
/// `bias` is added to the scores before the softmax when given.
/// Returns None when the tensors are not contiguous f32 on the CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cu_seqlens: &[usize],
    causal: bool,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    bias: Option<ScoreBias>,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if bias.is_some() && (causal || window.is_some()) {
        return Err(EngineError::Config(
            "internal: an attention score bias needs unmasked attention".into(),
        ));
    }
    // Checked before anything is allocated: this runs first for GPU tensors too, and a
    // zeroed host buffer of T × heads × d floats per layer once cost more host time
    // than the GPU spent on the whole layer.
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(on_cpu_f32(q) && on_cpu_f32(k) && on_cpu_f32(v)) {
        return Ok(None);
    }
    let t = *cu_seqlens.last().unwrap_or(&0);
    let d = head_dim;
    let (q_stride, kv_stride) = (heads * d, kv_heads * d);
    if q.elem_count() != t * q_stride
        || k.elem_count() != t * kv_stride
        || v.elem_count() != t * kv_stride
    {
        return Ok(None);
    }
    let group = heads / kv_heads;
    // Keys visible to query row i of a sequence of `len`, as a range [lo, hi).
    let keys_of = |i: usize, len: usize| -> (usize, usize) {
        match (causal, window) {
            (true, w) => (w.map_or(0, |w| (i + 1).saturating_sub(w)), i + 1),
            (false, Some(r)) => (i.saturating_sub(r), len.min(i.saturating_add(r) + 1)),
            (false, None) => (0, len),
        }
    };
    let mut out = vec![0f32; t * q_stride];
    let shared = SharedOut(out.as_mut_ptr());
    let done = with_cpu_f32(q, |qs| {
        with_cpu_f32(k, |ks| {
            with_cpu_f32(v, |vs| {
                // (sequence, sequence start, sequence length, head, first row, end row)
                type Task = (usize, usize, usize, usize, usize, usize);
                let tasks: Vec<Task> = cu_seqlens
                    .windows(2)
                    .enumerate()
                    .flat_map(|(seq, w)| {
                        let (start, len) = (w[0], w[1] - w[0]);
                        (0..heads).flat_map(move |h| {
                            (0..len).step_by(ATTENTION_ROWS).map(move |r0| {
                                (seq, start, len, h, r0, len.min(r0 + ATTENTION_ROWS))
                            })
                        })
                    })
                    .collect();
                let work: usize = tasks
                    .iter()
                    .map(|&(_, _, len, _, r0, r1)| {
                        let (k0, k1) = (keys_of(r0, len).0, keys_of(r1 - 1, len).1);
                        (r1 - r0) * (k1 - k0) * d
                    })
                    .sum();
                let run_task = |&(seq, start, len, h, r0, r1): &Task| {
                    let kh = h / group;
                    let rows = r1 - r0;
                    // Keys of the whole block: from the first row's first to the last row's last.
                    let (k0, k1) = (keys_of(r0, len).0, keys_of(r1 - 1, len).1);
                    let cols = k1 - k0;
                    // SAFETY: all offsets stay inside this sequence's rows of the
                    // [T, stride] buffers; strides match the layouts above; with
                    // `read_dst` false the matmul writes all rows x cols scores.
                    let mut scores = unsafe {
                        filled_f32(rows * cols, |scores| {
                            gemm::gemm(
                                rows,
                                cols,
                                d,
                                scores,
                                1,
                                cols as isize,
                                false,
                                qs.as_ptr().add((start + r0) * q_stride + h * d),
                                1,
                                q_stride as isize,
                                ks.as_ptr().add((start + k0) * kv_stride + kh * d),
                                kv_stride as isize,
                                1,
                                0.0,
                                scale,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        })
                    };
                    if let Some(bias) = bias {
                        bias(ScoreBlock {
                            seq,
                            start,
                            len,
                            head: h,
                            row0: r0,
                            rows,
                            scores: &mut scores,
                        });
                    }
                    for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
                        let (lo, hi) = keys_of(r0 + i, len);
                        let (lo, hi) = (lo - k0, hi - k0);
                        if let Some(cap) = softcap {
                            row[lo..hi]
                                .iter_mut()
                                .for_each(|s| *s = cap * (*s / cap).tanh());
                        }
                        super::simd::softmax_in_place(&mut row[lo..hi]);
                        row[..lo].iter_mut().for_each(|s| *s = 0.0);
                        row[hi..].iter_mut().for_each(|s| *s = 0.0);
                    }
                    let dst = &shared;
                    // SAFETY: this task alone writes rows start+r0..start+r1, columns h*d..(h+1)*d.
                    unsafe {
                        gemm::gemm(
                            rows,
                            d,
                            cols,
                            dst.0.add((start + r0) * q_stride + h * d),
                            1,
                            q_stride as isize,
                            false,
                            scores.as_ptr(),
                            1,
                            cols as isize,
                            vs.as_ptr().add((start + k0) * kv_stride + kh * d),
                            1,
                            kv_stride as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                };
                // Waking the pool costs more than it saves on small batches.
                if work >= PARALLEL_MIN_MACS {
                    tasks.par_iter().for_each(run_task);
                } else {
                    tasks.iter().for_each(run_task);
                }
            })
        })
    })
    .flatten()
    .flatten();
    if done.is_none() {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(out, (t, q_stride), &Device::Cpu)?))
}
