// Packed variable-length attention for the CUDA build (compiled to PTX by build.rs).
//
// q is [T, heads, d], k and v are [T, kv_heads, d] (rows `tok_stride` elements apart,
// heads `d` apart, elements contiguous); sequences are the token ranges
// cu[s]..cu[s+1]. The output is [T, heads * d], contiguous. Query head h reads
// kv head h / (heads / kv_heads). `causal` keeps keys j <= i, and with
// `window` > 0 only i - j < window; without `causal`, `window` > 0 keeps
// |i - j| < window (local attention). Scores are scaled by `scale_log2` =
// softmax scale * log2(e) and exponentiated with exp2. With `softcap_log2` > 0
// (Gemma-2's attention logit soft-cap, times log2(e)) each scaled score s becomes
// softcap_log2 * tanh(s / softcap_log2), i.e. cap * tanh(score / cap) in log2 units.
//
// Two kernels:
// - attn_rows_*: one warp per (token, head), lanes split the head dim (d <= 256),
//   f32 math; any dtype and head dim. Used for f32 and odd head dims.
// - flash_*_d{64,128}: flash-attention style, bf16/f16 tensor cores
//   (mma.sync m16n8k16, f32 accumulators), one block of 4 warps per
//   (64-query tile of a sequence, head), 64-key tiles through shared memory,
//   online softmax in registers.
//
// flash_rel_* add DeBERTa's disentangled position terms: score (i, j) of a sequence
// gains c2p[h][start + i][r] + p2c[h][start + j][r] before scaling, where
// r = rel[i - j + rel_mid] is the relative-embedding row of the distance (rows `rel_w`
// apart, a multiple of 8; heads `total` rows apart; either term may be null). rel must
// grow by at most 1 per unit of distance: then the entries a tile reads from one c2p
// (p2c) row are one run of at most BN (BM) values, staged in shared memory with
// 16-byte loads before the scores read them.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"
#include <stdint.h>

typedef long long i64;

__device__ __forceinline__ float soft_cap(float s, float cap) {
    return cap > 0.f ? cap * tanhf(s / cap) : s;
}

__device__ __forceinline__ int seq_of(const int* cu, int nseq, int t) {
    int lo = 0, hi = nseq - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (cu[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}


// ---------------------------------------------------------------------------
// Generic: one warp per (token, head).
// ---------------------------------------------------------------------------
template <typename T>
__device__ void attn_rows(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, T* __restrict__ out,
                          const int* __restrict__ cu, int nseq, int total, int heads,
                          int kv_heads, int d, i64 q_ts, i64 k_ts, i64 v_ts, int causal,
                          int window, float scale_log2, float softcap_log2) {
    constexpr int MAXE = 8;  // d <= 256
    const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= (i64)total * heads) return;
    const int t = (int)(row / heads);
    const int h = (int)(row % heads);
    const int kvh = h / (heads / kv_heads);
    const int s = seq_of(cu, nseq, t);
    const int start = cu[s], end = cu[s + 1];
    int kbeg = start, kend = end;
    if (causal) {
        kend = t + 1;
        if (window > 0) kbeg = max(start, t - window + 1);
    } else if (window > 0) {
        kbeg = max(start, t - window + 1);
        kend = min(end, t + window);
    }
    float qv[MAXE], acc[MAXE];
    const T* qr = q + (i64)t * q_ts + (i64)h * d;
#pragma unroll
    for (int i = 0; i < MAXE; ++i) {
        const int idx = lane + 32 * i;
        qv[i] = idx < d ? to_f(qr[idx]) * scale_log2 : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = kbeg; j < kend; ++j) {
        const T* kr = k + (i64)j * k_ts + (i64)kvh * d;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < MAXE; ++i) {
            const int idx = lane + 32 * i;
            if (idx < d) dot += qv[i] * to_f(kr[idx]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        dot = soft_cap(dot, softcap_log2);
        const float mn = fmaxf(m, dot);
        const float corr = exp2f(m - mn);
        const float p = exp2f(dot - mn);
        l = l * corr + p;
        const T* vr = v + (i64)j * v_ts + (i64)kvh * d;
#pragma unroll
        for (int i = 0; i < MAXE; ++i) {
            const int idx = lane + 32 * i;
            if (idx < d) acc[i] = acc[i] * corr + p * to_f(vr[idx]);
        }
        m = mn;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = out + ((i64)t * heads + h) * d;
#pragma unroll
    for (int i = 0; i < MAXE; ++i) {
        const int idx = lane + 32 * i;
        if (idx < d) orow[idx] = from_f<T>(acc[i] * inv);
    }
}

#define ROWS_KERNEL(NAME, T)                                                                  \
    extern "C" __global__ void NAME(const T* q, const T* k, const T* v, T* out, const int* cu, \
                                    int nseq, int total, int heads, int kv_heads, int d,       \
                                    i64 q_ts, i64 k_ts, i64 v_ts, int causal, int window,      \
                                    float scale_log2, float softcap_log2) {                    \
        attn_rows<T>(q, k, v, out, cu, nseq, total, heads, kv_heads, d, q_ts, k_ts, v_ts,     \
                     causal, window, scale_log2, softcap_log2);                                \
    }
ROWS_KERNEL(attn_rows_f32, float)
ROWS_KERNEL(attn_rows_bf16, __nv_bfloat16)
ROWS_KERNEL(attn_rows_f16, __half)

// ---------------------------------------------------------------------------
// Flash: tensor cores, bf16/f16, d in {64, 128}.
// ---------------------------------------------------------------------------
template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// Four 8x8 b16 tiles from shared memory: lanes 8i..8i+7 give the row addresses of
// tile i (16-byte aligned); out[i] is this lane's fragment of tile i (row lane / 4,
// columns 2 (lane % 4) and the next), or of its transpose with `_trans`.
template <typename T>
__device__ __forceinline__ void ldmatrix_x4(uint32_t* out, const T* row) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* out, const T* row) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
                 : "r"(addr));
}

