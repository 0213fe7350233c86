//! CPU fast paths that candle's generic ops leave on the table: a linear layer
//! that writes its bias into the output before the matmul accumulates onto it
//! (one pass and one allocation fewer per layer).

use candle_core::{DType, Device, Storage, Tensor};

use crate::error::Result;

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

/// candle's thread count, read once: asking each time parses /proc/cpuinfo.
fn num_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Matmuls smaller than this run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 24;

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
            let mut dst = match bias {
                Some(b) => {
                    let mut d = Vec::with_capacity(m * n);
                    for _ in 0..m {
                        d.extend_from_slice(b);
                    }
                    d
                }
                None => vec![0f32; m * n],
            };
            let threads = num_threads();
            // Waking the pool costs more than it saves on a few rows.
            let parallelism = if threads > 1 && m * n * k >= PARALLEL_MIN_MACS {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the slices cover m*k, k*n and m*n elements with the strides given:
            // lhs row-major [m, k]; rhs row-major [k, n]; dst row-major [m, n].
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    bias.is_some(),
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
                );
            }
            // The activation runs on the fresh buffer while it is still in cache.
            match act {
                Some(super::HiddenAct::Gelu) => super::simd::gelu_erf_in_place(&mut dst),
                Some(super::HiddenAct::GeluTanh) => super::simd::gelu_tanh_in_place(&mut dst),
                Some(super::HiddenAct::Silu) => super::simd::silu_in_place(&mut dst),
                Some(super::HiddenAct::Relu) => dst.iter_mut().for_each(|v| *v = v.max(0.0)),
                None => {}
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

/// The output buffer shared by attention tasks; each task writes its own
/// (sequence rows × head columns) block, so writes never overlap.
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint regions (see `attention_f32`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Packed attention on contiguous f32 CPU tensors: `q` `[T, heads*d]`,
/// `k`/`v` `[T, kv_heads*d]`. One task per (sequence, head), each two
/// single-threaded matmuls straight on the packed buffers (no copies, no
/// padding, causal rows never look past their diagonal). Returns None when
/// the tensors are not contiguous f32 on the CPU.
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
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
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
    let mut out = vec![0f32; t * q_stride];
    let shared = SharedOut(out.as_mut_ptr());
    let done = with_cpu_f32(q, |qs| {
        with_cpu_f32(k, |ks| {
            with_cpu_f32(v, |vs| {
                let tasks: Vec<(usize, usize, usize)> = cu_seqlens
                    .windows(2)
                    .flat_map(|w| (0..heads).map(move |h| (w[0], w[1] - w[0], h)))
                    .filter(|&(_, len, _)| len > 0)
                    .collect();
                let work: usize = tasks.iter().map(|&(_, len, _)| len * len * d).sum();
                let run_task = |&(start, len, h): &(usize, usize, usize)| {
                    let kh = h / group;
                    let mut scores = vec![0f32; len * len];
                    // SAFETY: all offsets stay inside this sequence's rows of the
                    // [T, stride] buffers; strides match the layouts above.
                    unsafe {
                        gemm::gemm(
                            len,
                            len,
                            d,
                            scores.as_mut_ptr(),
                            1,
                            len as isize,
                            false,
                            qs.as_ptr().add(start * q_stride + h * d),
                            1,
                            q_stride as isize,
                            ks.as_ptr().add(start * kv_stride + kh * d),
                            kv_stride as isize,
                            1,
                            0.0,
                            scale,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    for i in 0..len {
                        let row = &mut scores[i * len..(i + 1) * len];
                        let (lo, hi) = if causal {
                            (window.map_or(0, |w| (i + 1).saturating_sub(w)), i + 1)
                        } else {
                            (0, len)
                        };
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
                    // SAFETY: this task alone writes rows start..start+len, columns h*d..(h+1)*d.
                    unsafe {
                        gemm::gemm(
                            len,
                            d,
                            len,
                            dst.0.add(start * q_stride + h * d),
                            1,
                            q_stride as isize,
                            false,
                            scores.as_ptr(),
                            1,
                            len as isize,
                            vs.as_ptr().add(start * kv_stride + kh * d),
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
