#!/usr/bin/env python3
"""Tiny PEFT LoRA adapters on the bert-cls and qwen2-cls fixtures, with PEFT references.

    python scripts/make_lora_fixtures.py        (the torch + transformers 5 + peft env)

Writes fixtures/lora/<name>/: `adapter_config.json` and `adapter_model.safetensors`
(PEFT's `save_pretrained`), `config.json` (the adapter's labels: its head may have a
different `num_labels` than the base) and `reference.json`: the base fixture's cases
(same prompts and token ids) run through PEFT's unmerged model in float32, with the
base checkpoint re-loaded from its bf16 file. The script checks that the merged model
(`merge_and_unload`) agrees to 1e-5 (relative, for logits past 1).

PEFT initialises lora_B to zero (an untrained adapter changes nothing): every LoRA
matrix and every saved head is overwritten with seeded random values so each adapter
visibly moves the logits. Adapters stay in float32 (they are a few KB).

| adapter | base | targets | r / alpha | head (modules_to_save) |
| bert-sentiment | bert-cls | query, value (list) | 4 / 8 | classifier, 3 labels |
| bert-topics | bert-cls | regex: key, attention output, intermediate, output dense | 2 / 3 | classifier + pooler, 5 labels |
| qwen2-all | qwen2-cls | all-linear, rsLoRA | 4 / 16 | score, 2 labels |
| qwen2-qv | qwen2-cls | q_proj, v_proj (k not: a packed QKV must leave its rows alone) | 2 / 4 | score, 3 labels |
| xlmr-rerank | xlmr-rerank | query, value | 2 / 4 | classifier (dense + out_proj), 1 label: a reranker |
| distilbert-ner | distilbert-tokens | q_lin, v_lin, lin1 | 2 / 4 | token classifier, 3 labels (per-token references) |
| modernbert-topics | modernbert-cls | Wqkv, Wo (attention and MLP), Wi (GeGLU halves) | 4 / 8 | head (dense + norm) + classifier, 4 labels |
| modernbert-ner | modernbert-ner | regex: Wqkv, mlp.Wi; rsLoRA | 2 / 4 | classifier, 3 labels (per-token references) |
| deberta-guard | deberta-v3-cls | regex: embed_proj, query/key/value_proj, every dense of the layers | 4 / 8 | pooler + classifier, 2 labels |
| deberta-qk | deberta-v3-cls | query_proj, key_proj (shared with the position terms: share_att_key) | 2 / 4 | classifier |
| deberta-rerank-pos | deberta-v3-rerank | query_proj, key_proj, pos_key_proj, pos_query_proj; rsLoRA | 2 / 4 | classifier, 1 label: a reranker |
| bert-all-linear | bert-cls | all-linear (the pooler's dense too) | 2 / 4 | classifier |
| modernbert-all-linear | modernbert-cls | all-linear (head.dense too) | 2 / 4 | classifier, 3 labels |
| deberta-all-linear | deberta-v3-cls | all-linear (pooler.dense and embed_proj too) | 2 / 4 | classifier |
| gemma2-all | gemma2-cls | all-linear (soft-capped attention and logits) | 4 / 8 | score, 2 labels |

DeBERTa's position terms project the relative table through the same modules
(`share_att_key`) or `pos_*_proj`: PEFT adapts those projections too.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import torch
import transformers
import peft
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
MODDIR = ROOT / "fixtures" / "models"
OUTDIR = ROOT / "fixtures" / "lora"
GENERATOR = f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

BERT_TOPICS = r".*layer\.\d+\.(attention\.self\.key|attention\.output\.dense|intermediate\.dense|output\.dense)"

ADAPTERS = [
    dict(name="bert-sentiment", base="bert-cls", seed=11, r=4, alpha=8, rslora=False,
         targets=["query", "value"], save=["classifier"], labels=None),
    dict(name="bert-topics", base="bert-cls", seed=12, r=2, alpha=3, rslora=False,
         targets=BERT_TOPICS, save=["classifier", "pooler"],
         labels=["sports", "politics", "science", "arts", "travel"]),
    dict(name="qwen2-all", base="qwen2-cls", seed=13, r=4, alpha=16, rslora=True,
         targets="all-linear", save=["score"], labels=None),
    dict(name="qwen2-qv", base="qwen2-cls", seed=14, r=2, alpha=4, rslora=False,
         targets=["q_proj", "v_proj"], save=["score"], labels=["low", "medium", "high"]),
    dict(name="xlmr-rerank", base="xlmr-rerank", seed=15, r=2, alpha=4, rslora=False,
         targets=["query", "value"], save=["classifier"], labels=None),
    dict(name="distilbert-ner", base="distilbert-tokens", seed=16, r=2, alpha=4, rslora=False,
         targets=["q_lin", "v_lin", "lin1"], save=["classifier"], labels=["O", "B-ORG", "I-ORG"],
         token=True),
    dict(name="modernbert-topics", base="modernbert-cls", seed=17, r=4, alpha=8, rslora=False,
         targets=["Wqkv", "Wo", "Wi"], save=["classifier", "head"],
         labels=["billing", "shipping", "returns", "other"]),
    dict(name="modernbert-ner", base="modernbert-ner", seed=18, r=2, alpha=4, rslora=True,
         targets=r".*layers\.\d+\.(attn\.Wqkv|mlp\.Wi)", save=["classifier"],
         labels=["O", "B-LOC", "I-LOC"], token=True),
    dict(name="deberta-guard", base="deberta-v3-cls", seed=19, r=4, alpha=8, rslora=False,
         targets=r".*(embeddings\.embed_proj|layer\.\d+\.(attention\.self\.(query|key|value)_proj|"
                 r"attention\.output\.dense|intermediate\.dense|output\.dense))",
         save=["classifier", "pooler"], labels=["SAFE", "INJECTION"]),
    dict(name="deberta-qk", base="deberta-v3-cls", seed=20, r=2, alpha=4, rslora=False,
         targets=["query_proj", "key_proj"], save=["classifier"], labels=None),
    dict(name="deberta-rerank-pos", base="deberta-v3-rerank", seed=21, r=2, alpha=4, rslora=True,
         targets=["query_proj", "key_proj", "pos_key_proj", "pos_query_proj"], save=["classifier"],
         labels=None),
    # PEFT's all-linear adapts the head's dense layer (pooler, ModernBERT's head) too.
    dict(name="bert-all-linear", base="bert-cls", seed=22, r=2, alpha=4, rslora=False,
         targets="all-linear", save=["classifier"], labels=None),
    dict(name="modernbert-all-linear", base="modernbert-cls", seed=23, r=2, alpha=4, rslora=False,
         targets="all-linear", save=["classifier"], labels=["a", "b", "c"]),
    dict(name="deberta-all-linear", base="deberta-v3-cls", seed=24, r=2, alpha=4, rslora=False,
         targets="all-linear", save=["classifier"], labels=None),
    dict(name="gemma2-all", base="gemma2-cls", seed=25, r=4, alpha=8, rslora=False,
         targets="all-linear", save=["score"], labels=["ok", "flag"]),
]


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def base_model(base, labels, token=False):
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if labels is not None:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={l: i for i, l in enumerate(labels)}, ignore_mismatched_sizes=True)
    return auto.from_pretrained(str(MODDIR / base), **kwargs).eval()


def randomise(model, seed):
    """Every LoRA matrix and saved-head weight gets seeded values of a visible size."""
    g = torch.Generator().manual_seed(seed)
    touched = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            fan_in = p.shape[1]
            scale = 0.6 / math.sqrt(fan_in)
        elif "modules_to_save" in name:
            fan_in = p.shape[-1] if p.dim() == 2 else 8
            scale = 1.5 / math.sqrt(fan_in)
        else:
            continue
        with torch.no_grad():
            p.copy_(scale * torch.randn(p.shape, generator=g))
        touched += 1
    assert touched, "no adapter parameters"


def token_logits_of(model, case):
    ids = torch.tensor([case["input_ids"]])
    return model(input_ids=ids).logits[0]


def logits_of(model, case):
    ids = torch.tensor([case["input_ids"]])
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    if hasattr(inner, "score"):
        # The last token's row, as the base fixtures (a trailing pad id must not move it).
        h = inner.model(input_ids=ids, use_cache=False).last_hidden_state
        return inner.score(h)[0, -1]
    if inner.config.model_type == "modernbert":  # no token types
        return model(input_ids=ids).logits[0]
    tt = torch.tensor([case.get("token_type_ids") or [0] * len(case["input_ids"])])
    return model(input_ids=ids, token_type_ids=tt).logits[0]


def activation_of(config):
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def apply_act(act, x):
    if act == "softmax":
        return torch.softmax(x, dim=-1)
    if act == "sigmoid":
        return torch.sigmoid(x)
    return x


def make(spec):
    out = OUTDIR / spec["name"]
    shutil.rmtree(out, ignore_errors=True)
    base_ref = json.loads((MODDIR / spec["base"] / "reference.json").read_text())
    token = spec.get("token", False)
    model = base_model(spec["base"], spec["labels"], token)
    cfg = LoraConfig(task_type=TaskType.TOKEN_CLS if token else TaskType.SEQ_CLS, r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                     use_rslora=spec["rslora"], target_modules=spec["targets"], modules_to_save=spec["save"],
                     bias="none")
    peft_model = get_peft_model(model, cfg).eval()
    randomise(peft_model, spec["seed"])
    peft_model.save_pretrained(str(out), safe_serialization=True)
    # No machine paths in the fixtures: the base is named relative to the adapter, and
    # PEFT's generated model card goes.
    (out / "README.md").unlink(missing_ok=True)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = f"../../models/{spec['base']}"
    # PEFT writes target_modules from a set: sorted, so a re-run gives the same file.
    if isinstance(adapter_cfg["target_modules"], list):
        adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
    write_json(out / "adapter_config.json", adapter_cfg)
    # The adapter's labels (PEFT saves none): read by the engine for its head.
    config = peft_model.base_model.model.config
    write_json(out / "config.json", {
        "architectures": config.architectures,
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "label2id": dict(config.label2id),
        "problem_type": config.problem_type,
    })

    # References from the adapter as saved, on a fresh base model: the unmerged model,
    # then the merged one must agree.
    fresh = base_model(spec["base"], spec["labels"], token)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    act = activation_of(loaded.base_model.model.config)
    # Token classifiers: per-token rows; `logits`/`probs` are the first token's, as
    # in the base fixture.
    logits_of_case = (lambda m, c: token_logits_of(m, c)[0]) if token else logits_of
    cases = []
    with torch.no_grad():
        for case in base_ref["cases"]:
            logits = logits_of_case(loaded, case)
            entry = {k: v for k, v in case.items()
                     if k not in ("logits", "probs", "token_logits", "token_probs")}
            entry["logits"] = [float(v) for v in logits]
            entry["probs"] = [float(v) for v in apply_act(act, logits)]
            if token:
                rows = token_logits_of(loaded, case)
                entry["token_logits"] = [[float(v) for v in r] for r in rows]
                entry["token_probs"] = [[float(v) for v in r] for r in apply_act(act, rows)]
            cases.append(entry)
        plain_model = base_model(spec["base"], None, token)
        base_logits = [logits_of_case(plain_model, c) for c in base_ref["cases"]]
        merged = loaded.merge_and_unload().eval()
        for case, entry, plain in zip(base_ref["cases"], cases, base_logits):
            m = logits_of_case(merged, case)
            want = torch.tensor(entry["logits"])
            diff = (m - want).abs().max().item()
            # Merging rounds W + BA once; relative to the logits' size past 1.
            assert diff < 1e-5 * max(1.0, want.abs().max().item()), (spec["name"], case["name"], diff)
            if spec["labels"] is None:
                moved = (plain - torch.tensor(entry["logits"])).abs().max().item()
                assert moved > 0.05, (spec["name"], case["name"], "the adapter barely moves the logits", moved)
    labels = merged.config.id2label
    write_json(out / "reference.json", {
        "generator": GENERATOR,
        "base": spec["base"],
        "architecture": base_ref["architecture"],
        "engine_args": base_ref["engine_args"],
        "num_labels": len(labels),
        "activation": act,
        "id2label": {str(k): v for k, v in labels.items()},
        "cases": cases,
    })
    print(f"{spec['name']}: {len(cases)} cases, {sum(p.numel() for n, p in loaded.named_parameters())} params")


def main():
    OUTDIR.mkdir(parents=True, exist_ok=True)
    wanted = set(sys.argv[1:])
    for spec in ADAPTERS:
        if not wanted or spec["name"] in wanted:
            make(spec)


if __name__ == "__main__":
    main()
