// LD_PRELOAD shim for diagnosing host-side cost: times every CUDA driver and cuBLAS
// call the verdict binary makes itself (not the ones inside libcublas) and prints, at
// exit, per function: calls, total and largest host time, plus the slowest single calls.
//   gcc -O2 -shared -fPIC -o /tmp/cuda_calls.so scripts/cuda_calls.c -ldl
//   LD_PRELOAD=/tmp/cuda_calls.so verdict bench ...
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

enum { F_LAUNCH, F_ALLOCA, F_FREEA, F_EVC, F_EVD, F_HTOD, F_DTOH, F_DTOD, F_SYNC, F_GETFN,
       F_SETCUR, F_GETCUR, F_MEMSET, F_CAPT, F_ALLOC, F_FREE, F_GEMM, F_EVREC, F_WAIT, NF };
static const char* NAMES[NF] = {"cuLaunchKernel", "cuMemAllocAsync", "cuMemFreeAsync",
    "cuEventCreate", "cuEventDestroy", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync",
    "cuMemcpyDtoDAsync", "cuStreamSynchronize", "cuModuleGetFunction", "cuCtxSetCurrent",
    "cuCtxGetCurrent", "cuMemsetD8Async", "cuStreamIsCapturing", "cuMemAlloc", "cuMemFree",
    "cublasGemmStridedBatchedEx", "cuEventRecord", "cuStreamWaitEvent"};
static uint64_t cnt[NF], tot[NF], mx[NF];
#define SLOW 16
static struct { uint64_t ns; int f; uint64_t bytes; } slow[SLOW];
static uint64_t t_start;

static uint64_t now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}
static void note(int f, uint64_t t0, uint64_t bytes) {
    uint64_t d = now() - t0;
    __atomic_fetch_add(&cnt[f], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&tot[f], d, __ATOMIC_RELAXED);
    if (d > mx[f]) mx[f] = d;
    int lo = 0;
    for (int i = 1; i < SLOW; ++i) if (slow[i].ns < slow[lo].ns) lo = i;
    if (d > slow[lo].ns) { slow[lo].ns = d; slow[lo].f = f; slow[lo].bytes = bytes; }
}
__attribute__((constructor)) static void init(void) { t_start = now(); }
__attribute__((destructor)) static void report(void) {
    double wall = (now() - t_start) / 1e6;
    fprintf(stderr, "cuda_calls: process wall %.0f ms\n", wall);
    fprintf(stderr, "%-28s %10s %12s %10s %10s\n", "call", "count", "total ms", "mean us", "max ms");
    for (int f = 0; f < NF; ++f)
        if (cnt[f])
            fprintf(stderr, "%-28s %10llu %12.1f %10.2f %10.2f\n", NAMES[f], (unsigned long long)cnt[f],
                    tot[f] / 1e6, tot[f] / 1e3 / cnt[f], mx[f] / 1e6);
    fprintf(stderr, "slowest calls:");
    for (int i = 0; i < SLOW; ++i)
        if (slow[i].ns) fprintf(stderr, " %s %.2fms(%lluB)", NAMES[slow[i].f], slow[i].ns / 1e6,
                                (unsigned long long)slow[i].bytes);
    fprintf(stderr, "\n");
}
#define REAL(name, ret, args) static ret(*real)args; if (!real) real = (ret(*)args)dlsym(RTLD_NEXT, name)
typedef unsigned long long dptr;

