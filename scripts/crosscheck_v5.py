#!/usr/bin/env python3
"""Checkpoints written by transformers v5 through the verdict binary.

    /opt/torchenv/bin/python scripts/crosscheck_v5.py target/debug/verdict

transformers v5 writes configs differently from the 4.x that made the committed
fixtures (`rope_parameters` instead of `rope_theta`/`rope_scaling`, `dtype`,
`layer_types`, ...). This builds a tiny random model per supported family with
the installed transformers, saves it the v5 way (fp32), runs fixed token ids
through it and through `verdict classify`, and prints the largest probability
gap per model (fp32 CPU; the gate is 1e-4).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parent.parent
TOK = ROOT / "fixtures/tokenizers"
IDS = [[101, 7592, 2088, 102], [101, 2023, 2003, 1037, 2936, 6251, 2005, 1996, 4937, 102],
       [5, 17, 300, 42, 8, 9, 1000, 77, 3]]


def specs():
    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    dec = dict(small, num_key_value_heads=1, max_position_embeddings=256)
    return [
        ("bert", "bert", tf.BertForSequenceClassification,
         tf.BertConfig(vocab_size=30522, num_labels=3, **small)),
        ("bert-token", "bert", tf.BertForTokenClassification,
         tf.BertConfig(vocab_size=30522, num_labels=4, **small)),
        ("ernie", "bert", tf.ErnieForSequenceClassification,
         tf.ErnieConfig(vocab_size=30522, num_labels=2, use_task_id=True, task_type_vocab_size=3, **small)),
        ("roberta", "roberta", tf.RobertaForSequenceClassification,
         tf.RobertaConfig(vocab_size=50262, num_labels=2, pad_token_id=1, **small)),
        ("xlmr", "roberta", tf.XLMRobertaForSequenceClassification,
         tf.XLMRobertaConfig(vocab_size=50262, num_labels=1, pad_token_id=1, **small)),
        ("gpt2", "gpt2", tf.GPT2ForSequenceClassification,
         tf.GPT2Config(vocab_size=50257, n_embd=16, n_layer=2, n_head=2, num_labels=2, pad_token_id=50256)),
        ("llama3-rope", "gpt2", tf.LlamaForSequenceClassification,
         tf.LlamaConfig(vocab_size=50257, num_labels=2, pad_token_id=50256, rope_theta=50000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        **dec)),
        ("mistral-window", "gpt2", tf.MistralForSequenceClassification,
         tf.MistralConfig(vocab_size=50257, num_labels=2, pad_token_id=50256, sliding_window=4, **dec)),
        ("qwen2", "qwen3", tf.Qwen2ForSequenceClassification,
         tf.Qwen2Config(vocab_size=151936, num_labels=2, pad_token_id=151643, rope_theta=1e6, **dec)),
        ("qwen2-window", "qwen3", tf.Qwen2ForSequenceClassification,
         tf.Qwen2Config(vocab_size=151936, num_labels=2, pad_token_id=151643, use_sliding_window=True,
                        sliding_window=3, max_window_layers=1, **dec)),
        ("qwen3", "qwen3", tf.Qwen3ForSequenceClassification,
         tf.Qwen3Config(vocab_size=151936, num_labels=3, pad_token_id=151643, head_dim=16,
                        problem_type="multi_label_classification", **dec)),
        ("qwen3-yarn", "qwen3", tf.Qwen3ForSequenceClassification,
         tf.Qwen3Config(vocab_size=151936, num_labels=2, pad_token_id=151643, head_dim=8,
                        rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 64}, **dec)),
    ]


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/debug/verdict")
    worst_all = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, tok, cls, cfg in specs():
            torch.manual_seed(0)
            model = cls(cfg).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.2 * torch.randn_like(p))
            out = Path(tmp) / name
            model.save_pretrained(out)
            for f in (TOK / tok).iterdir():
                os.symlink(f, out / f.name)
            token_cls = "TokenClassification" in cls.__name__
            lines, want = [], []
            for ids in IDS:
                ids = [i % cfg.vocab_size for i in ids]
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0]
                if not token_cls:
                    if cfg.num_labels == 1 or cfg.problem_type == "multi_label_classification":
                        probs = torch.sigmoid(logits)
                    else:
                        probs = torch.softmax(logits, -1)
                else:
                    probs = torch.softmax(logits, -1)
                want.append(probs.flatten().tolist())
                lines.append(json.dumps({"prompt_token_ids": ids}))
            inp = out / "inputs.jsonl"
            inp.write_text("\n".join(lines) + "\n")
            cmd = [binary, "classify", "--model", str(out), "--device", "cpu", "--input", str(inp),
                   "--format", "jsonl", "--no-progress", "--log-level", "warn"]
            if token_cls:
                cmd += ["--pooler-config", '{"task": "token_classify"}']
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{name:<16} ERROR {run.stderr.strip().splitlines()[-1:]}")
                worst_all = float("inf")
                continue
            worst = 0.0
            for line, w in zip(run.stdout.splitlines(), want):
                got = json.loads(line)
                if "error" in got:
                    print(f"{name:<16} ERROR {got['error']}")
                    worst = float("inf")
                    break
                flat = got.get("probs") or [x for row in got.get("data", []) for x in row]
                worst = max([worst] + [abs(a - b) for a, b in zip(flat, w)])
            worst_all = max(worst_all, worst)
            print(f"{name:<16} max|dp| {worst:.2e} {'ok' if worst <= 1e-4 else 'FAIL'}")
    print("transformers", tf.__version__, "all within 1e-4" if worst_all <= 1e-4 else "FAILURES")
    return 0 if worst_all <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