template <typename T, int D, int BN, bool REL>
__device__ __forceinline__ void flash(const T* __restrict__ q, const T* __restrict__ k,
                                      const T* __restrict__ v, T* __restrict__ out,
                                      const int* __restrict__ cu, const int* __restrict__ tiles,
                                      int heads, int kv_heads, i64 q_ts, i64 k_ts, i64 v_ts,
                                      int causal, int window, float scale_log2,
                                      float softcap_log2, const T* __restrict__ c2p,
                                      const T* __restrict__ p2c,
                                      const unsigned* __restrict__ rel, int rel_mid, int rel_w,
                                      i64 total) {
    constexpr int BM = 64, LD = D + 8, VEC = 8, NT = 128;
    // Staged position entries per query row (c2p) and per key row (p2c): a run of at
    // most BN (BM) values, from a start rounded down to 8 elements.
    constexpr int CW = REL ? BN + 8 : 8, PW = REL ? BM + 8 : 8;
    __shared__ __align__(16) T sK[(BM > BN ? BM : BN) * LD];  // the Q tile passes through it
    __shared__ __align__(16) T sV[BN * LD];
    __shared__ __align__(16) T sC[REL ? BM * CW : 8];
    __shared__ __align__(16) T sP[REL ? BN * PW : 8];
    // The tile's distances i - j run from dlo = q0 - (n0 + BN - 1) up, BM + BN - 1 of
    // them: s_rel[i - j - dlo] is their row. c_off[i - q0] + row indexes sC at query row
    // i, p_off[j - n0] + row indexes sP at key j.
    __shared__ int s_rel[REL ? BM + BN : 1], c_off[REL ? BM : 1], p_off[REL ? BN : 1];

    const int s = tiles[2 * blockIdx.x];
    const int q0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y;
    const int start = cu[s];
    const int len = cu[s + 1] - start;
    const int kvh = h / (heads / kv_heads);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, cq = (lane & 3) * 2;

    // Q tile -> shared (through sK), then into A fragments.
    for (int c = tid; c < BM * D / VEC; c += NT) {
        const int r = c / (D / VEC), col = (c % (D / VEC)) * VEC;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (q0 + r < len)
            val = *reinterpret_cast<const uint4*>(q + (i64)(start + q0 + r) * q_ts + (i64)h * D + col);
        *reinterpret_cast<uint4*>(sK + r * LD + col) = val;
    }
    __syncthreads();
    uint32_t qf[D / 16][4];
    const int r0 = warp * 16 + g;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        qf[kk][0] = *reinterpret_cast<const uint32_t*>(sK + r0 * LD + kk * 16 + cq);
        qf[kk][1] = *reinterpret_cast<const uint32_t*>(sK + (r0 + 8) * LD + kk * 16 + cq);
        qf[kk][2] = *reinterpret_cast<const uint32_t*>(sK + r0 * LD + kk * 16 + cq + 8);
        qf[kk][3] = *reinterpret_cast<const uint32_t*>(sK + (r0 + 8) * LD + kk * 16 + cq + 8);
    }
    __syncthreads();

    const int qi0 = q0 + r0, qi1 = qi0 + 8;  // this thread's query rows, within the sequence
    const int qlast = min(q0 + BM, len) - 1;
    int kb = 0, ke = len;
    if (causal) {
        ke = qlast + 1;
        if (window > 0) kb = max(0, q0 - window + 1);
    } else if (window > 0) {
        kb = max(0, q0 - window + 1);
        ke = min(len, qlast + window);
    }
    kb = (kb / BN) * BN;

    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

    for (int n0 = kb; n0 < ke; n0 += BN) {
        for (int c = tid; c < BN * D / VEC; c += NT) {
            const int r = c / (D / VEC), col = (c % (D / VEC)) * VEC;
            uint4 kv4 = make_uint4(0, 0, 0, 0), vv4 = make_uint4(0, 0, 0, 0);
            if (n0 + r < len) {
                const i64 tok = start + n0 + r;
                kv4 = *reinterpret_cast<const uint4*>(k + tok * k_ts + (i64)kvh * D + col);
                vv4 = *reinterpret_cast<const uint4*>(v + tok * v_ts + (i64)kvh * D + col);
            }
            *reinterpret_cast<uint4*>(sK + r * LD + col) = kv4;
            *reinterpret_cast<uint4*>(sV + r * LD + col) = vv4;
        }
        if constexpr (REL) {
            // Query row i reads c2p rows rel[i - jlast + mid] ..= rel[i - n0 + mid]; key j
            // reads p2c rows rel[q0 - j + mid] ..= rel[qlast - j + mid].
            const int jlast = min(n0 + BN, len) - 1;
            const int dlo = q0 - (n0 + BN - 1);
            // Distances past the sequence belong to masked scores: any valid row will do.
            for (int x = tid; x < BM + BN - 1; x += NT)
                s_rel[x] = rel[min(max(dlo + x, -rel_mid), rel_mid) + rel_mid];
            for (int c = tid; c < BM * (CW / VEC); c += NT) {
                const int r = c / (CW / VEC), col = (c % (CW / VEC)) * VEC;
                const int i = q0 + r;
                uint4 val = make_uint4(0, 0, 0, 0);
                int first = 0;
                if (c2p && i < len) {
                    first = rel[i - jlast + rel_mid] & ~(VEC - 1);
                    if (first + col < rel_w)
                        val = *reinterpret_cast<const uint4*>(
                            c2p + ((i64)h * total + start + i) * rel_w + first + col);
                }
                *reinterpret_cast<uint4*>(sC + r * CW + col) = val;
                if (col == 0) c_off[r] = r * CW - first;
            }
            for (int c = tid; c < BN * (PW / VEC); c += NT) {
                const int r = c / (PW / VEC), col = (c % (PW / VEC)) * VEC;
                const int j = n0 + r;
                uint4 val = make_uint4(0, 0, 0, 0);
                int first = 0;
                if (p2c && j < len) {
                    first = rel[q0 - j + rel_mid] & ~(VEC - 1);
                    if (first + col < rel_w)
                        val = *reinterpret_cast<const uint4*>(
                            p2c + ((i64)h * total + start + j) * rel_w + first + col);
                }
                *reinterpret_cast<uint4*>(sP + r * PW + col) = val;
                if (col == 0) p_off[r] = r * PW - first;
            }
        }
        __syncthreads();

        float sc[BN / 8][4];
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.f;
        // S = Q K^T. The K fragments come from ldmatrix, four 8x8 tiles per instruction:
        // keys nb*8.. and (nb+1)*8.. of this 16-column step, each in two 8-column halves.
        {
            const int mi = lane >> 3;
            const T* krow = sK + ((mi >> 1) * 8 + (lane & 7)) * LD + (mi & 1) * 8;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int nb = 0; nb < BN / 8; nb += 2) {
                    uint32_t b[4];
                    ldmatrix_x4(b, krow + nb * 8 * LD + kk * 16);
                    Mma<T>::run(sc[nb], qf[kk], b[0], b[1]);
                    Mma<T>::run(sc[nb + 1], qf[kk], b[2], b[3]);
                }
            }
        }

        // Scale and mask; a tile inside the sequence with every key allowed skips the checks.
        const bool full = n0 + BN <= len && q0 + BM <= len && !causal && window <= 0;
        float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? qi0 : qi1;
                const int key = n0 + nb * 8 + cq + (e & 1);
                bool ok = full || (key < len && row < len);
                if constexpr (REL) {
                    // Bidirectional, no window, no soft-cap.
                    if (ok) {
                        const int r = s_rel[row - key - (q0 - n0 - BN + 1)];
                        if (c2p) sc[nb][e] += to_f(sC[c_off[row - q0] + r]);
                        if (p2c) sc[nb][e] += to_f(sP[p_off[key - n0] + r]);
                    }
                    sc[nb][e] = ok ? sc[nb][e] * scale_log2 : -INFINITY;
                } else {
                    if (!full) {
                        if (causal) ok = ok && key <= row && (window <= 0 || row - key < window);
                        else if (window > 0) ok = ok && abs(row - key) < window;
                    }
                    sc[nb][e] = ok ? soft_cap(sc[nb][e] * scale_log2, softcap_log2) : -INFINITY;
                }
            }
            mx[0] = fmaxf(mx[0], fmaxf(sc[nb][0], sc[nb][1]));
            mx[1] = fmaxf(mx[1], fmaxf(sc[nb][2], sc[nb][3]));
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        }
        float ms[2], corr[2], rs[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            ms[i] = mx[i] == -INFINITY ? 0.f : mx[i];
            corr[i] = exp2f(m_r[i] - ms[i]);
            m_r[i] = mx[i];
        }
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
            sc[nb][0] = exp2f(sc[nb][0] - ms[0]);
            sc[nb][1] = exp2f(sc[nb][1] - ms[0]);
            sc[nb][2] = exp2f(sc[nb][2] - ms[1]);
            sc[nb][3] = exp2f(sc[nb][3] - ms[1]);
            rs[0] += sc[nb][0] + sc[nb][1];
            rs[1] += sc[nb][2] + sc[nb][3];
        }
        l_r[0] = l_r[0] * corr[0] + rs[0];
        l_r[1] = l_r[1] * corr[1] + rs[1];
