// Fused memory-bound steps for the CUDA build (compiled to PTX by build.rs).
// Each reads its inputs once and writes once, in f32 math, 16 bytes per access
// where the row length allows it.
//
// - bias_act_*:  out = act(x + bias)      x [rows, cols], bias [cols] or none
// - act_mul_*:   out = act(gate) * up     all [n]
// act: 0 none, 1 exact (erf) GELU, 2 tanh GELU, 3 SiLU, 4 ReLU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef long long i64;

#include "convert.cuh"

__device__ __forceinline__ float act_f(float x, int act) {
    switch (act) {
        case 1: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
        case 2: {
            const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            return 0.5f * x * (1.f + tanhf(u));
        }
        case 3: return x / (1.f + expf(-x));
        case 4: return fmaxf(x, 0.f);
        default: return x;
    }
}

template <typename T>
__device__ void bias_act(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                         i64 rows, int cols, int act) {
    constexpr int V = 16 / sizeof(T);
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (cols % V == 0) {
        const i64 nv = rows * cols / V;
        for (i64 i = i0; i < nv; i += stride) {
            const int c = (int)((i * V) % cols);
            uint4 xv = reinterpret_cast<const uint4*>(x)[i];
            uint4 bv = bias ? *reinterpret_cast<const uint4*>(bias + c) : make_uint4(0, 0, 0, 0);
            const T* xe = reinterpret_cast<const T*>(&xv);
            const T* be = reinterpret_cast<const T*>(&bv);
            uint4 ov;
            T* oe = reinterpret_cast<T*>(&ov);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const float b = bias ? to_f(be[e]) : 0.f;
                oe[e] = from_f<T>(act_f(to_f(xe[e]) + b, act));
            }
            reinterpret_cast<uint4*>(out)[i] = ov;
        }
    } else {
        const i64 n = rows * cols;
        for (i64 i = i0; i < n; i += stride) {
            const float b = bias ? to_f(bias[i % cols]) : 0.f;
            out[i] = from_f<T>(act_f(to_f(x[i]) + b, act));
        }
    }
}

template <typename T>
__device__ void act_mul(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                        i64 n, int act) {
    constexpr int V = 16 / sizeof(T);
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 nv = n / V;
    for (i64 i = i0; i < nv; i += stride) {
        uint4 gv = reinterpret_cast<const uint4*>(gate)[i];
        uint4 uv = reinterpret_cast<const uint4*>(up)[i];
        const T* ge = reinterpret_cast<const T*>(&gv);
        const T* ue = reinterpret_cast<const T*>(&uv);
        uint4 ov;
        T* oe = reinterpret_cast<T*>(&ov);
#pragma unroll
        for (int e = 0; e < V; ++e) oe[e] = from_f<T>(act_f(to_f(ge[e]), act) * to_f(ue[e]));
        reinterpret_cast<uint4*>(out)[i] = ov;
    }
    for (i64 i = nv * V + i0; i < n; i += stride)
        out[i] = from_f<T>(act_f(to_f(gate[i]), act) * to_f(up[i]));
}

#define FUSED(SUFFIX, T)                                                                        \
    extern "C" __global__ void bias_act_##SUFFIX(const T* x, const T* bias, T* out, i64 rows,  \
                                                 int cols, int act) {                          \
        bias_act<T>(x, bias, out, rows, cols, act);                                            \
    }                                                                                          \
    extern "C" __global__ void act_mul_##SUFFIX(const T* gate, const T* up, T* out, i64 n,     \
                                                int act) {                                     \
        act_mul<T>(gate, up, out, n, act);                                                     \
    }
FUSED(f32, float)
FUSED(bf16, __nv_bfloat16)
FUSED(f16, __half)

