#!/usr/bin/env python3
"""Tiny random-weight DistilBERT and GTE "new" fixtures with reference outputs.

    python scripts/make_encoder_fixtures_distil_gte.py   # transformers 5.x, torch, numpy

Writes only its own fixtures (fixtures/models/{distilbert-cls, distilbert-tokens,
distilbert-rerank, gte-rerank, gte-tokens}), with the weight, seed and prompt rules of
scripts/make_fixtures.py (whose helpers it imports): seeded perturbation of every
parameter, bf16 storage, references from re-loading the bf16 checkpoint in fp32.

- DistilBERT: transformers' own classes.  `distilbert-cls` uses sinusoidal position
  embeddings and is saved *without* the position table (transformers re-creates it
  on load, as the engine must); `distilbert-tokens` has learned positions.  Pairs are
  encoded with the BERT tokenizer, and DistilBERT takes no token types.
- GTE "new": transformers has no class for it (remote code), so the references come
  from scripts/gte_new_reference.py, a torch module written from the checkpoint
  format and vLLM's implementation, checked here against its independent float64
  numpy recomputation on every case before anything is written.
"""

import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gte_new_reference as gte  # noqa: E402
import make_fixtures as mf  # noqa: E402

NUMPY_ATOL = 2e-5

ENTITIES = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


# --------------------------------------------------------------------------------------
# DistilBERT (transformers)
# --------------------------------------------------------------------------------------


def distil_config(**kw):
    return DistilBertConfig(vocab_size=30522, dim=8, n_layers=2, n_heads=2, hidden_dim=32,
                            max_position_embeddings=512, pad_token_id=0, **kw)


def spec_distilbert_cls():
    cfg = distil_config(activation="gelu", sinusoidal_pos_embds=True, num_labels=3, id2label=mf.SENTIMENT,
                        label2id={v: k for k, v in mf.SENTIMENT.items()})
    return dict(kind="distil", cls=DistilBertForSequenceClassification, config=cfg,
                heads=["pre_classifier", "classifier"], tok="bert", pairs=3, token=False,
                drop=["distilbert.embeddings.position_embeddings.weight"])


def spec_distilbert_tokens():
    cfg = distil_config(activation="relu", sinusoidal_pos_embds=False, num_labels=len(ENTITIES),
                        id2label=ENTITIES, label2id={v: k for k, v in ENTITIES.items()})
    return dict(kind="distil", cls=DistilBertForTokenClassification, config=cfg, heads=["classifier"],
                tok="bert", pairs=2, token=True, drop=[])


def spec_distilbert_rerank():
    # A num_labels 1 cross-encoder: learned positions stored in the checkpoint.
    cfg = distil_config(activation="gelu", sinusoidal_pos_embds=False, num_labels=1)
    return dict(kind="distil", cls=DistilBertForSequenceClassification, config=cfg,
                heads=["pre_classifier", "classifier"], tok="bert", pairs=3, token=False, drop=[])


def make_distil(spec, out, seed):
    torch.manual_seed(seed)
    model = spec["cls"](spec["config"])
    if spec["config"].sinusoidal_pos_embds:
        # Fixed table: keep transformers' values out of the perturbation.
        table = model.distilbert.embeddings.position_embeddings
        saved = table.weight.detach().clone()
    mf.perturb(model, spec["heads"], seed)
    if spec["config"].sinusoidal_pos_embds:
        with torch.no_grad():
            table.weight.copy_(saved)
    model.to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    if spec["drop"]:
        path = out / "model.safetensors"
        sd = load_file(str(path))
        for name in spec["drop"]:
            del sd[name]
        save_file(dict(sorted(sd.items())), str(path), metadata={"format": "pt"})
    loaded, info = spec["cls"].from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager",
                                               output_loading_info=True)
    assert set(info["missing_keys"]) == set(spec["drop"]) and not info["unexpected_keys"], info
    if spec["drop"]:
        # The re-created table is transformers' sinusoidal one (fp32, never stored).
        table = loaded.distilbert.embeddings.position_embeddings.weight
        assert torch.equal(table, saved.float()), "position table not re-created"
        assert abs(table[1, 0].item() - np.sin(1.0)) < 1e-7 and table[0, 1].item() == 1.0, table[:2, :2]
    return loaded.eval()


def fwd_distil(token):
    def fwd(model, ids, tt):
        ids_t = torch.tensor([ids])
        full = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).logits[0]
        if token:
            return full, full[0]
        h = model.distilbert(input_ids=ids_t).last_hidden_state[0]
        tok = model.classifier(torch.relu(model.pre_classifier(h)))
        assert torch.allclose(tok[0], full, atol=1e-6), (tok[0], full)
        return tok, full
    return fwd


# --------------------------------------------------------------------------------------
# GTE "new" (reference module)
# --------------------------------------------------------------------------------------