#pragma unroll
        for (int db = 0; db < D / 8; ++db) {
            o[db][0] *= corr[0];
            o[db][1] *= corr[0];
            o[db][2] *= corr[1];
            o[db][3] *= corr[1];
        }

        // O += P V. The V fragments come from ldmatrix.trans, four 8x8 tiles per
        // instruction: keys 0-7 and 8-15 of this 16-key step, for two 8-column blocks.
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            uint32_t a[4];
            a[0] = Mma<T>::pack(sc[2 * j][0], sc[2 * j][1]);
            a[1] = Mma<T>::pack(sc[2 * j][2], sc[2 * j][3]);
            a[2] = Mma<T>::pack(sc[2 * j + 1][0], sc[2 * j + 1][1]);
            a[3] = Mma<T>::pack(sc[2 * j + 1][2], sc[2 * j + 1][3]);
            const int mi = lane >> 3;
            const T* vrow = sV + (j * 16 + (mi & 1) * 8 + (lane & 7)) * LD + (mi >> 1) * 8;
#pragma unroll
            for (int db = 0; db < D / 8; db += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vrow + db * 8);
                Mma<T>::run(o[db], a, b[0], b[1]);
                Mma<T>::run(o[db + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 1);
        l_r[i] += __shfl_xor_sync(0xffffffffu, l_r[i], 2);
    }
    const float inv0 = l_r[0] > 0.f ? 1.f / l_r[0] : 0.f;
    const float inv1 = l_r[1] > 0.f ? 1.f / l_r[1] : 0.f;
    const i64 ostride = (i64)heads * D;
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
        const int col = h * D + db * 8 + cq;
        if (qi0 < len)
            *reinterpret_cast<uint32_t*>(out + (start + qi0) * ostride + col) =
                Mma<T>::pack(o[db][0] * inv0, o[db][1] * inv0);
        if (qi1 < len)
            *reinterpret_cast<uint32_t*>(out + (start + qi1) * ostride + col) =
                Mma<T>::pack(o[db][2] * inv1, o[db][3] * inv1);
    }
}

