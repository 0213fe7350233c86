"""A small torch reference for the GTE "new" architecture (model_type `new`).

transformers has no class for it: the checkpoints ship remote code, which cannot be
loaded here.  This module is written from the checkpoint format (the weight names of
`NewForSequenceClassification` / `NewForTokenClassification`) and vLLM's
implementation (`bert_with_rope.py`: `GteNewModel` and the `ntk` rotary embedding):

- embeddings: word + token type (when `type_vocab_size` > 0), LayerNorm; no absolute
  positions (`position_embedding_type` "rope");
- every layer, post-norm: `attention.qkv_proj` (q, k, v stacked, bias) -> rotate-half
  RoPE on q and k -> softmax(q k^T / sqrt(d)) v -> `attention.o_proj` -> `attn_ln(x + .)`;
  then `mlp.up_gate_proj` (no bias; first half up, second half gate) ->
  `mlp.down_proj(act(gate) * up)` -> `mlp_ln(x + .)`;
- RoPE frequencies from `rope_theta`; `rope_scaling` {"type": "ntk", "factor": f}:
  base * f and every frequency / f^(2/d), or with `mixed_b` b: frequency i (from 1)
  / exp(ln(f) / (d/2)^b * i^b), applied when f > 1;
- sequence head: `new.pooler.dense` + tanh on the first token, then `classifier`;
  token head: `classifier` on every token.

`numpy_forward` recomputes the same model in float64 numpy with explicit loops (one
(cos, sin) pair at a time for RoPE, erf GELU from `math.erf`, softmax by hand); the
fixture generator checks the torch module against it before writing references.
"""

import math

import numpy as np
import torch
from torch import nn


def rope_inv_freq(cfg):
    """Rotary frequencies, float32 like the remote code's."""
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    base = float(cfg.get("rope_theta", 10000.0))
    exponents = torch.arange(0, d, 2).float() / d
    scaling = cfg.get("rope_scaling")
    factor = float(scaling["factor"]) if scaling else 1.0
    if scaling is not None:
        assert scaling["type"] == "ntk", scaling
    if factor <= 1.0:
        return 1.0 / (base ** exponents)
    mixed_b = scaling.get("mixed_b")
    if mixed_b is None:
        return 1.0 / ((base * factor) ** exponents) / factor ** (2 / d)
    a = math.log(factor) / (d / 2) ** mixed_b
    lam = torch.exp(a * torch.arange(1, d // 2 + 1).float() ** mixed_b)
    return 1.0 / (base ** exponents) / lam


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], h)
        if cfg["type_vocab_size"] > 0:
            self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], h)
        self.LayerNorm = nn.LayerNorm(h, eps=cfg["layer_norm_eps"])

    def forward(self, ids, types):
        x = self.word_embeddings(ids)
        if hasattr(self, "token_type_embeddings"):
            x = x + self.token_type_embeddings(types)
        return self.LayerNorm(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.pack_qkv = cfg.get("pack_qkv", True)
        if self.pack_qkv:
            self.qkv_proj = nn.Linear(h, 3 * h)
        else:
            self.q_proj = nn.Linear(h, h)
            self.k_proj = nn.Linear(h, h)
            self.v_proj = nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)

    def forward(self, x, cos, sin):
        t, h = x.shape
        d = h // self.heads
        if self.pack_qkv:
            q, k, v = self.qkv_proj(x).split(h, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (y.view(t, self.heads, d).transpose(0, 1) for y in (q, k, v))  # [heads, t, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
        return self.o_proj((probs @ v).transpose(0, 1).reshape(t, h))


class GatedMlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.inter = i
        self.up_gate_proj = nn.Linear(h, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, h)
        assert cfg["hidden_act"] == "gelu"

    def forward(self, x):
        up, gate = self.up_gate_proj(x).split(self.inter, dim=-1)
        return self.down_proj(nn.functional.gelu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg["hidden_size"]
        self.attention = Attention(cfg)
        self.mlp = GatedMlp(cfg)
        self.attn_ln = nn.LayerNorm(h, eps=cfg["layer_norm_eps"])
        self.mlp_ln = nn.LayerNorm(h, eps=cfg["layer_norm_eps"])

    def forward(self, x, cos, sin):
        x = self.attn_ln(x + self.attention(x, cos, sin))
        return self.mlp_ln(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg["num_hidden_layers"]))


class Pooler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])


