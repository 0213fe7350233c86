#!/usr/bin/env python3
"""Re-check fixtures/models/*/reference.json with a NEWER transformers (>= 4.51, which has Qwen3).

make_fixtures.py runs on transformers 4.46.3 (the newest that works with Debian's torch 1.13) and
has to use an in-script port for Qwen3.  This script loads every fixture with the real classes of
a newer transformers release and checks that logits / token_logits match the stored references.

transformers >= 4.48 no longer imports cleanly on torch 1.13; a few attributes it touches at
import time (torch.distributed.tensor, torch.compiler, float8/uint dtypes) are stubbed below.
None of them is used by the eager CPU forward pass of these models.

    REFENV_NEW=/opt/refenv-tf451 scripts/setup-refenv.sh   # optional second venv
    /opt/refenv-tf451/bin/python scripts/crosscheck_fixtures.py [fixture ...]
"""

import json
import sys
import types
from pathlib import Path

import torch

# ---- stubs for torch 1.13 ------------------------------------------------------------
if not hasattr(torch, "compiler"):
    _comp = types.ModuleType("torch.compiler")
    _comp.is_compiling = lambda: False
    _comp.disable = lambda fn=None, recursive=True: fn if fn is not None else (lambda f: f)
    torch.compiler = _comp
    sys.modules["torch.compiler"] = _comp
try:
    import torch.distributed.tensor  # noqa: F401
except ImportError:
    import torch.distributed

    _dt = types.ModuleType("torch.distributed.tensor")

    class DTensor:  # never instantiated
        pass

    _dt.DTensor = DTensor
    torch.distributed.tensor = _dt
    sys.modules["torch.distributed.tensor"] = _dt
for _n in ["float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"]:
    if not hasattr(torch, _n):
        setattr(torch, _n, torch.float32)  # only used as keys of dtype tables
try:
    torch.nn.Linear(1, 1).named_parameters(remove_duplicate=False)
except TypeError:  # torch < 2.0
    _orig_named_parameters = torch.nn.Module.named_parameters

    def _named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        if remove_duplicate:
            yield from _orig_named_parameters(self, prefix=prefix, recurse=recurse)
            return
        mods = self.named_modules(prefix=prefix, remove_duplicate=False) if recurse else [(prefix, self)]
        for mp, m in mods:
            for k, v in m._parameters.items():
                if v is not None:
                    yield (f"{mp}.{k}" if mp else k), v

    torch.nn.Module.named_parameters = _named_parameters
# --------------------------------------------------------------------------------------

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODDIR = ROOT / "fixtures" / "models"
TOL = 2e-5

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()


def load(cls_name, d):
    # from_pretrained of transformers >= 4.48 needs torch 2 (load_state_dict(assign=...)): load by hand.
    cls = getattr(transformers, cls_name)
    config = AutoConfig.from_pretrained(str(d))
    config._attn_implementation = "eager"
    model = cls(config)
    sd = {k: v.to(torch.float32) for k, v in load_file(str(d / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = config.tie_word_embeddings and hasattr(model, "lm_head")
    assert set(missing) <= ({"lm_head.weight"} if tied else set()) and not unexpected, (missing, unexpected)
    if tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model.eval()


def head_fn(name, ref, d):
    arch = ref["architecture"]
    ov = (ref["engine_args"] or {}).get("hf_overrides") or {}
    if "classifier_from_token" in ov:
        tok = AutoTokenizer.from_pretrained(str(d))
        ids = [tok.convert_tokens_to_ids(t) for t in ov["classifier_from_token"]]
        model = load(arch, d)

        def f(x):
            lm = model(input_ids=x).logits[0]
            if ov["method"] == "from_2_way_softmax":
                return (lm[:, ids[1]] - lm[:, ids[0]]).unsqueeze(-1), None
            return lm[:, ids], None
        return f
    if arch.endswith("ForCausalLM"):  # converted checkpoint that carries score.weight
        arch = arch.replace("ForCausalLM", "ForSequenceClassification")
    model = load(arch, d)
    if arch.startswith(("Bert", "Ernie")):
        base = model.bert if arch.startswith("Bert") else model.ernie

        def f(x, tt):
            out = base(input_ids=x, token_type_ids=tt)
            return model.classifier(out.last_hidden_state)[0], model.classifier(out.pooler_output)[0]
        return f
    if arch.startswith(("Roberta", "XLMRoberta")):
        def f(x, tt):
            h = model.roberta(input_ids=x, token_type_ids=tt).last_hidden_state
            c = model.classifier
            return c.out_proj(torch.tanh(c.dense(h)))[0], model(input_ids=x, token_type_ids=tt).logits[0]
        return f

    def f(x):
        h = (model.transformer if arch.startswith("GPT2") else model.model)(input_ids=x).last_hidden_state
        return model.score(h)[0], model(input_ids=x).logits[0]
    return f


def check(name):
    d = MODDIR / name
    ref = json.loads((d / "reference.json").read_text())
    arch = ref["architecture"]
    if not hasattr(transformers, arch):
        print(f"{name:20s} {arch:38s} SKIPPED (not in transformers {transformers.__version__})")
        return True
    f = head_fn(name, ref, d)
    worst = 0.0
    for c in ref["cases"]:
        x = torch.tensor([c["input_ids"]])
        with torch.no_grad():
            if c.get("token_type_ids") is not None:
                tok, seq = f(x, torch.tensor([c["token_type_ids"]]))
            else:
                tok, seq = f(x)
        if seq is None:
            seq = tok[-1]
        worst = max(worst, (seq - torch.tensor(c["logits"])).abs().max().item())
        if "token_logits" in c:
            worst = max(worst, (tok - torch.tensor(c["token_logits"])).abs().max().item())
    status = "OK" if worst <= TOL else "MISMATCH"
    print(f"{name:20s} {ref['architecture']:38s} max|diff|={worst:.2e} {status}")
    return worst <= TOL


def main():
    names = sys.argv[1:] or sorted(p.name for p in MODDIR.iterdir())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ok = all([check(n) for n in names])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