def gte_config(arch, num_labels, **kw):
    cfg = dict(architectures=[arch], model_type="new", vocab_size=50262, hidden_size=8, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=16, hidden_act="gelu", hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.0, max_position_embeddings=512, type_vocab_size=1,
               initializer_range=0.02, layer_norm_type="layer_norm", layer_norm_eps=1e-12,
               position_embedding_type="rope", rope_theta=20000.0, classifier_dropout=0.0, pack_qkv=True,
               unpad_inputs=False, use_memory_efficient_attention=False, logn_attention_scale=False,
               logn_attention_clip1=False, pad_token_id=1, num_labels=num_labels,
               id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
               label2id={f"LABEL_{i}": i for i in range(num_labels)}, torch_dtype="bfloat16")
    cfg.update(kw)
    return cfg


def spec_gte_rerank():
    # gte-multilingual-reranker's settings: NTK rope scaling x8, rope_theta 20000, one token type.
    cfg = gte_config("NewForSequenceClassification", 1, rope_scaling={"type": "ntk", "factor": 8.0})
    return dict(kind="gte", config=cfg, heads=["classifier"], tok="roberta", pairs=3, token=False)


def spec_gte_tokens():
    # The other switches: separate q/k/v projections, mixed NTK, two token types.
    cfg = gte_config("NewForTokenClassification", len(ENTITIES), pack_qkv=False, type_vocab_size=2,
                     rope_theta=10000.0, rope_scaling={"type": "ntk", "factor": 4.0, "mixed_b": 0.75})
    cfg["id2label"] = {str(k): v for k, v in ENTITIES.items()}
    cfg["label2id"] = {v: k for k, v in ENTITIES.items()}
    return dict(kind="gte", config=cfg, heads=["classifier"], tok="roberta", pairs=2, token=True)


def make_gte(spec, out, seed):
    cfg = spec["config"]
    torch.manual_seed(seed)
    model = gte.NewClassifier(cfg, spec["token"])
    mf.perturb(model, spec["heads"], seed)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(dict(sorted(sd.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    loaded = gte.NewClassifier(cfg, spec["token"])
    weights = {k: v.to(torch.float32) for k, v in load_file(str(out / "model.safetensors")).items()}
    loaded.load_state_dict(weights, strict=True)
    loaded.weights = weights
    return loaded.eval()


def fwd_gte(token):
    def fwd(model, ids, tt):
        tok, seq = model(ids, tt)
        np_tok, np_seq = gte.numpy_forward(model.weights, model.new.cfg, ids, tt, token)
        worst = max(np.abs(tok.detach().double().numpy() - np_tok).max(),
                    np.abs(seq.detach().double().numpy() - np_seq).max())
        assert worst < NUMPY_ATOL, f"torch reference vs numpy: {worst}"
        model.numpy_gap = max(getattr(model, "numpy_gap", 0.0), worst)
        return tok, seq
    return fwd


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------

FIXTURES = [
    ("distilbert-cls", spec_distilbert_cls),
    ("distilbert-tokens", spec_distilbert_tokens),
    ("distilbert-rerank", spec_distilbert_rerank),
    ("gte-rerank", spec_gte_rerank),
    ("gte-tokens", spec_gte_tokens),
]


def make_fixture(name, spec_fn, salt):
    spec = spec_fn()
    out = mf.fresh_model_dir(name)
    seed = mf.stable_seed(f"{name}/{salt}")
    distil = spec["kind"] == "distil"
    model = make_distil(spec, out, seed) if distil else make_gte(spec, out, seed)
    os.chmod(out / "model.safetensors", 0o644)
    mf.link_tokenizer(out, spec["tok"])
    tok = mf.RefTokenizer(out)

    def encode(text, text_pair=None):
        ids, tts = tok.encode(text, text_pair=text_pair)
        if distil and text_pair is not None:
            assert any(tts), "BERT pairs carry token types, which DistilBERT ignores"
        return {"input_ids": ids, "token_type_ids": None if distil else tts}

    fwd = fwd_distil(spec["token"]) if distil else fwd_gte(spec["token"])
    generator = mf.GENERATOR + ("" if distil else " (GTE via scripts/gte_new_reference.py, numpy-checked)")
    note = {"note": "token classification: logits/probs are the first token's"} if spec["token"] else {}
    ref = mf.write_reference(out, model, fwd, encode, generator, pairs=mf.PAIRS[: spec["pairs"]], **note)
    if not distil:
        print(f"  {name}: torch reference vs float64 numpy, largest logit gap {model.numpy_gap:.1e}")
    return ref


def main():
    torch.set_num_threads(1)
    only = set(sys.argv[1:])
    for name, spec_fn in FIXTURES:
        if only and name not in only:
            continue
        # Token classifiers are judged on their per-token outputs.
        judge = mf.token_outputs_are_informative if spec_fn()["token"] else mf.outputs_are_informative
        mf.search_seed(name, functools.partial(make_fixture, name, spec_fn), judge)


if __name__ == "__main__":
    main()
