#!/usr/bin/env python3
"""ModernBERT fixtures: tiny random-weight checkpoints with transformers reference outputs.

Run with a transformers 5.x environment (ModernBERT is not in 4.46.3):

    python scripts/make_modernbert_fixtures.py

Writes only its own files: fixtures/tokenizers/modernbert/ and
fixtures/models/modernbert-{cls,rerank,ner}/ (each wiped and rebuilt).  The
weight rules, prompts, seed search and reference format are make_fixtures.py's
(imported from it).  The reference model is the saved bf16 checkpoint reloaded
in float32 with attn_implementation="eager", whose local layers use the explicit
window mask |i - j| <= local_attention // 2.

Tokenizer: ModernBERT's own (OLMo BPE) is not available from a package registry,
so `modernbert` is the GPT-2 byte-level BPE of fixtures/tokenizers/gpt2 plus
ModernBERT's special tokens ([UNK] [CLS] [SEP] [PAD] [MASK] = 50257..50261) and
its template: `[CLS] A [SEP]`, pairs `[CLS] A [SEP] B [SEP]` with type ids 1 on
B (ModernBERT's tokenizer sets them; the model has no token types and
transformers does not pass them: model_input_names has no token_type_ids).

Every fixture has more layers than global_attn_every_n_layers, so global and
local layers both run, a local window far shorter than the longer prompts, and
distinct global/local rotary bases.
"""

import functools
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, processors
from transformers import (
    AutoTokenizer,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

TOK = mf.TOKDIR / "modernbert"
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
VOCAB = 50264  # the tokenizer's 50,262 ids, rounded up like ModernBERT's 50,368
VERY_LONG = " ".join([mf.LONG_TEXT] * 3)  # > 256 tokens: several CPU attention row blocks


def build_tokenizer():
    if TOK.exists():
        shutil.rmtree(TOK)
    TOK.mkdir(parents=True)
    tok = Tokenizer.from_file(str(mf.TOKDIR / "gpt2" / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS[:4]]
                           + [AddedToken("[MASK]", special=True, normalized=False, lstrip=True)])
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    assert list(ids.values()) == list(range(50257, 50262)), ids
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                 pad_token="[PAD]", mask_token="[MASK]", model_max_length=8192,
                                 model_input_names=["input_ids", "attention_mask"],
                                 clean_up_tokenization_spaces=True)
    hf.save_pretrained(str(TOK))
    mf.compact_tokenizer_json(TOK)
    check = AutoTokenizer.from_pretrained(str(TOK))
    assert check("Hello world").input_ids == [50258, 15496, 995, 50259], check("Hello world").input_ids
    assert "token_type_ids" not in check("a", "b")


class RefTokenizer(mf.RefTokenizer):
    """transformers' ids (it returns no token types) checked against the raw tokenizers lib."""

    def encode(self, text, text_pair=None, add_special_tokens=True):
        enc = self.hf(text, text_pair=text_pair, add_special_tokens=add_special_tokens, padding=False,
                      truncation=False)
        raw = self.raw.encode(text, text_pair, add_special_tokens=add_special_tokens)
        assert enc["input_ids"] == raw.ids, (text, text_pair, enc["input_ids"], raw.ids)
        assert "token_type_ids" not in enc
        return enc["input_ids"]


def config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_attention_heads=2,
                max_position_embeddings=8192, pad_token_id=50260, bos_token_id=50258, eos_token_id=50259,
                cls_token_id=50258, sep_token_id=50259)
    base.update(kw)
    return ModernBertConfig(**base)


def rope(global_theta, local_theta):
    return dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": global_theta},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}})


def spec_cls():
    # Every bias on, eps 1e-4 (not the 1e-5 default), CLS pooling; layers 0 and 3 global.
    cfg = config(num_hidden_layers=4, global_attn_every_n_layers=3, local_attention=6, norm_eps=1e-4,
                 norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
                 classifier_pooling="cls", classifier_activation="gelu", num_labels=3,
                 id2label=mf.SENTIMENT, label2id={v: k for k, v in mf.SENTIMENT.items()}, **rope(500.0, 20.0))
    return dict(cls=ModernBertForSequenceClassification, config=cfg, pairs=2, very_long=True, tokens=False)


def spec_rerank():
    # A cross-encoder as the released rerankers: no biases, mean pooling, one label;
    # an odd local_attention (5: |i - j| <= 2), every other layer global.
    cfg = config(num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=5, norm_eps=1e-5,
                 norm_bias=False, attention_bias=False, mlp_bias=False, classifier_bias=False,
                 classifier_pooling="mean", classifier_activation="silu", num_labels=1, **rope(160000.0, 10.0))
    return dict(cls=ModernBertForSequenceClassification, config=cfg, pairs=3, very_long=False, tokens=False)


def spec_ner():
    cfg = config(num_hidden_layers=3, global_attn_every_n_layers=3, local_attention=4, norm_eps=1e-5,
                 norm_bias=True, attention_bias=False, mlp_bias=True, classifier_bias=True,
                 classifier_activation="gelu", num_labels=5, **rope(1000.0, 50.0))
    return dict(cls=ModernBertForTokenClassification, config=cfg, pairs=0, very_long=False, tokens=True)


FIXTURES = [("modernbert-cls", spec_cls), ("modernbert-rerank", spec_rerank), ("modernbert-ner", spec_ner)]


def fwd_sequence(model, ids, tt):
    return None, model(input_ids=torch.tensor([ids])).logits[0]


def fwd_tokens(model, ids, tt):
    return model(input_ids=torch.tensor([ids])).logits[0], None


def make_fixture(name, spec_fn, salt):
    spec = spec_fn()
    out = mf.fresh_model_dir(name)
    model = mf.make_hf_model(out, spec["cls"], spec["config"], ["classifier"], mf.stable_seed(f"{name}/{salt}"))
    assert model.config._attn_implementation == "eager"
    mf.link_tokenizer(out, "modernbert")
    tok = RefTokenizer(out)
    texts = list(mf.TEXTS) + ([("very_long", VERY_LONG)] if spec["very_long"] else [])
    return mf.write_reference(out, model, fwd_tokens if spec["tokens"] else fwd_sequence,
                              lambda text, text_pair=None: {"input_ids": tok.encode(text, text_pair=text_pair)},
                              mf.GENERATOR + ', attn_implementation="eager"', texts=texts,
                              pairs=mf.PAIRS[: spec["pairs"]])


def main():
    build_tokenizer()
    for name, spec_fn in FIXTURES:
        # A token classifier (no sequence output) is judged on its per-token outputs.
        judge = mf.token_outputs_are_informative if spec_fn()["tokens"] else mf.outputs_are_informative
        mf.search_seed(name, functools.partial(make_fixture, name, spec_fn), judge)


if __name__ == "__main__":
    main()
