#!/usr/bin/env python3
"""The CUDA kernels alone against torch, on the GPU machine (nvcc, torch, cupy):

    python3 scripts/gpu_kernel_check.py

Compiles kernels/attention.cu and kernels/fused.cu as build.rs does (and once for
sm_90 with -Xptxas -v, to show registers and spills), then runs the packed attention
kernels (flash d64/d128 on bf16/f16, the row kernel on every dtype and d up to 256)
over five sequences with causal / sliding-window / bidirectional masks and Gemma-2
logit soft-capping, the flash kernel with DeBERTa's position terms (deberta-v3's log
buckets, sequences up to 300 tokens), and the residual RMSNorm with and without Gemma's (1 + w) offset,
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
                    no_positions = (np.uint64(0), np.uint64(0), np.uint64(0), np.int32(0), np.int32(0),
                                    np.int64(T))
                    f((tiles, heads), (128,), (ptr(q), ptr(k), ptr(v), ptr(out), ptr(m), ptr(m[len(cu):]),
                                              np.int32(heads), np.int32(kvh), *ts, *args_tail,
                                              *no_positions))
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



def log_bucket(delta, buckets, max_position):
    """transformers' make_log_bucket_position for one distance."""
    mid = buckets // 2
    if abs(delta) <= mid:
        return delta
    ratio = np.float32((max_position - 1) / mid)
    log_pos = np.ceil(np.log(np.float32(abs(delta)) / np.float32(mid)) / np.log(ratio)
                      * np.float32(mid - 1)) + mid
    return int(log_pos) * (1 if delta > 0 else -1)


# DeBERTa's disentangled terms (flash_rel_*): deberta-v3-base's buckets (256, 512), a
# sequence past the log-bucket start (128), and c2p with and without p2c.
span = 256
rel_lens = [1, 9, 64, 65, 140, 300]
rcu = [0]
for n in rel_lens:
    rcu.append(rcu[-1] + n)
RT, longest = rcu[-1], max(rel_lens)
rows = [min(max(log_bucket(dl, 256, 512) + span, 0), 2 * span - 1) for dl in range(-(longest - 1), longest)]
assert all(b - a <= 1 for a, b in zip(rows, rows[1:]))
count8 = -(-(rows[-1] - rows[0] + 1) // 8) * 8
first8 = min(rows[0], 2 * span - count8)
rel = torch.tensor([r - first8 for r in rows], dtype=torch.int32, device="cuda")
mid = longest - 1
for d in [64, 128]:
    for dtype, tname in [(torch.bfloat16, "bf16"), (torch.float16, "f16")]:
        heads = 4
        q, k, v = [(torch.randn(RT, heads, d, device="cuda") * s).to(dtype) for s in (0.6, 0.6, 1.0)]
        pk, pq = [(torch.randn(count8, heads, d, device="cuda") * 0.6).to(dtype) for _ in range(2)]
        # [heads, T, count8], rounded to the dtype as the engine's matmul leaves them
        c2p = torch.einsum("thd,rhd->htr", q.float(), pk.float()).to(dtype).contiguous()
        p2c = torch.einsum("thd,rhd->htr", k.float(), pq.float()).to(dtype).contiguous()
        scale = 1 / (3 * d) ** 0.5
        for with_p2c in [True, False]:
            ref = torch.zeros(RT, heads * d, device="cuda")
            for s_ in range(len(rel_lens)):
                a, b = rcu[s_], rcu[s_ + 1]
                n = b - a
                i = torch.arange(n, device="cuda")[:, None]
                j = torch.arange(n, device="cuda")[None, :]
                r = rel[(i - j + mid)].long()
                for h in range(heads):
                    sc = q[a:b, h].float() @ k[a:b, h].float().T
                    sc = sc + torch.gather(c2p[h, a:b].float(), 1, r)
                    if with_p2c:
                        sc = sc + torch.gather(p2c[h, a:b].float(), 1, r.T).T
                    ref[a:b, h * d:(h + 1) * d] = torch.softmax(sc * scale, -1) @ v[a:b, h].float()
            out = torch.zeros(RT, heads * d, dtype=dtype, device="cuda")
            meta = list(rcu)
            for s_ in range(len(rel_lens)):
                meta += [x for q0 in range(0, rel_lens[s_], 64) for x in (s_, q0)]
            tiles = (len(meta) - len(rcu)) // 2
            m = torch.tensor(meta, dtype=torch.int32, device="cuda")
            ts = (np.int64(heads * d),) * 3
            f = att.get_function(f"flash_rel_{tname}_d{d}")
            f((tiles, heads), (128,), (ptr(q), ptr(k), ptr(v), ptr(out), ptr(m), ptr(m[len(rcu):]),
                                      np.int32(heads), np.int32(heads), *ts, np.int32(0), np.int32(0),
                                      np.float32(scale * LOG2E), np.float32(0), ptr(c2p),
                                      ptr(p2c) if with_p2c else np.uint64(0), ptr(rel), np.int32(mid),
                                      np.int32(count8), np.int64(RT)))
            torch.cuda.synchronize()
            diff = (out.float() - ref).abs().max().item()
            key = f"flash_rel {tname} d{d}"
            print(f"{key} p2c={with_p2c}: max diff {diff:.2e}")
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
            f = fused.get_function(f"add_norm_{tname}")
            f((rows,), (threads,), (ptr(x), ptr(dlt), np.uint64(0), ptr(w), np.uint64(0), ptr(out[0]), ptr(out[1]),
                                    np.int32(cols), np.float32(1e-6), np.int32(vpt), np.float32(off),
                                    np.int32(0)))
            torch.cuda.synchronize()
            s = x.float() + dlt.float()
            ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.float() + off)
            d1 = (out[1].float() - ref).abs().max().item() / ref.abs().max().item()
            d0 = (out[0].float() - s).abs().max().item()
            print(f"rmsnorm {tname} cols={cols} offset={off}: rel diff {d1:.2e}, sum diff {d0:.2e}")
print("WORST", worst)
