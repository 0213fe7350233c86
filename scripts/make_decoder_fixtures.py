#!/usr/bin/env python3
"""Tiny Gemma / Gemma-2 / Gemma-3 / Phi-3 / Granite fixtures with transformers 5 references.

    /opt/torchenv/bin/python scripts/make_decoder_fixtures.py [fixture ...]

Writes only its own fixtures under fixtures/models/ (the others come from
scripts/make_fixtures.py on transformers 4.46.3, which has no Gemma-3) with the
same recipe: seeded random weights (`perturb`), bf16 storage, references from the
saved bf16 checkpoint re-loaded in float32 with eager attention, the same prompts
and reference.json format. Each family is checked as `*ForSequenceClassification`
and as `*ForCausalLM` converted with `classifier_from_token` (whose reference is
the CausalLM's logits: Gemma-2/3 soft-capped, Granite divided by logits_scaling).

Real Gemma tokenizers are 30+ MB: the fixtures use the shared gpt2 / qwen3 copies.
The script asserts what each fixture is there to exercise: attention logits beyond
Gemma-2's cap, LM logits beyond the final cap, a prompt longer than the sliding
window and than Phi-3's original context (so LongRoPE's long factors are used).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    GemmaConfig,
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    GraniteConfig,
    GraniteForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
)
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.models.granite.modeling_granite import GranitePreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (prompts, perturbation, reference format)

LM_TOKENS = ["Ġyes", "Ġno", "Ġmaybe"]
TWO_WAY = ["Ġno", "Ġyes"]

# hidden 4 (explicit head_dim) or 8 (head_dim = hidden / heads) keeps the vocab x hidden
# embedding, almost the whole file, small.
GEMMA_DIMS = dict(vocab_size=50257, hidden_size=4, intermediate_size=12, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                  pad_token_id=50256, bos_token_id=50256, eos_token_id=50256)
# Shorter than the long prompt (136 gpt2 tokens), longer than the short ones.
WINDOW = 9


def lm_args(tokens, method):
    return {"convert": "classify", "hf_overrides": {"classifier_from_token": tokens, "method": method}}


def spec_gemma_cls():
    cfg = GemmaConfig(num_labels=3, hidden_activation="gelu_pytorch_tanh", **GEMMA_DIMS)
    return dict(cls=GemmaForSequenceClassification, config=cfg, heads=["score"], fwd=mf.fwd_decoder_cls)


def spec_gemma_lm():
    cfg = GemmaConfig(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", **GEMMA_DIMS)
    return dict(cls=GemmaForCausalLM, config=cfg, heads=["model.embed_tokens"], lm_tokens=LM_TOKENS,
                engine_args=lm_args(LM_TOKENS, "no_post_processing"), num_labels=len(LM_TOKENS))


def gemma2_config(**kw):
    return Gemma2Config(sliding_window=WINDOW, query_pre_attn_scalar=12, attn_logit_softcapping=1.0,
                        final_logit_softcapping=2.0, **GEMMA_DIMS, **kw)


def spec_gemma2_cls():
    return dict(cls=Gemma2ForSequenceClassification, config=gemma2_config(num_labels=2), heads=["score"],
                fwd=mf.fwd_decoder_cls, attn_cap=True)


def spec_gemma2_lm():
    return dict(cls=Gemma2ForCausalLM, config=gemma2_config(tie_word_embeddings=True),
                heads=["model.embed_tokens"], two_way=TWO_WAY, attn_cap=True, final_cap=True,
                engine_args=lm_args(TWO_WAY, "from_2_way_softmax"), num_labels=1)


def gemma3_config(**kw):
    dims = dict(GEMMA_DIMS, num_hidden_layers=3)
    # layers 0 and 1 slide (their own rotary base), layer 2 is global. transformers 5
    # keeps attn_logit_softcapping in Gemma-3's config but does not apply it: set, to
    # check that the engine does not either.
    return Gemma3TextConfig(sliding_window=WINDOW, sliding_window_pattern=3, query_pre_attn_scalar=20,
                            rope_theta=1000000.0, rope_local_base_freq=1000.0, attn_logit_softcapping=1.5,
                            final_logit_softcapping=1.5, **dims, **kw)


def spec_gemma3_cls():
    return dict(cls=Gemma3TextForSequenceClassification, config=gemma3_config(num_labels=2), heads=["score"],
                fwd=mf.fwd_decoder_cls)


def spec_gemma3_lm():
    return dict(cls=Gemma3ForCausalLM, config=gemma3_config(tie_word_embeddings=True),
                heads=["model.embed_tokens"], lm_tokens=LM_TOKENS, final_cap=True,
                engine_args=lm_args(LM_TOKENS, "no_post_processing"), num_labels=len(LM_TOKENS))


PHI3_ORIGINAL = 32


def phi3_config(rotary_factors, **kw):
    # LongRoPE with factor 256 / 32 = 8: the long prompt is past the original 32
    # positions, so it reads the long factors, the others the short ones.
    short, long = rotary_factors
    # one head of 8 (Phi-3-mini has as many kv heads as heads): 4 rotary frequencies
    return Phi3Config(vocab_size=50257, hidden_size=8, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256,
                      original_max_position_embeddings=PHI3_ORIGINAL, sliding_window=WINDOW,
                      rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
                      pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, **kw)


def spec_phi3_cls():
    cfg = phi3_config(([1.0, 1.3, 2.1, 3.5], [1.5, 4.0, 9.0, 21.0]), num_labels=2)
    return dict(cls=Phi3ForSequenceClassification, config=cfg, heads=["score"], fwd=mf.fwd_decoder_cls,
                longrope=True)


def spec_phi3_lm():
    # Phi-4-mini style partial rotary: half of each 8-wide head rotates (2 frequencies).
    cfg = phi3_config(([1.0, 2.5], [3.0, 17.0]), partial_rotary_factor=0.5, tie_word_embeddings=True)
    return dict(cls=Phi3ForCausalLM, config=cfg, heads=["model.embed_tokens"], lm_tokens=LM_TOKENS, longrope=True,
                engine_args=lm_args(LM_TOKENS, "no_post_processing"), num_labels=len(LM_TOKENS))


def granite_config(**kw):
    return GraniteConfig(vocab_size=50257, hidden_size=8, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.9,
                         logits_scaling=3.0, pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, **kw)


class GraniteForSequenceClassification(GenericForSequenceClassification, GranitePreTrainedModel):
    """transformers 5 has no Granite classifier; this is how it defines them for the
    other decoders (Phi-3's, Gemma's, ...): the base model plus a bias-free `score`."""


def spec_granite_cls():
    # A Granite LM with a `score` head, served with --convert classify (vLLM's
    # as_seq_cls_model), as the qwen2-causal-score fixture.
    def edit(cfg):
        cfg.architectures = ["GraniteForCausalLM"]
    return dict(cls=GraniteForSequenceClassification, config=granite_config(num_labels=2), heads=["score"],
                fwd=mf.fwd_decoder_cls, config_edit=edit, engine_args={"convert": "classify", "hf_overrides": None})


def spec_granite_lm():
    return dict(cls=GraniteForCausalLM, config=granite_config(tie_word_embeddings=True),
                heads=["model.embed_tokens"], two_way=TWO_WAY,
                engine_args=lm_args(TWO_WAY, "from_2_way_softmax"), num_labels=1)


FIXTURES = [
    ("gemma-cls", spec_gemma_cls),
    ("gemma-lm-tokens", spec_gemma_lm),
    ("gemma2-cls", spec_gemma2_cls),
    ("gemma2-lm-2way", spec_gemma2_lm),
    ("gemma3-cls", spec_gemma3_cls),
    ("gemma3-lm-tokens", spec_gemma3_lm),
    ("phi3-cls", spec_phi3_cls),
    ("phi3-lm-tokens", spec_phi3_lm),
    ("granite-cls", spec_granite_cls),
    ("granite-lm-2way", spec_granite_lm),
]


class TanhInputs:
    """Records the largest |input| of torch.tanh over the visible (causal) attention
    scores (4-D inputs) and over everything else (the final logit soft-cap)."""

    def __enter__(self):
        self.attn = 0.0
        self.other = 0.0
        self.orig = torch.tanh

        def tanh(x, *a, **k):
            if x.dim() == 4:
                visible = torch.tril(torch.ones(x.shape[-2:], dtype=torch.bool))
                self.attn = max(self.attn, x.abs()[..., visible].max().item())
            else:
                self.other = max(self.other, x.abs().max().item())
            return self.orig(x, *a, **k)

        torch.tanh = tanh
        return self

    def __exit__(self, *exc):
        torch.tanh = self.orig


def make_fixture(name, spec_fn, salt):
    spec = spec_fn()
    out = mf.fresh_model_dir(name)
    model = mf.make_hf_model(out, spec["cls"], spec["config"], spec["heads"], mf.stable_seed(f"{name}/{salt}"),
                             spec.get("config_edit"))
    saved_cfg = json.loads((out / "config.json").read_text())
    if spec.get("config_edit"):
        assert saved_cfg["architectures"] != [spec["cls"].__name__], saved_cfg["architectures"]
    mf.link_tokenizer(out, "gpt2")
    tok = mf.RefTokenizer(out)

    fwd = spec.get("fwd")
    if spec.get("lm_tokens"):
        ids = [tok.hf.convert_tokens_to_ids(t) for t in spec["lm_tokens"]]
        assert tok.hf.unk_token_id not in ids
        fwd = mf.fwd_lm_tokens(ids)
    if spec.get("two_way"):
        no_id, yes_id = [tok.hf.convert_tokens_to_ids(t) for t in spec["two_way"]]
        fwd = mf.fwd_2way(no_id, yes_id)

    def encode(text, text_pair=None):
        ids, _ = tok.encode(text, text_pair=text_pair)
        assert saved_cfg.get("pad_token_id") not in ids
        return {"input_ids": ids, "token_type_ids": None}

    with TanhInputs() as seen:
        ref = mf.write_reference(out, model, fwd, encode, mf.GENERATOR, num_labels=spec.get("num_labels"),
                                 engine_args=spec.get("engine_args"))
    cases = ref["cases"]
    longest = max(len(c["input_ids"]) for c in cases)
    shortest = min(len(c["input_ids"]) for c in cases)
    if saved_cfg.get("sliding_window"):
        assert shortest < saved_cfg["sliding_window"] < longest, (shortest, longest)
    if spec.get("attn_cap"):
        cap = saved_cfg["attn_logit_softcapping"]
        assert seen.attn > 1.0, f"{name}: attention scores never pass the cap ({seen.attn * cap:.2f} <= {cap})"
    if spec.get("final_cap"):
        assert seen.other > 1.0, f"{name}: LM logits never pass the final cap ({seen.other:.2f} <= 1)"
    if spec.get("longrope"):
        assert shortest <= PHI3_ORIGINAL < longest, (shortest, longest)
    return ref, (seen.attn, seen.other)


def main():
    only = set(sys.argv[1:])
    for name, spec_fn in FIXTURES:
        if only and name not in only:
            continue
        for salt in range(50):
            try:
                ref, seen = make_fixture(name, spec_fn, salt)
                ok, why = mf.outputs_are_informative(ref)
            except AssertionError as e:
                ok, why = False, str(e)
            if ok:
                break
            print(f"  {name}: seed salt {salt} rejected ({why})")
        else:
            sys.exit(f"{name}: no seed gave informative outputs")
        summary = ", ".join(f"{c['name']}:{len(c['input_ids'])}t" for c in ref["cases"])
        print(f"{name}: {ref['architecture']} labels={ref['num_labels']} act={ref['activation']} "
              f"max tanh input attn={seen[0]:.2f} final={seen[1]:.2f} [{summary}]")


if __name__ == "__main__":
    main()
