//! Qwen2-VL's `smart_resize` and the image resampling that transformers'
//! torchvision backend runs on uint8 images.
//!
//! torchvision 0.29 resizes a uint8 CPU tensor with BICUBIC (or BILINEAR) and
//! `antialias=True` natively in uint8 (`_do_native_uint8_resize_on_cpu`): torch's
//! antialiased separable kernel with Pillow-style fixed-point weights. Per axis:
//! `scale = in / out`, `support = 2 * max(scale, 1)` (bicubic; 1 for bilinear),
//! filter taps `f((j + xmin - center + 0.5) / max(scale, 1))` for
//! `center = scale * (i + 0.5)`, with Keys' cubic at a = -0.5 (torch's choice for
//! the antialiased path, as Pillow; a = -0.75 is only its non-antialiased
//! bicubic), normalised to sum 1, then scaled to int16 at the largest precision
//! that keeps the biggest weight below 2^15. The horizontal pass runs first into
//! a uint8 buffer, then the vertical pass; each output is
//! `clamp((sum + 2^(p-1)) >> p, 0, 255)`. An axis whose size does not change is
//! skipped, and a same-size resize returns the input (torchvision does too).
//! The float path (cast, interpolate, clamp, round) is only taken on CUDA or on
//! CPUs without AVX2, which transformers does not use for CPU preprocessing.

use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// The resampling filters transformers' Qwen2-VL processors can ask for
/// (`resample` in the processor config, PIL numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// PIL 2.
    Bilinear,
    /// PIL 3 (the Qwen2-VL default).
    Bicubic,
}

impl Filter {
    pub fn from_pil(code: i64) -> Option<Filter> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn half_width(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// transformers' `smart_resize`: the (height, width) closest to the input's
/// aspect ratio with both sides multiples of `factor` and the area within
/// `[min_pixels, max_pixels]`. Python's `round` is round-half-even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(EngineError::validation(format!(
            "image has an empty side ({width}x{height})"
        )));
    }
    if factor == 0 {
        return Err(EngineError::Config(
            "patch_size * merge_size must be positive".into(),
        ));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(EngineError::validation(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio} ({width}x{height})"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One axis' taps in fixed point: output `i` reads `len[i]` inputs from
/// `start[i]` with weights `weights[i * stride..]`, scaled by `2^precision`.
struct Taps {
    start: Vec<usize>,
    len: Vec<usize>,
    stride: usize,
    weights: Vec<i32>,
    precision: u32,
}

fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 {
        filter.half_width() * scale
    } else {
        filter.half_width()
    };
    let stride = (support.ceil() as usize) * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut wf = vec![0.0f64; out_size * stride];
    let mut wt_max = 0.0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // C++ casts to int64 truncate toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let xsize = (xmax - xmin).clamp(0, stride as i64) as usize;
        let w = &mut wf[i * stride..i * stride + xsize];
        let mut total = 0.0f64;
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = filter.eval((j as f64 + xmin as f64 - center + 0.5) * invscale);
            total += *wj;
        }
        if total != 0.0 {
            for wj in w.iter_mut() {
                *wj /= total;
                wt_max = wt_max.max(*wj);
            }
        }
        start.push(xmin as usize);
        len.push(xsize);
    }
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + wt_max * f64::from(1u32 << (precision + 1))) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let one = f64::from(1u32 << precision);
    let weights = wf
        .iter()
        .map(|&w| {
            let v = w * one;
            // int16 as torch stores them.
            (if v < 0.0 {
                (-0.5 + v) as i32
            } else {
                (0.5 + v) as i32
            }) as i16 as i32
        })
        .collect();
    Taps {
        start,
        len,
        stride,
        weights,
        precision,
    }
}