// ---------------------------------------------------------------------------
// Residual add + RMSNorm or LayerNorm, one block per row:
//   sum_out = T(x + delta), the residual stream as a separate add would store it;
//   RMSNorm (center 0): out = T(s * rsqrt(mean(s^2) + eps) * (w + w_offset));
//   LayerNorm (center 1): out = T((s - mean(s)) * rsqrt(var(s) + eps) * w + b);
//   with s = x + delta in f32: one rounding at the end, so the norm sees the sum
//   before it is rounded (closer to f32 math). w_offset is 1 for Gemma's (1 + w)
//   scale, else 0; b (LayerNorm's bias) may be null.
// delta may be null (the norm of x); sum_out may be null (the sum is not kept, as
// in a post-norm block). delta_bias (may be null) is added to every row of delta: the
// bias of the linear layer that produced it, added here instead of in its own pass.
// Rows are `cols` apart.
// ---------------------------------------------------------------------------
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // A second reduction must not overwrite `part` before every warp has read it.
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? part[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Up to VPT 16-byte vectors per thread stay in registers between the passes.
template <typename T, int VPT>
__device__ void add_norm_vec(const T* __restrict__ x, const T* __restrict__ delta,
                             const T* __restrict__ delta_bias, const T* __restrict__ w,
                             const T* __restrict__ b,
                             T* __restrict__ sum_out, T* __restrict__ out, int cols, float eps,
                             float w_offset, int center) {
    constexpr int V = 16 / sizeof(T);
    const i64 base = (i64)blockIdx.x * cols;
    const int nvec = cols / V;
    const uint4* xr = reinterpret_cast<const uint4*>(x + base);
    const uint4* dr = reinterpret_cast<const uint4*>(delta + base);
    uint4* sr = reinterpret_cast<uint4*>(sum_out + base);
    uint4* orow = reinterpret_cast<uint4*>(out + base);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    const uint4* br = reinterpret_cast<const uint4*>(b);
    float vals[VPT][V];
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) {
            uint4 a = xr[i];
            T* ae = reinterpret_cast<T*>(&a);
#pragma unroll
            for (int e = 0; e < V; ++e) vals[j][e] = to_f(ae[e]);
            if (delta) {
                const uint4 d = dr[i];
                const T* de = reinterpret_cast<const T*>(&d);
                uint4 db = make_uint4(0, 0, 0, 0);
                if (delta_bias) db = reinterpret_cast<const uint4*>(delta_bias)[i];
                const T* dbe = reinterpret_cast<const T*>(&db);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    vals[j][e] += to_f(de[e]) + (delta_bias ? to_f(dbe[e]) : 0.f);
                    ae[e] = from_f<T>(vals[j][e]);
                }
                if (sum_out) sr[i] = a;
            }
#pragma unroll
            for (int e = 0; e < V; ++e) total += vals[j][e];
        }
    }
    const float mean = center ? block_sum(total) / cols : 0.f;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
                vals[j][e] -= mean;
                ss += vals[j][e] * vals[j][e];
            }
        }
    }
    const float r = rsqrtf(block_sum(ss) / cols + eps);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) {
            const uint4 wv = wr[i];
            const T* we = reinterpret_cast<const T*>(&wv);
            uint4 bv = make_uint4(0, 0, 0, 0);
            if (b) bv = br[i];
            const T* be = reinterpret_cast<const T*>(&bv);
            uint4 o;
            T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
            for (int e = 0; e < V; ++e)
                oe[e] = from_f<T>(vals[j][e] * r * (to_f(we[e]) + w_offset) + (b ? to_f(be[e]) : 0.f));
            orow[i] = o;
        }
    }
}

// Any row length: element by element, reading x and delta again in each pass.
template <typename T>
__device__ void add_norm_any(const T* __restrict__ x, const T* __restrict__ delta,
                             const T* __restrict__ delta_bias, const T* __restrict__ w,
                             const T* __restrict__ b,
                             T* __restrict__ sum_out, T* __restrict__ out, int cols, float eps,
                             float w_offset, int center) {
    const i64 base = (i64)blockIdx.x * cols;
    // x + delta + delta_bias at column c, in f32.
    auto sum_at = [&](int c) {
        float f = to_f(x[base + c]);
        if (delta) f += to_f(delta[base + c]) + (delta_bias ? to_f(delta_bias[c]) : 0.f);
        return f;
    };
    float total = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float f = sum_at(c);
        if (delta && sum_out) sum_out[base + c] = from_f<T>(f);
        total += f;
    }
    const float mean = center ? block_sum(total) / cols : 0.f;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float f = sum_at(c) - mean;
        ss += f * f;
    }
    const float r = rsqrtf(block_sum(ss) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float f = sum_at(c) - mean;
        out[base + c] = from_f<T>(f * r * (to_f(w[c]) + w_offset) + (b ? to_f(b[c]) : 0.f));
    }
}

