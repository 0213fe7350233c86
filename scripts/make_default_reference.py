#!/usr/bin/env python3
"""Write assets/default-model/reference.json: transformers outputs for the
default model, used to check verdict's own forward pass.

Runs ``AutoModelForSequenceClassification.from_pretrained`` on the folder
assembled by ``scripts/setup-default-model.sh`` (default
``$VERDICT_HOME/default-model``, VERDICT_HOME defaulting to
``~/.cache/verdict``), in eval mode, fp32, under no_grad, one prompt at a time
(no padding, no truncation: exactly the tokens a single prompt needs).

Before writing anything it checks that
  * transformers reports no missing / unexpected / mismatched weights,
  * the pooler and classifier equal assets/default-model/head.safetensors
    (i.e. the pooler really comes from shard 2, not from MiniLM's own pooler
    that is also stored in shard 1),
  * every other weight equals the corresponding tensor of the shard the index
    maps it to.

Usage:
    python3 scripts/make_default_reference.py [--model-dir DIR] [--out FILE]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "default-model"

TEXT_CASES = [
    ("demo_positive", "Loved the new café—coffee was great."),
    ("demo_negative", "This update broke everything. Frustrating."),
    ("single_word", "Disappointing"),
    ("shouting", "WORST. SERVICE. EVER!!!"),
    ("lukewarm", "The hotel was fine, I guess. Nothing special, but nothing terrible either."),
    (
        "unicode_mix",
        "Crème brûlée in Zürich was délicieux 😍🍮 — 東京のラーメンも最高！ Señor García's café: ★★★★★",
    ),
    (
        "whitespace",
        "  The  new\tupdate   is\n\nfast, stable,   and\u00a0beautiful.  ",
    ),
    ("customer_service", "I waited on hold for forty minutes, then the agent hung up on me and nobody ever called back."),
    (
        "travel_medium",
        "Our train to the coast left on time, the carriages were spotless, and the view of the cliffs at sunset "
        "was worth the whole trip.",
    ),
    (
        "long_review",
        "I was honestly skeptical when I ordered this espresso machine, because the last two I owned broke within "
        "a year and the customer service for both was a nightmare of canned replies and endless hold music. "
        "This one arrived two days early, packed carefully, with clear instructions that actually matched the "
        "machine in the box. Setup took about ten minutes: rinse the tank, run two cycles of plain water, grind "
        "the beans, and go. The first shot was already better than what I get at the café around the corner — "
        "thick crema, no bitterness, and a lovely chocolate note with the medium roast I usually buy. The steam "
        "wand heats milk quickly and is easy to clean, and the drip tray is large enough that I only empty it "
        "every couple of days. After three months of daily use (usually two lattes in the morning and an "
        "americano after lunch), nothing has leaked, rattled, or stopped working. When I emailed support with a "
        "question about descaling, a real person answered within an hour with a helpful, friendly explanation "
        "and a link to the right cleaning tablets. It is not the cheapest machine on the market, and it takes up "
        "a fair amount of counter space, but for the quality of the coffee and the peace of mind, I would "
        "happily buy it again and have already recommended it to my sister and two colleagues at work.",
    ),
]

PAIR_CASES = [
    ("pair_positive", "How was the battery life?", "Excellent — it easily lasts two full days, and charging is quick."),
    ("pair_negative", "Is the new café worth visiting?", "No. The coffee was cold and the staff were rude."),
]

HEAD_KEYS = ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]


def torch_version():
    """Debian's python3-torch 1.13.1 reports __version__ '1.13.0a0'; prefer
    the packaged version when that is what we run."""
    v = torch.__version__
    if "a0" in v and torch.__file__.startswith("/usr/lib/python3"):
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", "python3-torch"],
                capture_output=True, text=True, check=True,
            ).stdout
            return out.split("+")[0].split("-")[0] or v
        except (OSError, subprocess.CalledProcessError):
            pass
    return v


def default_model_dir():
    home = os.environ.get("VERDICT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "verdict")
    return Path(home) / "default-model"


def check_weights(model, model_dir, info):
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    # embeddings.position_ids is a non-persistent buffer; tolerate only that.
    if "unexpected_keys" in problems:
        rest = [k for k in problems["unexpected_keys"] if not k.endswith("embeddings.position_ids")]
        problems["unexpected_keys"] = rest
        if not rest:
            del problems["unexpected_keys"]
    if problems or info.get("error_msgs"):
        sys.exit(f"transformers did not load {model_dir} cleanly: {info}")

    sd = model.state_dict()
    head = load_file(str(ASSETS / "head.safetensors"))
    assert sorted(head) == sorted(HEAD_KEYS), sorted(head)
    for k in HEAD_KEYS:
        if not torch.equal(sd[k], head[k]):
            sys.exit(f"{k} does not match head.safetensors")

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = {f: load_file(str(model_dir / f)) for f in sorted(set(index["weight_map"].values()))}
    checked = 0
    for name, shard in index["weight_map"].items():
        key = name if name.startswith(("bert.", "classifier.")) else "bert." + name
        if key not in sd:
            assert key.endswith("embeddings.position_ids"), key
            continue
        if not torch.equal(sd[key], shards[shard][name]):
            sys.exit(f"{key} does not match {shard}:{name}")
        checked += 1
    if checked != len(sd):
        sys.exit(f"index covers {checked} of {len(sd)} weights")
    print(f"weights ok: {checked} tensors match the index; pooler/classifier match head.safetensors")


def as_floats(t):
    return [float(x) for x in t.to(torch.float32).tolist()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=default_model_dir())
    ap.add_argument("--out", type=Path, default=ASSETS / "reference.json")
    args = ap.parse_args()
    model_dir = args.model_dir
    if not (model_dir / "model.safetensors.index.json").is_file():
        sys.exit(f"{model_dir} is not an assembled model; run scripts/setup-default-model.sh")

    torch.manual_seed(0)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), torch_dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    check_weights(model, model_dir, info)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = model.config

    def run(enc):
        ids = enc["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert tokenizer.pad_token_id not in ids, "prompt was padded"
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([ids]),
                token_type_ids=torch.tensor([enc["token_type_ids"]]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            ).logits[0]
        assert logits.dtype == torch.float32
        return {
            "input_ids": list(ids),
            "token_type_ids": list(enc["token_type_ids"]),
            "logits": as_floats(logits),
            "probs": as_floats(torch.softmax(logits, dim=-1)),
        }

    cases = []
    for name, text in TEXT_CASES:
        cases.append({"name": name, "kind": "text", "text": text, **run(tokenizer(text))})
    for name, a, b in PAIR_CASES:
        case = {"name": name, "kind": "pair", "text": a, "text_pair": b, "pair_mode": "hf_pair"}
        cases.append({**case, **run(tokenizer(a, text_pair=b))})

    lengths = {c["name"]: len(c["input_ids"]) for c in cases}
    assert lengths["single_word"] == 3, lengths
    assert lengths["long_review"] >= 200, lengths
    assert max(lengths.values()) <= cfg.max_position_embeddings

    ref = {
        "generator": f"transformers {transformers.__version__}, torch {torch_version()}",
        "architecture": cfg.architectures[0],
        "engine_args": {"convert": None, "hf_overrides": None},
        "num_labels": cfg.num_labels,
        "activation": "softmax",
        "id2label": {str(k): v for k, v in sorted(cfg.id2label.items())},
        "cases": cases,
    }
    # One line per top-level field and per case; floats are the exact fp32
    # values written as plain JSON numbers.
    dump = lambda v: json.dumps(v, ensure_ascii=False)
    lines = [f"  {dump(k)}: {dump(v)}," for k, v in ref.items() if k != "cases"]
    lines.append('  "cases": [')
    lines.append(",\n".join("    " + dump(c) for c in cases))
    lines.append("  ]")
    text = "{\n" + "\n".join(lines) + "\n}\n"
    assert json.loads(text) == ref
    args.out.write_text(text, encoding="utf-8")

    for c in cases:
        p = c["probs"]
        label = cfg.id2label[int(max(range(len(p)), key=p.__getitem__))]
        print(f"{c['name']:17s} {len(c['input_ids']):4d} tokens  {label:8s}  p=[{p[0]:.4f}, {p[1]:.4f}]")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
