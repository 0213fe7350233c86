#!/usr/bin/env python3
"""On the GPU machine: the same random prompts through the CUDA binary with the fused
kernels on and then all off (VERDICT_CUDA_NORM=0 VERDICT_CUDA_ROPE=0
VERDICT_CUDA_QKV=split); prints the largest probability difference. For real-size
shapes, which the parity fixtures (head dims 4 to 32) do not reach.

  python3 scripts/gpu_compare.py BINARY /tmp/verdict-bench/qwen2.5-7b-bf16
"""
import json, os, random, subprocess, sys
binary, model = sys.argv[1], sys.argv[2]
random.seed(1)
path = "/tmp/cmp.jsonl"
with open(path, "w") as f:
    for _ in range(48):
        n = random.randint(16, 400)
        f.write(json.dumps({"prompt_token_ids": [random.randint(1000, 30000) for _ in range(n)]}) + "\n")
def run(extra):
    env = dict(os.environ, **extra)
    out = subprocess.run([binary, "classify", "--model", model, "--device", "cuda", "--dtype", "bfloat16",
                          "--format", "jsonl", "--no-progress", "--log-level", "warn", "--input", path],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        print(out.stderr[-500:]); sys.exit(1)
    return [json.loads(l)["probs"] for l in out.stdout.splitlines()]
a = run({})
b = run({"VERDICT_CUDA_NORM": "0", "VERDICT_CUDA_ROPE": "0", "VERDICT_CUDA_QKV": "split"})
d = max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
spread = max(abs(p[0] - 0.5) for p in a)
print(f"{os.path.basename(model)}: fused vs unfused max|dp| = {d:.2e} over {len(a)} prompts (max |p0-0.5| = {spread:.2f})")
