#!/usr/bin/env python3
"""Fixtures for reward models, STEP pooling, decoder cross-encoders and reranker recipes.

Run with transformers 5.x (CPU torch is fine):

    python scripts/make_reward_fixtures.py

Writes only its own fixtures under fixtures/models/ (each is wiped and rebuilt; the run is
deterministic).  Weights are made and stored as in scripts/make_fixtures.py (seeded
perturbation, bf16 storage, references from the bf16 checkpoint re-loaded in fp32):

- qwen2-rm: Qwen2ForRewardModel (Qwen2.5-Math-RM).  Its transformers code is remote code, so
  the reference is `RewardModel` below: transformers' Qwen2Model plus the checkpoint's
  `score` Sequential (Linear(h, h) -> ReLU -> Linear(h, 1)), one reward per token; the
  sequence reward is the last token's.
- qwen2-prm: Qwen2ForProcessRewardModel (Qwen2.5-Math-PRM), the same module with 2 labels;
  the outputs are the softmax over the 2 labels at the step-tag tokens (vLLM's default tag
  151651, `<|quad_end|>` in the shared Qwen tokenizer, stands in for the PRM's `<extra_0>`).
- llama-step-lm: a math-shepherd-style process reward model: a causal LM whose LM-head
  logits at the step-tag tokens, restricted to two "good"/"bad" token columns, are
  soft-maxed (served with `--pooler-config '{"pooling_type":"STEP",...}'`).
- qwen2-pair-score: Qwen2ForSequenceClassification with one label, scored on (query,
  document) pairs through a Qwen tokenizer whose pair template gives the second text token
  type 1 (as Qwen3-Embedding's does).  Decoders have no token types: the reference feeds the
  pair's ids alone.  The template is `tokenizer_post_processor.json`; tests splice it into a
  copy of the shared Qwen tokenizer.
- qwen3-reranker-template: the qwen3-reranker fixture (a Qwen3ForCausalLM) served with
  `is_original_qwen3_reranker` and a score template (`score_template.jinja`, the
  Qwen3-Reranker prompt format): score = P("yes") of the 2-way softmax over the "no"/"yes"
  LM-head logits at the last token of the rendered prompt.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import jinja2
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    Qwen3ForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
# (importing it also sets the deterministic single-thread torch and quiet transformers used for all fixtures)
from make_fixtures import (  # noqa: E402
    GENERATOR,
    MODDIR,
    PAIRS,
    TEXTS,
    TOKDIR,
    f32list,
    fresh_model_dir,
    link_tokenizer,
    make_hf_model,
    perturb,
    stable_seed,
    write_json,
)

PRM_STEP_TAG = "<|quad_end|>"  # id 151651: vLLM's default step_tag_id for Qwen2ForProcessRewardModel
PRM_PROMPTS = [
    ("two_steps", "Solve 2+3*4.\nStep 1: 3*4 = 12.<|quad_end|>Step 2: 2 + 12 = 14.<|quad_end|>"),
    ("three_steps", "Is 91 prime?<|quad_end|>91 = 7 * 13.<|quad_end|>So it is not prime.<|quad_end|>"),
    ("one_step_mid", "Step one<|quad_end|> then some text without a tag at the end"),
    ("no_step", "A prompt without any step tag."),
]
# A second tag for per-request step_tag_id overrides.
PRM_ALT_TAG = "Step"

SHEPHERD_PROMPTS = [
    ("steps", "Janet has 3 apples and buys 2 more. Step 1: 3 + 2 = 5 ¶ Step 2: The answer is 5 ¶"),
    ("bad_step", "What is 7*8? Step 1: 7*8 = 54 ¶"),
    ("long", ("Q: A train goes 60 km in 1.5 h. Speed? Step 1: 60 / 1.5 = 40 ¶ Step 2: 40 km/h ¶ "
              "Step 3: Check: 40 * 1.5 = 60 ¶ Step 4: So the speed is 40 km/h. ¶")),
]
SHEPHERD_TAG = " ¶"
SHEPHERD_GOOD_BAD = [" +", " -"]
SHEPHERD_ALT_RETURNED = [" -", " +", " ?"]

RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
SCORE_TEMPLATE = (
    "<|im_start|>system\n"
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    "Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
    "<|im_start|>user\n"
    "<Instruct>: {{ instruction | default(\"" + RERANK_INSTRUCTION + "\") }}\n"
    "<Query>: {{ (messages | selectattr(\"role\", \"eq\", \"query\") | first).content }}\n"
    "<Document>: {{ (messages | selectattr(\"role\", \"eq\", \"document\") | first).content }}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)

# Qwen3-Embedding's template: <|endoftext|> after each text, the second text is type 1.
PAIR_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
    "pair": [
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
        {"Sequence": {"id": "B", "type_id": 1}},
        {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}},
    ],
    "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}},
}


class RewardModel(nn.Module):
    """Qwen2ForRewardModel / Qwen2ForProcessRewardModel as the released checkpoints define them."""

    def __init__(self, config):
        super().__init__()
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, config.num_labels))

    def forward(self, input_ids):
        hidden = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.score(hidden)


def qwen2_config(num_labels, arch):
    # hidden 4 with head_dim 4 (2 query heads, 1 kv head): the Qwen vocab x hidden embedding is the
    # whole file, so the hidden size is as small as GQA with two RoPE frequencies allows.
    cfg = Qwen2Config(vocab_size=151936, hidden_size=4, head_dim=4, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=1000000.0,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      num_labels=num_labels, bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
    cfg.architectures = [arch]
    cfg._attn_implementation = "eager"
    return cfg


def save_bf16(module, out):
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)


def reload_fp32(module, out):
    state = {k: v.to(torch.float32) for k, v in load_file(str(out / "model.safetensors")).items()}
    module.load_state_dict(state, strict=True)
    return module.float().eval()


def ids_of(tok, text):
    return tok(text, add_special_tokens=True)["input_ids"]


def single_token(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


def reference(out, arch, engine_args, cases, **extra):
    ref = {"generator": GENERATOR, "architecture": arch, "engine_args": engine_args, **extra, "cases": cases}
    write_json(out / "reference.json", ref)


def reward_fixture(name, arch, num_labels, prompts, step_tag=None, alt_tag=None):
    out = fresh_model_dir(name)
    cfg = qwen2_config(num_labels, arch)
    seed = stable_seed(name)
    torch.manual_seed(seed)
    model = RewardModel(cfg)
    perturb(model, ["score"], seed)
    save_bf16(model, out)
    cfg.save_pretrained(str(out))
    model = reload_fp32(RewardModel(cfg), out)
    link_tokenizer(out, "qwen3")
    tok = AutoTokenizer.from_pretrained(str(out))
    tag_id = single_token(tok, step_tag) if step_tag else None
    alt_id = single_token(tok, alt_tag) if alt_tag else None
    cases = []
    for cname, text in prompts:
        ids = ids_of(tok, text)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0]
        case = {"name": cname, "text": text, "input_ids": ids}
        if tag_id is None:
            case["token_logits"] = f32list(logits)
            case["token_probs"] = f32list(torch.sigmoid(logits))
            case["sequence_reward"] = float(logits[-1, 0])
        else:
            for key, tid in (("step", tag_id), ("alt_step", alt_id)):
                rows = [i for i, t in enumerate(ids) if t == tid]
                sel = logits[rows]
                case[f"{key}_rows"] = rows
                case[f"{key}_logits"] = f32list(sel) if rows else []
                case[f"{key}_probs"] = f32list(torch.softmax(sel, dim=-1)) if rows else []
        cases.append(case)
    extra = {"step_tag_id": tag_id, "alt_step_tag_id": alt_id} if tag_id is not None else {}
    reference(out, arch, {"convert": None, "hf_overrides": None, "pooler_config": None}, cases, **extra)
    print(f"{name}: {[len(c['input_ids']) for c in cases]} tokens")


def shepherd_fixture():
    name = "llama-step-lm"
    out = fresh_model_dir(name)
    # head_dim 8 at hidden 4 (explicit head_dim), tied LM head over the GPT-2 vocabulary.
    cfg = LlamaConfig(vocab_size=50257, hidden_size=4, head_dim=8, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=50256, eos_token_id=50256)
    cfg.architectures = ["LlamaForCausalLM"]
    model = make_hf_model(out, LlamaForCausalLM, cfg, ["model.embed_tokens"], stable_seed(name))
    link_tokenizer(out, "gpt2")
    tok = AutoTokenizer.from_pretrained(str(out))
    tag = single_token(tok, SHEPHERD_TAG)
    returned = [single_token(tok, t) for t in SHEPHERD_GOOD_BAD]
    alt_returned = [single_token(tok, t) for t in SHEPHERD_ALT_RETURNED]
    cases = []
    for cname, text in SHEPHERD_PROMPTS:
        ids = ids_of(tok, text)
        rows = [i for i, t in enumerate(ids) if t == tag]
        assert rows, cname
        with torch.no_grad():
            lm = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0][rows]
        case = {"name": cname, "text": text, "input_ids": ids, "step_rows": rows}
        for key, cols in (("step", returned), ("alt_step", alt_returned)):
            sel = lm[:, cols]
            case[f"{key}_logits"] = f32list(sel)
            case[f"{key}_probs"] = f32list(torch.softmax(sel, dim=-1))
        cases.append(case)
    pooler = {"pooling_type": "STEP", "step_tag_id": tag, "returned_token_ids": returned}
    reference(out, "LlamaForCausalLM", {"convert": "classify", "hf_overrides": None, "pooler_config": pooler},
              cases, alt_returned_token_ids=alt_returned)
    print(f"{name}: {[len(c['input_ids']) for c in cases]} tokens, tag {tag}, returned {returned}")


def pair_score_fixture():
    # Seeds are searched until the scores of the pairs clearly differ.
    for salt in range(20):
        cases = make_pair_score(salt)
        logits = [c["logits"][0] for c in cases]
        if max(logits) - min(logits) > 1.0:
            return
    sys.exit("qwen2-pair-score: no seed gave informative scores")


def make_pair_score(salt):
    name = "qwen2-pair-score"
    out = fresh_model_dir(name)
    cfg = qwen2_config(1, "Qwen2ForSequenceClassification")
    model = make_hf_model(out, Qwen2ForSequenceClassification, cfg, ["score"], stable_seed(f"{name}/{salt}"))
    (out / "tokenizer_post_processor.json").write_text(json.dumps(PAIR_POST_PROCESSOR, indent=1) + "\n")
    tok_dir = out / ".tokenizer"
    tok_dir.mkdir()
    raw = json.loads((TOKDIR / "qwen3" / "tokenizer.json").read_text(encoding="utf-8"))
    raw["post_processor"] = PAIR_POST_PROCESSOR
    (tok_dir / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    shutil.copy(TOKDIR / "qwen3" / "tokenizer_config.json", tok_dir / "tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    fast = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    cases = []
    for cname, query, doc in PAIRS:
        enc = fast.encode(query, doc)
        ids = enc.ids
        assert tok(query, text_pair=doc)["input_ids"] == ids
        assert 1 in enc.type_ids, "the pair template must give the document type 1"
        with torch.no_grad():
            logit = model(input_ids=torch.tensor([ids])).logits[0]
        cases.append({"name": cname, "query": query, "document": doc, "input_ids": ids,
                      "token_type_ids": enc.type_ids, "logits": f32list(logit),
                      "probs": f32list(torch.sigmoid(logit))})
    shutil.rmtree(tok_dir)
    link_tokenizer(out, "qwen3")
    reference(out, "Qwen2ForSequenceClassification", {"convert": None, "hf_overrides": None, "pooler_config": None},
              cases)
    print(f"{name}: {[len(c['input_ids']) for c in cases]} tokens, logits {[c['logits'][0] for c in cases]}")
    return cases


def rerank_template_fixture():
    name = "qwen3-reranker-template"
    src = MODDIR / "qwen3-reranker"
    out = fresh_model_dir(name)
    for f in ("config.json", "model.safetensors"):
        os.symlink(f"../qwen3-reranker/{f}", out / f)
    link_tokenizer(out, "qwen3")
    (out / "score_template.jinja").write_text(SCORE_TEMPLATE, encoding="utf-8")
    model = Qwen3ForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    no_id, yes_id = (single_token(tok, t) for t in ("no", "yes"))
    template = jinja2.Environment(undefined=jinja2.Undefined).from_string(SCORE_TEMPLATE)
    cases = []
    variants = [(c, q, d, None) for c, q, d in PAIRS]
    variants.append(("instruction", PAIRS[0][1], PAIRS[0][2], "Find the answer to a support question"))
    for cname, query, doc, instruction in variants:
        kwargs = {} if instruction is None else {"instruction": instruction}
        rendered = template.render(messages=[{"role": "query", "content": query},
                                             {"role": "document", "content": doc}], **kwargs)
        ids = ids_of(tok, rendered)
        with torch.no_grad():
            lm = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        two_way = torch.softmax(torch.stack([lm[no_id], lm[yes_id]]), dim=-1)
        logit = (lm[yes_id] - lm[no_id]).reshape(1)
        cases.append({"name": cname, "query": query, "document": doc, "instruction": instruction,
                      "rendered": rendered, "input_ids": ids, "logits": f32list(logit),
                      "probs": [float(two_way[1])]})
    reference(out, "Qwen3ForCausalLM",
              {"convert": None, "hf_overrides": {"is_original_qwen3_reranker": True}, "pooler_config": None,
               "chat_template": "score_template.jinja"}, cases)
    print(f"{name}: {[len(c['input_ids']) for c in cases]} tokens")


def main():
    reward_fixture("qwen2-rm", "Qwen2ForRewardModel", 1, TEXTS)
    reward_fixture("qwen2-prm", "Qwen2ForProcessRewardModel", 2, PRM_PROMPTS, PRM_STEP_TAG, PRM_ALT_TAG)
    shepherd_fixture()
    pair_score_fixture()
    rerank_template_fixture()


if __name__ == "__main__":
    main()
