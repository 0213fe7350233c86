#!/usr/bin/env python3
"""A bench shape's random checkpoint through verdict on the GPU against transformers
(fp32), on the GPU machine:

    python3 scripts/gpu_shape_parity.py VERDICT_BIN SHAPE [PROMPTS]

The fixtures are tiny (head sizes 4-32), so their GPU parity runs never reach the
flash kernels (head dims 64 and 128) nor DeBERTa's fused position terms; the bench
shapes have the real dimensions. This writes (or reuses) SHAPE's checkpoint as
`verdict bench` does, runs the first PROMPTS (default 48) prompts of the "mixed"
workload plus two of 512 tokens through `verdict classify --no-activation` in float32
and bfloat16, and each prompt alone through transformers in float32, then prints the
largest logit difference of each dtype, relative to the largest logit. Exits non-zero
past 1e-4 (float32) or 5e-2 (bfloat16: 12 to 28 layers of random weights in bf16 move
the logits by 1e-2 to 3e-2 of the largest; a wrong position term or mask moves them by
far more).
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from transformers_bench import mixed_workload  # noqa: E402

LIMITS = {"float32": 1e-4, "bfloat16": 5e-2}


def main():
    binary, shape = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 48
    cache = Path("/tmp/verdict-bench")
    # One short bench run writes the checkpoint (bf16 storage: both dtypes read the same values).
    subprocess.run([binary, "bench", "--shape", shape, "--num-prompts", "4", "--device", "cuda",
                    "--dtype", "bfloat16", "--cache-dir", str(cache)], check=True, capture_output=True)
    model_dir = cache / f"{shape}-bf16"
    prompts = mixed_workload(n, 0) + [[1000 + (i * 7919) % 29000 for i in range(512)] for _ in range(2)]
    prompts[-1] = prompts[-1][::-1]

    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, torch_dtype=torch.float32).to("cuda").eval()
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([p], device="cuda")).logits[0].float().cpu() for p in prompts]
    scale = max(w.abs().max().item() for w in want)

    worst = {}
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "prompts.jsonl"
        lines.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
        for dtype in LIMITS:
            out = subprocess.run([binary, "classify", "--model", str(model_dir), "--device", "cuda",
                                  "--dtype", dtype, "--no-activation", "--no-progress", "--input", str(lines)],
                                 check=True, capture_output=True, text=True).stdout
            got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            got.sort(key=lambda r: r["index"])
            if len(got) != len(prompts):
                sys.exit(f"{dtype}: {len(got)} results for {len(prompts)} prompts")
            diffs = [(torch.tensor(g["probs"]) - w).abs().max().item() / scale for g, w in zip(got, want)]
            worst[dtype] = max(diffs)
            print(f"{shape} {dtype}: largest logit difference {worst[dtype]:.2e} of the largest logit "
                  f"({scale:.3f}), {len(prompts)} prompts")
    if any(worst[d] > LIMITS[d] for d in LIMITS):
        sys.exit(f"{shape}: past the limits {LIMITS}")


if __name__ == "__main__":
    main()
