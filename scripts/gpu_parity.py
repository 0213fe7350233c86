#!/usr/bin/env python3
"""GPU parity: every fixture through the verdict binary on CUDA, against the
committed transformers references (fp32 within 1e-4, bf16 within 1e-2), and
every LoRA adapter under fixtures/lora/ on its base (`classify --lora`) against
PEFT's (fp32 within 1e-4; bf16 for information).
Standard library only, so it runs on the GPU machine as it is.

  python3 scripts/gpu_parity.py target-cuda/release/verdict
  VERDICT_PARITY_DEVICE=cpu python3 scripts/gpu_parity.py target/release/verdict
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
# VERDICT_PARITY_DEVICE=cpu runs the same table with the CPU binary (to check this script).
DEVICE = os.environ.get("VERDICT_PARITY_DEVICE", "cuda")
# A regular expression: only the rows whose name (as printed) it matches run.
ONLY = re.compile(os.environ.get("VERDICT_PARITY_ONLY", ""))
# bf16 is held to 1e-2 on the fixtures the CPU bf16 test holds (tests/parity.rs); the
# others have hidden sizes of 4 or 8, where one bf16 rounding can move a probability
# by more, so their bf16 gaps are shown for information ("info").
BF16_GATED = {"bert-cls", "qwen2-cls", "gpt2-cls"}


def has_ffmpeg():
    return bool(os.environ.get("VERDICT_FFMPEG") or shutil.which("ffmpeg")
                or (pathlib.Path.home() / ".cache/verdict/ffmpeg").exists())


def run_fixture(binary, fixture, dtype, lora=None):
    ref = json.loads(((lora or fixture) / "reference.json").read_text())
    if not has_ffmpeg():
        # Video needs an ffmpeg binary; without one only the other cases run.
        ref["cases"] = [c for c in ref["cases"] if "video_url" not in json.dumps(c.get("messages"))]
    args = [binary, "classify", "--model", str(fixture), "--device", DEVICE, "--dtype", dtype,
            "--format", "jsonl", "--no-progress", "--log-level", "warn"]
    ea = ref["engine_args"]
    if ea.get("convert"):
        args += ["--convert", ea["convert"]]
    if ea.get("hf_overrides"):
        args += ["--hf-overrides", json.dumps(ea["hf_overrides"])]
    if ea.get("pooler_config"):
        args += ["--pooler-config", json.dumps(ea["pooler_config"])]
    if lora is not None:
        args += ["--lora", str(lora)]
    media = fixture / "media"
    if media.is_dir():
        args += ["--allowed-local-media-path", str(media)]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for case in ref["cases"]:
            if case.get("messages") and media.is_dir():
                # Multimodal cases: the conversation, with media:<file> as local files.
                text = json.dumps(case["messages"]).replace("media:", f"file://{media}/")
                line = {"messages": json.loads(text),
                        "add_generation_prompt": case.get("add_generation_prompt", False)}
            else:
                line = {"prompt_token_ids": case["input_ids"]}
            if case.get("token_type_ids"):
                line["token_type_ids"] = case["token_type_ids"]
            f.write(json.dumps(line) + "\n")
        path = f.name
    out = subprocess.run(args + ["--input", path], capture_output=True, text=True)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1:] or ["failed"]
    worst = 0.0
    for line, case in zip(out.stdout.splitlines(), ref["cases"]):
        got = json.loads(line)
        if "error" in got:
            return None, [got["error"]["message"]]
        worst = max(worst, gap(got, case))
    return worst, []


def gap(got, case):
    """Largest difference between a `classify` output line and its reference case
    (infinite when the shapes differ)."""
    if "probs" in got:
        want = case["probs"]
    elif "sequence_reward" in case:  # a reward model's rows are raw rewards
        want = case["token_logits"]
    else:  # the rows a token or STEP pooler returns
        want = case["step_probs"] if "step_probs" in case else case["token_probs"]
    have, want = flatten(got.get("probs") or got.get("data") or []), flatten(want)
    if len(have) != len(want):
        return float("inf")
    return max([0.0] + [abs(a - b) for a, b in zip(have, want)])


def flatten(values):
    return [x for v in values for x in (flatten(v) if isinstance(v, list) else [v])]


def lora_mixed(binary, base, adapters):
    """The base model's cases and every adapter's, one `classify` run (shared batches),
    lines picking adapters by `model`: the worst gap to the references, and to the
    same lines run alone (each adapter on its own)."""
    base_ref = json.loads((base / "reference.json").read_text())
    runs = [(None, base_ref)] + [(a.name, json.loads((a / "reference.json").read_text())) for a in adapters]
    args = [binary, "classify", "--model", str(base), "--device", DEVICE, "--dtype", "float32",
            "--format", "jsonl", "--no-progress", "--log-level", "warn", "--enable-lora",
            "--max-loras", str(len(adapters)), "--lora-modules"] + [f"{a.name}={a}" for a in adapters]
    lines, cases = [], []
    for name, ref in runs:
        for case in ref["cases"]:
            line = {"prompt_token_ids": case["input_ids"]}
            if case.get("token_type_ids"):
                line["token_type_ids"] = case["token_type_ids"]
            if name:
                line["model"] = name
            lines.append(json.dumps(line))
            cases.append(case)
    out = subprocess.run(args + ["--input", "-"], input="\n".join(lines) + "\n", capture_output=True, text=True)
    if out.returncode != 0:
        return None, None, out.stderr.strip().splitlines()[-1:] or ["failed"]
    mixed = [json.loads(l) for l in out.stdout.splitlines()]
    if any("error" in m for m in mixed):
        return None, None, [next(m for m in mixed if "error" in m)["error"]["message"]]
    worst = max(gap(m, c) for m, c in zip(mixed, cases))
    alone_gap = 0.0
    for i, line in enumerate(lines):
        one = subprocess.run(args + ["--input", "-"], input=line + "\n", capture_output=True, text=True)
        got = json.loads(one.stdout.splitlines()[0])
        if "error" in got:
            return None, None, [got["error"]["message"]]
        a = got.get("probs") or sum(got["data"], [])
        b = mixed[i].get("probs") or sum(mixed[i]["data"], [])
        alone_gap = max(alone_gap, max(abs(x - y) for x, y in zip(a, b)))
    return worst, alone_gap, []


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target-cuda/release/verdict")
    failures = 0
    print(f"{'fixture':<22} {'float32 max|dp|':>16} {'bfloat16 max|dp|':>17}")
    for fixture in sorted((ROOT / "fixtures/models").iterdir()):
        if not ONLY.search(fixture.name):
            continue
        cells = []
        for dtype, tol in TOLERANCE.items():
            worst, err = run_fixture(binary, fixture, dtype)
            if worst is None:
                failures += 1
                cells.append(f"ERROR {err[0][:40]}")
            else:
                ok = worst <= tol
                gated = dtype == "float32" or fixture.name in BF16_GATED
                failures += 0 if ok or not gated else 1
                cells.append(f"{worst:.2e} {'ok' if ok else ('FAIL' if gated else 'info')}")
        print(f"{fixture.name:<22} {cells[0]:>16} {cells[1]:>17}")
    for adapter in sorted((ROOT / "fixtures/lora").iterdir()):
        if not ONLY.search("lora/" + adapter.name):
            continue
        base = ROOT / "fixtures/models" / json.loads((adapter / "reference.json").read_text())["base"]
        cells = []
        for dtype, tol in TOLERANCE.items():
            worst, err = run_fixture(binary, base, dtype, lora=adapter)
            if worst is None:
                failures += 1
                cells.append(f"ERROR {err[0][:40]}")
            else:
                ok = worst <= tol
                failures += 0 if ok or dtype != "float32" else 1
                cells.append(f"{worst:.2e} {'ok' if ok else ('FAIL' if dtype == 'float32' else 'info')}")
        print(f"{'lora/' + adapter.name:<22} {cells[0]:>16} {cells[1]:>17}")
    bases = {}
    for adapter in sorted((ROOT / "fixtures/lora").iterdir()):
        base = json.loads((adapter / "reference.json").read_text())["base"]
        bases.setdefault(base, []).append(adapter)
    print(f"{'mixed batch (fp32)':<22} {'max|dp|':>16} {'alone vs mixed':>17}")
    for base, adapters in sorted(bases.items()):
        if not ONLY.search("lora-mix/" + base):
            continue
        worst, alone, err = lora_mixed(binary, ROOT / "fixtures/models" / base, adapters)
        if worst is None:
            failures += 1
            print(f"{'lora-mix/' + base:<22} ERROR {err[0][:60]}")
            continue
        ok = worst <= TOLERANCE["float32"] and alone <= 1e-5
        failures += 0 if ok else 1
        print(f"{'lora-mix/' + base:<22} {worst:>16.2e} {alone:>17.2e} {'ok' if ok else 'FAIL'}")
    print(f"{'all within tolerance' if failures == 0 else f'{failures} failures'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