int cuLaunchKernel(void* f, unsigned a, unsigned b, unsigned c, unsigned d, unsigned e, unsigned g,
                   unsigned sh, void* s, void** p, void** x) {
    REAL("cuLaunchKernel", int, (void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**));
    uint64_t t = now(); int r = real(f, a, b, c, d, e, g, sh, s, p, x); note(F_LAUNCH, t, 0); return r;
}
int cuMemAllocAsync(dptr* p, size_t n, void* s) {
    REAL("cuMemAllocAsync", int, (dptr*, size_t, void*));
    uint64_t t = now(); int r = real(p, n, s); note(F_ALLOCA, t, n); return r;
}
int cuMemFreeAsync(dptr p, void* s) {
    REAL("cuMemFreeAsync", int, (dptr, void*));
    uint64_t t = now(); int r = real(p, s); note(F_FREEA, t, 0); return r;
}
int cuEventCreate(void** e, unsigned fl) {
    REAL("cuEventCreate", int, (void**, unsigned));
    uint64_t t = now(); int r = real(e, fl); note(F_EVC, t, 0); return r;
}
int cuEventDestroy_v2(void* e) {
    REAL("cuEventDestroy_v2", int, (void*));
    uint64_t t = now(); int r = real(e); note(F_EVD, t, 0); return r;
}
int cuEventRecord(void* e, void* s) {
    REAL("cuEventRecord", int, (void*, void*));
    uint64_t t = now(); int r = real(e, s); note(F_EVREC, t, 0); return r;
}
int cuStreamWaitEvent(void* s, void* e, unsigned fl) {
    REAL("cuStreamWaitEvent", int, (void*, void*, unsigned));
    uint64_t t = now(); int r = real(s, e, fl); note(F_WAIT, t, 0); return r;
}
int cuMemcpyHtoDAsync_v2(dptr d, const void* h, size_t n, void* s) {
    REAL("cuMemcpyHtoDAsync_v2", int, (dptr, const void*, size_t, void*));
    uint64_t t = now(); int r = real(d, h, n, s); note(F_HTOD, t, n); return r;
}
int cuMemcpyDtoHAsync_v2(void* h, dptr d, size_t n, void* s) {
    REAL("cuMemcpyDtoHAsync_v2", int, (void*, dptr, size_t, void*));
    uint64_t t = now(); int r = real(h, d, n, s); note(F_DTOH, t, n); return r;
}
int cuMemcpyDtoDAsync_v2(dptr a, dptr b, size_t n, void* s) {
    REAL("cuMemcpyDtoDAsync_v2", int, (dptr, dptr, size_t, void*));
    uint64_t t = now(); int r = real(a, b, n, s); note(F_DTOD, t, n); return r;
}
int cuStreamSynchronize(void* s) {
    REAL("cuStreamSynchronize", int, (void*));
    uint64_t t = now(); int r = real(s); note(F_SYNC, t, 0); return r;
}
int cuModuleGetFunction(void** f, void* m, const char* n) {
    REAL("cuModuleGetFunction", int, (void**, void*, const char*));
    uint64_t t = now(); int r = real(f, m, n); note(F_GETFN, t, 0); return r;
}
int cuCtxSetCurrent(void* c) {
    REAL("cuCtxSetCurrent", int, (void*));
    uint64_t t = now(); int r = real(c); note(F_SETCUR, t, 0); return r;
}
int cuCtxGetCurrent(void** c) {
    REAL("cuCtxGetCurrent", int, (void**));
    uint64_t t = now(); int r = real(c); note(F_GETCUR, t, 0); return r;
}
int cuMemsetD8Async(dptr d, unsigned char v, size_t n, void* s) {
    REAL("cuMemsetD8Async", int, (dptr, unsigned char, size_t, void*));
    uint64_t t = now(); int r = real(d, v, n, s); note(F_MEMSET, t, n); return r;
}
int cuStreamIsCapturing(void* s, int* st) {
    REAL("cuStreamIsCapturing", int, (void*, int*));
    uint64_t t = now(); int r = real(s, st); note(F_CAPT, t, 0); return r;
}
int cuMemAlloc_v2(dptr* p, size_t n) {
    REAL("cuMemAlloc_v2", int, (dptr*, size_t));
    uint64_t t = now(); int r = real(p, n); note(F_ALLOC, t, n); return r;
}
int cuMemFree_v2(dptr p) {
    REAL("cuMemFree_v2", int, (dptr));
    uint64_t t = now(); int r = real(p); note(F_FREE, t, 0); return r;
}
int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* al,
        const void* A, int At, int lda, long long sA, const void* B, int Bt, int ldb, long long sB,
        const void* be, void* C, int Ct, int ldc, long long sC, int bc, int ct, int algo) {
    REAL("cublasGemmStridedBatchedEx", int, (void*, int, int, int, int, int, const void*, const void*, int, int, long long, const void*, int, int, long long, const void*, void*, int, int, long long, int, int, int));
    uint64_t t = now();
    int r = real(h, ta, tb, m, n, k, al, A, At, lda, sA, B, Bt, ldb, sB, be, C, Ct, ldc, sC, bc, ct, algo);
    note(F_GEMM, t, (uint64_t)m * n); return r;
}