#define FLASH_KERNEL(NAME, T, D, BN, REL)                                                         \
    extern "C" __global__ void __launch_bounds__(128)                                            \
        NAME(const T* q, const T* k, const T* v, T* out, const int* cu, const int* tiles,         \
             int heads, int kv_heads, i64 q_ts, i64 k_ts, i64 v_ts, int causal, int window,       \
             float scale_log2, float softcap_log2, const T* c2p, const T* p2c,                    \
             const unsigned* rel, int rel_mid, int rel_w, i64 total) {                            \
        flash<T, D, BN, REL>(q, k, v, out, cu, tiles, heads, kv_heads, q_ts, k_ts, v_ts, causal,  \
                             window, scale_log2, softcap_log2, c2p, p2c, rel, rel_mid, rel_w,     \
                             total);                                                              \
    }
FLASH_KERNEL(flash_bf16_d64, __nv_bfloat16, 64, 64, false)
FLASH_KERNEL(flash_bf16_d128, __nv_bfloat16, 128, 64, false)
FLASH_KERNEL(flash_f16_d64, __half, 64, 64, false)
FLASH_KERNEL(flash_f16_d128, __half, 128, 64, false)
// With the staged position entries, d 128 takes 32-key tiles to stay within 48 KB of
// static shared memory.
FLASH_KERNEL(flash_rel_bf16_d64, __nv_bfloat16, 64, 64, true)
FLASH_KERNEL(flash_rel_bf16_d128, __nv_bfloat16, 128, 32, true)
FLASH_KERNEL(flash_rel_f16_d64, __half, 64, 64, true)
FLASH_KERNEL(flash_rel_f16_d128, __half, 128, 32, true)