class NewModel(nn.Module):
    def __init__(self, cfg, pooler):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if pooler:
            self.pooler = Pooler(cfg)

    def forward(self, ids, types):
        """One unpadded sequence: ids, types [T] -> hidden [T, H]."""
        x = self.embeddings(ids, types)
        freqs = torch.arange(len(ids)).float()[:, None] * rope_inv_freq(self.cfg)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for layer in self.encoder.layer:
            x = layer(x, cos, sin)
        return x


class NewClassifier(nn.Module):
    """`NewForSequenceClassification` (token=False) or `NewForTokenClassification`."""

    def __init__(self, cfg, token):
        super().__init__()
        self.token = token
        self.new = NewModel(cfg, pooler=not token)
        self.classifier = nn.Linear(cfg["hidden_size"], cfg["num_labels"])

    def forward(self, ids, types):
        """-> (per-token logits [T, L], sequence logits [L]) for one sequence.
        A sequence model's per-token logits skip the pooler (as BERT's)."""
        h = self.new(torch.tensor(ids), torch.tensor(types))
        tok = self.classifier(h)
        if self.token:
            return tok, tok[0]
        pooled = torch.tanh(self.new.pooler.dense(h[0]))
        return tok, self.classifier(pooled)


# --------------------------------------------------------------------------------------
# independent float64 numpy recomputation
# --------------------------------------------------------------------------------------


def numpy_forward(sd, cfg, ids, types, token):
    """The same model from the raw state dict (name -> fp32 tensor), step by step."""
    w = {k: v.double().numpy() for k, v in sd.items()}
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d = h // heads
    eps = cfg["layer_norm_eps"]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def linear(x, name, bias=True):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y

    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))
    # Frequency j (of d/2), written out again: theta^(-2j/d), NTK-scaled when factor > 1.
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {"factor": 1.0}
    f, b = float(scaling["factor"]), scaling.get("mixed_b")
    inv_freq = []
    for j in range(d // 2):
        if f <= 1.0:
            inv_freq.append(theta ** (-2 * j / d))
        elif b is None:
            inv_freq.append((theta * f) ** (-2 * j / d) * f ** (-2 / d))
        else:
            inv_freq.append(theta ** (-2 * j / d) * math.exp(-math.log(f) * ((j + 1) / (d / 2)) ** b))

    def rope(x, pos):  # x [d] for one head at one position: pairs (j, j + d/2)
        out = x.copy()
        for j in range(d // 2):
            c, s = math.cos(pos * inv_freq[j]), math.sin(pos * inv_freq[j])
            out[j] = x[j] * c - x[j + d // 2] * s
            out[j + d // 2] = x[j + d // 2] * c + x[j] * s
        return out

    t = len(ids)
    x = w["new.embeddings.word_embeddings.weight"][ids]
    if cfg["type_vocab_size"] > 0:
        x = x + w["new.embeddings.token_type_embeddings.weight"][types]
    x = layer_norm(x, "new.embeddings.LayerNorm")
    for n in range(cfg["num_hidden_layers"]):
        p = f"new.encoder.layer.{n}."
        if cfg.get("pack_qkv", True):
            qkv = linear(x, p + "attention.qkv_proj")
            q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
        else:
            q, k, v = (linear(x, p + f"attention.{m}_proj") for m in "qkv")
        ctx = np.zeros((t, h))
        for head in range(heads):
            sl = slice(head * d, (head + 1) * d)
            qh = np.stack([rope(q[i, sl], i) for i in range(t)])
            kh = np.stack([rope(k[i, sl], i) for i in range(t)])
            scores = qh @ kh.T / math.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            ctx[:, sl] = probs @ v[:, sl]
        x = layer_norm(x + linear(ctx, p + "attention.o_proj"), p + "attn_ln")
        up_gate = linear(x, p + "mlp.up_gate_proj", bias=False)
        inter = cfg["intermediate_size"]
        up, gate = up_gate[:, :inter], up_gate[:, inter:]
        x = layer_norm(x + linear(gelu(gate) * up, p + "mlp.down_proj"), p + "mlp_ln")
    tok = linear(x, "classifier")
    if token:
        return tok, tok[0]
    pooled = np.tanh(linear(x[0], "new.pooler.dense"))
    return tok, linear(pooled, "classifier")