// ---------------------------------------------------------------------------
// Bias + rotary embedding on a packed QKV projection, one pass:
//   qkv, out: [T, heads + 2 * kv_heads, d], contiguous; bias: [(heads + 2 kv) * d] or null;
//   cos, sin: [T, d / 2]. Query and key heads get bias then rotate-half RoPE
//   (x1 c - x2 s, x2 c + x1 s), in f32 with one rounding at the end; value heads get
//   the bias only. One thread per 16-byte vector of a head's first half.
// ---------------------------------------------------------------------------
template <typename T>
__device__ void qkv_rope(const T* __restrict__ qkv, const T* __restrict__ bias,
                         const T* __restrict__ cos, const T* __restrict__ sin,
                         T* __restrict__ out, i64 tokens, int heads, int rot_heads, int d) {
    constexpr int V = 16 / sizeof(T);
    const int half = d / 2, hv = half / V;
    const i64 n = tokens * heads * hv;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int j = (int)(i % hv);
        const i64 th = i / hv;
        const int h = (int)(th % heads);
        const i64 t = th / heads;
        const i64 o1 = th * d + (i64)j * V, o2 = o1 + half;
        uint4 a = *reinterpret_cast<const uint4*>(qkv + o1);
        uint4 b = *reinterpret_cast<const uint4*>(qkv + o2);
        T* ae = reinterpret_cast<T*>(&a);
        T* be = reinterpret_cast<T*>(&b);
        float x1[V], x2[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
            x1[e] = to_f(ae[e]);
            x2[e] = to_f(be[e]);
        }
        if (bias) {
            const int c1 = h * d + j * V;
            const uint4 ba = *reinterpret_cast<const uint4*>(bias + c1);
            const uint4 bb = *reinterpret_cast<const uint4*>(bias + c1 + half);
            const T* bae = reinterpret_cast<const T*>(&ba);
            const T* bbe = reinterpret_cast<const T*>(&bb);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                x1[e] += to_f(bae[e]);
                x2[e] += to_f(bbe[e]);
            }
        }
        if (h < rot_heads) {
            const i64 cs = t * half + (i64)j * V;
            const uint4 cv = *reinterpret_cast<const uint4*>(cos + cs);
            const uint4 sv = *reinterpret_cast<const uint4*>(sin + cs);
            const T* ce = reinterpret_cast<const T*>(&cv);
            const T* se = reinterpret_cast<const T*>(&sv);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const float c = to_f(ce[e]), s = to_f(se[e]);
                const float y1 = x1[e] * c - x2[e] * s;
                const float y2 = x2[e] * c + x1[e] * s;
                x1[e] = y1;
                x2[e] = y2;
            }
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
            ae[e] = from_f<T>(x1[e]);
            be[e] = from_f<T>(x2[e]);
        }
        *reinterpret_cast<uint4*>(out + o1) = a;
        *reinterpret_cast<uint4*>(out + o2) = b;
    }
}

#define NORM_ROPE(SUFFIX, T)                                                                   \
    extern "C" __global__ void add_norm_##SUFFIX(const T* x, const T* delta,                  \
                                                 const T* delta_bias, const T* w, const T* b, \
                                                 T* sum_out, T* out, int cols, float eps,     \
                                                 int vpt, float w_offset, int center) {       \
        switch (vpt) {                                                                        \
            case 1: add_norm_vec<T, 1>(x, delta, delta_bias, w, b, sum_out, out, cols, eps, w_offset, center); break; \
            case 2: add_norm_vec<T, 2>(x, delta, delta_bias, w, b, sum_out, out, cols, eps, w_offset, center); break; \
            case 4: add_norm_vec<T, 4>(x, delta, delta_bias, w, b, sum_out, out, cols, eps, w_offset, center); break; \
            default: add_norm_any<T>(x, delta, delta_bias, w, b, sum_out, out, cols, eps, w_offset, center); break;   \
        }                                                                                     \
    }                                                                                         \
    extern "C" __global__ void qkv_rope_##SUFFIX(const T* qkv, const T* bias, const T* cos,   \
                                                 const T* sin, T* out, i64 tokens, int heads, \
                                                 int rot_heads, int d) {                      \
        qkv_rope<T>(qkv, bias, cos, sin, out, tokens, heads, rot_heads, d);                   \
    }
NORM_ROPE(f32, float)
NORM_ROPE(bf16, __nv_bfloat16)
NORM_ROPE(f16, __half)
