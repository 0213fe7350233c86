#!/usr/bin/env python3
"""Hugging Face transformers on verdict's "mixed" benchmark workload.

The same prompts as `verdict bench` (the generator below is a copy of the
Rust one: lengths log-uniform in [16, 512], ids uniform in [1000, 30000),
seed 0), random weights of the same shape, and two batching modes:
  sorted  - prompts sorted by length, padded batches under a token budget
            (the best a careful transformers user does);
  arrival - batches of --batch-size in arrival order, padded (as a server sees them).
Prints tokens/s and requests/s. Usage:
  python3 bench/transformers_bench.py --shape minilm-l6 --mode sorted
"""
import argparse
import json
import math
import os
import resource
import time

import torch
import transformers

MASK = (1 << 64) - 1


def mixed_workload(n, seed, min_len=16, max_len=512):
    state = ((seed * 6364136223846793005 + 1442695040888963407) & MASK) | 1

    def uniform():
        nonlocal state
        state ^= (state << 13) & MASK
        state ^= state >> 7
        state ^= (state << 17) & MASK
        return (state >> 11) / float(1 << 53)

    lo, hi = math.log(min_len), math.log(max_len)
    prompts = []
    for _ in range(n):
        length = int(round(math.exp(lo + uniform() * (hi - lo))))
        length = max(min_len, min(max_len, length))
        prompts.append([1000 + int(uniform() * 29000.0) for _ in range(length)])
    return prompts


SHAPES = {
    "minilm-l6": ("bert", dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)),
    "bert-base": ("bert", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)),
    "modernbert-base": ("modernbert", dict(num_hidden_layers=22, hidden_size=768, num_attention_heads=12,
                                           intermediate_size=1152, vocab_size=50368, local_attention=128,
                                           global_attn_every_n_layers=3, global_rope_theta=160000.0,
                                           local_rope_theta=10000.0, max_position_embeddings=8192,
                                           classifier_pooling="mean")),
    "deberta-v3-base": ("deberta-v2", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                           intermediate_size=3072, vocab_size=128100, max_position_embeddings=512,
                                           type_vocab_size=0, layer_norm_eps=1e-7, relative_attention=True,
                                           position_buckets=256, max_relative_positions=-1, pos_att_type="p2c|c2p",
                                           share_att_key=True, norm_rel_ebd="layer_norm",
                                           position_biased_input=False, pooler_hidden_act="gelu")),
    "qwen2.5-0.5b": ("qwen2", dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2,
                                   intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                 intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)),
    "gemma2-2b": ("gemma2", dict(num_hidden_layers=26, hidden_size=2304, num_attention_heads=8, num_key_value_heads=4,
                                 head_dim=256, intermediate_size=9216, vocab_size=256000, sliding_window=4096,
                                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                 query_pre_attn_scalar=256, tie_word_embeddings=True)),
}


def build_model(shape, dtype, device, attn):
    family, kw = SHAPES[shape]
    if family == "bert":
        cfg = transformers.BertConfig(num_labels=2, **kw)
        cls = transformers.BertForSequenceClassification
        pad = 0
    elif family == "modernbert":
        cfg = transformers.ModernBertConfig(num_labels=2, pad_token_id=50283, **kw)
        cls = transformers.ModernBertForSequenceClassification
        pad = 50283
    elif family == "deberta-v2":
        cfg = transformers.DebertaV2Config(num_labels=2, pad_token_id=0, **kw)
        cls = transformers.DebertaV2ForSequenceClassification
        pad = 0
        attn = None  # DeBERTa has only its own (eager) attention
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(num_labels=2, pad_token_id=0, max_position_embeddings=8192, **kw)
        cls = transformers.Gemma2ForSequenceClassification
        pad = 0
        # transformers refuses sdpa for Gemma-2 (sdpa cannot soft-cap): eager is its own choice.
        if attn == "sdpa":
            attn = "eager"
    else:
        cfg = transformers.Qwen2Config(num_labels=2, pad_token_id=151643, rope_theta=1e6,
                                       max_position_embeddings=32768, **kw)
        cls = transformers.Qwen2ForSequenceClassification
        pad = 151643
    if attn:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = cls(cfg).to(dtype=dtype, device=device).eval()
    return model, pad


def batches(prompts, mode, budget, batch_size):
    if mode == "arrival":
        for i in range(0, len(prompts), batch_size):
            yield prompts[i:i + batch_size]
        return
    ordered = sorted(prompts, key=len)
    batch = []
    for p in ordered:
        longest = max([len(p)] + [len(q) for q in batch])
        if batch and longest * (len(batch) + 1) > budget:
            yield batch
            batch = []
        batch.append(p)
    if batch:
        yield batch


def run(model, pad, prompts, mode, budget, batch_size, device):
    with torch.inference_mode():
        for batch in batches(prompts, mode, budget, batch_size):
            width = max(len(p) for p in batch)
            # Right padding; the decoder classifier finds the last non-pad token itself.
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):
                ids[i, :len(p)] = torch.tensor(p)
                mask[i, :len(p)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            torch.softmax(logits.float(), dim=-1).cpu()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="minilm-l6", choices=sorted(SHAPES))
    ap.add_argument("--mode", default="sorted", choices=["sorted", "arrival"])
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=8192, help="padded tokens per batch in sorted mode")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per batch in arrival mode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attn", default=None, help="attn_implementation (eager, sdpa)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2,
                    help="timed runs of the whole workload after the warm-up; the best is reported too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = mixed_workload(args.num_prompts, args.seed)
    tokens = sum(len(p) for p in prompts)
    model, pad = build_model(args.shape, getattr(torch, args.dtype), args.device, args.attn)
    run(model, pad, prompts[:8], args.mode, args.budget, args.batch_size, args.device)  # warm-up
    runs = []
    for _ in range(max(1, args.repeat)):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(model, pad, prompts, args.mode, args.budget, args.batch_size, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    # As `verdict bench`: the first run's rate, and the best run's (past any autotuning).
    secs, best = runs[0], min(runs)
    report = {
        "system": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": args.shape, "mode": args.mode, "prompts": len(prompts), "tokens": tokens,
        "seconds": runs, "tokens_per_s": tokens / secs, "best_tokens_per_s": tokens / best,
        "requests_per_s": len(prompts) / secs,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"transformers {args.shape} {args.mode}: {best:.2f} s (best of {len(runs)}), {tokens / best:.0f} tokens/s, "
              f"{len(prompts) / best:.1f} requests/s, threads={torch.get_num_threads()}, "
              f"peak RSS {report['peak_rss_mb']:.0f} MB ({tokens} tokens)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
