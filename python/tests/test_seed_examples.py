"""The seed page's offline examples ("Classification Usages", LLM.classify and
LLM.encode), verbatim but for `from vllm import LLM` -> `from verdict import LLM`.
The page's model id resolves, through the Hugging Face cache, to the qwen2-cls
fixture (a Qwen2 classifier labelled Default/Spoiled, like the page's model)."""

import ast
import re
import subprocess
import sys

import numpy as np
from conftest import ATOL

CLASSIFY_EXAMPLE = '''\
from verdict import LLM
llm = LLM(model="jason9693/Qwen2.5-1.5B-apeach", runner="pooling")
(output,) = llm.classify("Hello, my name is")
probs = output.outputs.probs
print(f"Class Probabilities: {probs!r} (size={len(probs)})")
'''

ENCODE_EXAMPLE = '''\
from verdict import LLM
llm = LLM(model="jason9693/Qwen2.5-1.5B-apeach", runner="pooling")
(output,) = llm.encode("Hello, my name is", pooling_task="classify")
data = output.outputs.data
print(f"Data: {data!r}")
'''


def run_example(code: str, env) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def reference_probs(seed_env):
    """The same prompt through the fixture directory itself (not the cache id)."""
    from verdict import LLM

    from conftest import fixture_dir

    llm = LLM(str(fixture_dir("qwen2-cls")), runner="pooling")
    return llm.classify("Hello, my name is")[0].outputs.probs


def test_classify_example(seed_env):
    out = run_example(CLASSIFY_EXAMPLE, seed_env)
    match = re.fullmatch(r"Class Probabilities: (\[.*\]) \(size=2\)\n", out)
    assert match, out
    probs = ast.literal_eval(match.group(1))
    assert all(isinstance(p, float) for p in probs)
    assert abs(sum(probs) - 1.0) < 1e-5
    np.testing.assert_allclose(probs, reference_probs(seed_env), atol=ATOL)


def test_encode_example(seed_env):
    out = run_example(ENCODE_EXAMPLE, seed_env)
    match = re.fullmatch(r"Data: array\(\[(.*)\], dtype=float32\)\n", out)
    assert match, out
    data = [float(x) for x in match.group(1).split(",")]
    np.testing.assert_allclose(data, reference_probs(seed_env), atol=ATOL)


def test_examples_fail_clearly_without_the_model(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CLASSIFY_EXAMPLE], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "FileNotFoundError: model jason9693/Qwen2.5-1.5B-apeach (revision main) is not in the Hugging Face cache" in done.stderr
