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

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

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