#[inline]
fn finish(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

/// Resize an interleaved RGB8 image (`width * height * 3` bytes) exactly as
/// torchvision does for a uint8 tensor (see the module docs).
pub fn resize_rgb8(
    src: &[u8],
    width: usize,
    height: usize,
    out_width: usize,
    out_height: usize,
    filter: Filter,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), width * height * 3);
    let horizontal = if out_width != width {
        Some(resize_horizontal(src, width, height, out_width, filter))
    } else {
        None
    };
    let mid: &[u8] = horizontal.as_deref().unwrap_or(src);
    if out_height != height {
        resize_vertical(mid, out_width, height, out_height, filter)
    } else {
        mid.to_vec()
    }
}

fn resize_horizontal(
    src: &[u8],
    width: usize,
    height: usize,
    out_width: usize,
    filter: Filter,
) -> Vec<u8> {
    let t = taps(width, out_width, filter);
    let half = 1i32 << (t.precision - 1).min(31);
    let mut out = vec![0u8; out_width * height * 3];
    out.par_chunks_mut(out_width * 3)
        .zip(src.par_chunks(width * 3))
        .for_each(|(dst, row)| {
            for x in 0..out_width {
                let w = &t.weights[x * t.stride..x * t.stride + t.len[x]];
                let s = &row[t.start[x] * 3..(t.start[x] + t.len[x]) * 3];
                let (mut r, mut g, mut b) = (half, half, half);
                for (wj, px) in w.iter().zip(s.chunks_exact(3)) {
                    r += wj * i32::from(px[0]);
                    g += wj * i32::from(px[1]);
                    b += wj * i32::from(px[2]);
                }
                dst[x * 3] = finish(r, t.precision);
                dst[x * 3 + 1] = finish(g, t.precision);
                dst[x * 3 + 2] = finish(b, t.precision);
            }
        });
    out
}

fn resize_vertical(
    src: &[u8],
    width: usize,
    height: usize,
    out_height: usize,
    filter: Filter,
) -> Vec<u8> {
    let t = taps(height, out_height, filter);
    let half = 1i32 << (t.precision - 1).min(31);
    let row_len = width * 3;
    let mut out = vec![0u8; row_len * out_height];
    out.par_chunks_mut(row_len).enumerate().for_each_init(
        || vec![0i32; row_len],
        |acc, (y, dst)| {
            acc.fill(half);
            let w = &t.weights[y * t.stride..y * t.stride + t.len[y]];
            for (j, &wj) in w.iter().enumerate() {
                let row = &src[(t.start[y] + j) * row_len..(t.start[y] + j + 1) * row_len];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += wj * i32::from(p);
                }
            }
            for (d, &a) in dst.iter_mut().zip(acc.iter()) {
                *d = finish(a, t.precision);
            }
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_python() {
        // Values from transformers' smart_resize (factor 28, default limits).
        assert_eq!(
            smart_resize(100, 150, 28, 3136, 28 * 28 * 16).unwrap(),
            (84, 112)
        );
        assert_eq!(
            smart_resize(3000, 4000, 28, 3136, 12845056).unwrap(),
            (2996, 4004)
        );
        assert_eq!(smart_resize(30, 40, 28, 3136, 12544).unwrap(), (56, 84));
        // Round-half-even: 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2.
        assert_eq!(smart_resize(42, 70, 28, 1, 1 << 30).unwrap(), (56, 56));
        let err = smart_resize(10, 2010, 28, 3136, 12845056).unwrap_err();
        assert!(err.to_string().contains("aspect ratio"), "{err}");
        assert!(smart_resize(0, 10, 28, 3136, 12845056).is_err());
    }

    #[test]
    fn same_size_is_identity_and_constant_stays_constant() {
        let src: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&src, 5, 4, 5, 4, Filter::Bicubic), src);
        let flat = vec![77u8; 31 * 17 * 3];
        for (w, h) in [(7, 5), (62, 40), (31, 3), (1, 1)] {
            let out = resize_rgb8(&flat, 31, 17, w, h, Filter::Bicubic);
            assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }
}
