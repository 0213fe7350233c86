#!/usr/bin/env python3
"""The CUDA kernels alone against torch, on the GPU machine (nvcc, torch, cupy):

    python3 scripts/gpu_kernel_check.py

Compiles kernels/attention.cu and kernels/fused.cu as build.rs does (and once for
sm_90 with -Xptxas -v, to show registers and spills), then runs the packed attention
kernels (flash d64/d128 on bf16/f16, the row kernel on every dtype and d up to 256)
over five sequences with causal / sliding-window / bidirectional masks and Gemma-2
logit soft-capping, and the residual RMSNorm with and without Gemma's (1 + w) offset,
printing the largest difference from an fp32 torch reference for each. The fixtures'
head sizes (4-32) only reach the row kernel in scripts/gpu_parity.py; this reaches
the flash kernel's soft-cap path too. Expect bf16 differences around 1e-2.
"""
import os
import subprocess
import sys
from pathlib import Path

import cupy as cp
import numpy as np
import torch

os.chdir(Path(__file__).resolve().parent.parent)
for name in ["attention", "fused"]:
    r = subprocess.run(["nvcc", "--ptx", "-O3", "-std=c++17", "-lineinfo", "-arch=compute_80", "-o",
                        f"/tmp/{name}.ptx", f"crates/verdict-engine/kernels/{name}.cu"], capture_output=True, text=True)
    print(name, "nvcc rc", r.returncode, r.stderr[-3000:])
    if r.returncode:
        sys.exit(1)
    r = subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", "-arch=sm_90", "-Xptxas", "-v", "-o",
                        f"/tmp/{name}.cubin", f"crates/verdict-engine/kernels/{name}.cu"], capture_output=True, text=True)
    print("\n".join(l for l in r.stderr.splitlines() if "flash" in l or "spill" in l or "rows" in l)[-3000:])

att = cp.RawModule(path="/tmp/attention.ptx")
fused = cp.RawModule(path="/tmp/fused.ptx")
LOG2E = 1.4426950408889634


def ptr(t):
    return cp.asarray(t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t)


def reference(q, k, v, cu, causal, window, scale, cap):
    heads, kvh = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[0], heads * q.shape[2], dtype=torch.float32, device="cuda")
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        qs, ks, vs = q[a:b].float(), k[a:b].float(), v[a:b].float()
        for h in range(heads):
            kh = h // (heads // kvh)
            sc = qs[:, h] @ ks[:, kh].T * scale
            if cap:
                sc = torch.tanh(sc / cap) * cap
            n = b - a
            i = torch.arange(n, device="cuda")[:, None]
            j = torch.arange(n, device="cuda")[None, :]
            ok = torch.ones(n, n, dtype=torch.bool, device="cuda")
            if causal:
                ok = j <= i
                if window:
                    ok &= (i - j) < window
            sc = sc.masked_fill(~ok, float("-inf"))
            out[a:b, h * q.shape[2]:(h + 1) * q.shape[2]] = torch.softmax(sc, -1) @ vs[:, kh]
    return out


worst = {}
torch.manual_seed(0)
lens = [1, 7, 70, 130, 200]
cu = [0]
for n in lens:
    cu.append(cu[-1] + n)
T = cu[-1]
for d in [64, 128, 256]:
    for dtype, tname in [(torch.bfloat16, "bf16"), (torch.float16, "f16"), (torch.float32, "f32")]:
        heads, kvh = 8, 4
        q = (torch.randn(T, heads, d, device="cuda") * 1.5).to(dtype)
        k = (torch.randn(T, kvh, d, device="cuda") * 1.5).to(dtype)
        v = torch.randn(T, kvh, d, device="cuda").to(dtype)
        for causal, window, cap in [(1, 0, 0.0), (1, 0, 5.0), (1, 33, 5.0), (0, 0, 3.0), (1, 33, 0.0)]:
            scale = d ** -0.5
            ref = reference(q, k, v, cu, causal, window, scale, cap)
            kinds = ["rows"] + (["flash"] if d in (64, 128) and dtype != torch.float32 else [])
            for kind in kinds:
                out = torch.zeros(T, heads * d, dtype=dtype, device="cuda")
                meta = list(cu)
                for s in range(len(lens)):
                    for q0 in range(0, lens[s], 64):
                        meta += [s, q0]
                tiles = (len(meta) - len(cu)) // 2
                m = torch.tensor(meta, dtype=torch.int32, device="cuda")
                args_tail = (np.int32(causal), np.int32(window), np.float32(scale * LOG2E),
                             np.float32(cap * LOG2E))
                ts = (np.int64(heads * d), np.int64(kvh * d), np.int64(kvh * d))
                if kind == "flash":
                    f = att.get_function(f"flash_{tname}_d{d}")
                    f((tiles, heads), (128,), (ptr(q), ptr(k), ptr(v), ptr(out), ptr(m), ptr(m[len(cu):]),
                                              np.int32(heads), np.int32(kvh), *ts, *args_tail))
                else:
                    f = att.get_function(f"attn_rows_{tname}")
                    f(((T * heads + 3) // 4,), (128,), (ptr(q), ptr(k), ptr(v), ptr(out), ptr(m),
                                                        np.int32(len(lens)), np.int32(T), np.int32(heads),
                                                        np.int32(kvh), np.int32(d), *ts, *args_tail))
                torch.cuda.synchronize()
                diff = (out.float() - ref).abs().max().item()
                key = f"{kind} {tname} d{d}"
                print(f"{key} causal={causal} window={window} cap={cap}: max diff {diff:.2e}")
                worst[key] = max(worst.get(key, 0), diff)

# rmsnorm with w_offset
for dtype, tname in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
    for cols in [2304, 8, 100]:
        rows = 5
        x = torch.randn(rows, cols, device="cuda").to(dtype)
        dlt = torch.randn(rows, cols, device="cuda").to(dtype)
        w = (torch.randn(cols, device="cuda") * 0.3).to(dtype)
        for off in [0.0, 1.0]:
            out = torch.zeros(2, rows, cols, dtype=dtype, device="cuda")
            vsz = 16 // x.element_size()
            nvec = cols // vsz
            if cols % vsz:
                vpt = 0
            else:
                vpt = next((p for p in [1, 2, 4] if -(-nvec // p) <= 256), 0)
            threads = 256 if vpt == 0 else ((-(-nvec // vpt) + 31) // 32) * 32
            f = fused.get_function(f"add_rmsnorm_{tname}")
            f((rows,), (threads,), (ptr(x), ptr(dlt), ptr(w), ptr(out[0]), ptr(out[1]), np.int32(cols),
                                    np.float32(1e-6), np.int32(vpt), np.float32(off)))
            torch.cuda.synchronize()
            s = x.float() + dlt.float()
            ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.float() + off)
            d1 = (out[1].float() - ref).abs().max().item() / ref.abs().max().item()
            d0 = (out[0].float() - s).abs().max().item()
            print(f"rmsnorm {tname} cols={cols} offset={off}: rel diff {d1:.2e}, sum diff {d0:.2e}")
print("WORST", worst)
