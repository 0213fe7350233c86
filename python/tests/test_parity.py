"""LLM.classify / encode / score against transformers' reference outputs of the
fixtures (fp32, CPU, within 1e-4): each prompt form vLLM takes (text, token ids,
chat messages, text pairs), probabilities, raw logits and per-token rows."""

import numpy as np
import pytest

from conftest import ATOL, assert_close, fixture_dir, fixture_kwargs, load_reference
from verdict import LLM, PoolingParams

CLASSIFIERS = ["bert-cls", "qwen2-cls", "qwen3-cls", "gpt2-lm-tokens", "xlmr-rerank", "llama-cls"]


def case_prompt(case):
    """A reference case as a vLLM prompt."""
    if case["kind"] == "text":
        return case["text"]
    if case["kind"] == "chat":
        return {
            "messages": case["messages"],
            "add_generation_prompt": case.get("add_generation_prompt", False),
            "continue_final_message": case.get("continue_final_message", False),
        }
    if case["kind"] == "pair":
        # The reference's own pair encoding, as a token-id prompt.
        prompt = {"prompt_token_ids": case["input_ids"]}
        if case.get("token_type_ids") is not None:
            prompt["token_type_ids"] = case["token_type_ids"]
        return prompt
    raise AssertionError(f"unknown case kind {case['kind']}")


@pytest.fixture(scope="module", params=CLASSIFIERS)
def classifier(request):
    name = request.param
    reference = load_reference(fixture_dir(name))
    return name, reference, LLM(str(fixture_dir(name)), **fixture_kwargs(name))


def test_classify_matches_transformers(classifier):
    name, reference, llm = classifier
    cases = reference["cases"]
    outputs = llm.classify([case_prompt(c) for c in cases], use_tqdm=False)
    assert len(outputs) == len(cases)
    for out, case in zip(outputs, cases):
        what = f"{name}/{case['name']}"
        assert out.prompt_token_ids == case["input_ids"], what
        assert out.outputs.num_classes == reference["num_labels"]
        assert_close(what, out.outputs.probs, case["probs"])
        assert out.finished is True


def test_each_prompt_alone_matches(classifier):
    name, reference, llm = classifier
    for case in reference["cases"]:
        (out,) = llm.classify(case_prompt(case), use_tqdm=False)
        assert_close(f"{name}/{case['name']} alone", out.outputs.probs, case["probs"])


def test_raw_logits_without_activation(classifier):
    name, reference, llm = classifier
    cases = reference["cases"]
    raw = PoolingParams(use_activation=False)
    outputs = llm.encode([case_prompt(c) for c in cases], raw, pooling_task="classify", use_tqdm=False)
    for out, case in zip(outputs, cases):
        data = out.outputs.data
        assert isinstance(data, np.ndarray) and data.dtype == np.float32 and data.shape == (reference["num_labels"],)
        assert_close(f"{name}/{case['name']} logits", data, case["logits"])
    # Per-prompt params: raw for the first prompt, activated for the rest.
    per_prompt = [raw] + [PoolingParams()] * (len(cases) - 1)
    outputs = llm.classify([case_prompt(c) for c in cases], per_prompt, use_tqdm=False)
    assert_close(f"{name} per-prompt raw", outputs[0].outputs.probs, cases[0]["logits"])
    assert_close(f"{name} per-prompt probs", outputs[1].outputs.probs, cases[1]["probs"])


def test_id2label(classifier):
    name, reference, llm = classifier
    want = {int(k): v for k, v in (reference["id2label"] or {}).items()}
    assert llm.id2label == want
    assert llm.info["num_labels"] == reference["num_labels"]


@pytest.mark.parametrize("name", ["xlmr-rerank", "distilbert-rerank", "qwen3-reranker"])
def test_score_matches_transformers(name):
    reference = load_reference(fixture_dir(name))
    llm = LLM(str(fixture_dir(name)), **fixture_kwargs(name))
    pairs = [c for c in reference["cases"] if c["kind"] == "pair"]
    assert pairs, name
    queries = [c["text"] for c in pairs]
    documents = [c["text_pair"] for c in pairs]
    # N:N
    outputs = llm.score(queries, documents, use_tqdm=False)
    for out, case in zip(outputs, pairs):
        assert out.prompt_token_ids == case["input_ids"], f"{name}/{case['name']} ids"
        assert isinstance(out.outputs.score, float)
        assert abs(out.outputs.score - case["probs"][0]) <= ATOL, f"{name}/{case['name']}"
    # 1:1 with strings, and 1:N
    (one,) = llm.score(queries[0], documents[0])
    assert abs(one.outputs.score - pairs[0]["probs"][0]) <= ATOL
    fanned = llm.score(queries[0], documents)
    assert len(fanned) == len(documents)
    assert abs(fanned[0].outputs.score - pairs[0]["probs"][0]) <= ATOL
    # raw logits
    (raw,) = llm.score(queries[0], documents[0], pooling_params=PoolingParams(use_activation=False))
    assert abs(raw.outputs.score - pairs[0]["logits"][0]) <= ATOL


@pytest.mark.parametrize("name", ["distilbert-tokens", "gte-tokens"])
def test_token_classify_rows(name):
    reference = load_reference(fixture_dir(name))
    llm = LLM(str(fixture_dir(name)), **fixture_kwargs(name))
    cases = [c for c in reference["cases"] if c.get("token_probs") is not None]
    outputs = llm.encode([case_prompt(c) for c in cases], pooling_task="token_classify", use_tqdm=False)
    raw = llm.encode(
        [case_prompt(c) for c in cases],
        PoolingParams(use_activation=False),
        pooling_task="token_classify",
        use_tqdm=False,
    )
    for out, logits, case in zip(outputs, raw, cases):
        data = out.outputs.data
        assert data.dtype == np.float32
        assert data.shape == (len(case["input_ids"]), reference["num_labels"])
        np.testing.assert_allclose(data, np.asarray(case["token_probs"], dtype=np.float32), atol=ATOL)
        np.testing.assert_allclose(logits.outputs.data, np.asarray(case["token_logits"], dtype=np.float32), atol=ATOL)


def test_default_model_matches_transformers(default_model):
    """The bundled MiniLM sentiment model (real weights) against transformers."""
    from conftest import REPO

    reference = load_reference(REPO / "assets" / "default-model")
    llm = LLM(device="cpu")
    assert llm.info["served_model_name"] == "verdict/minilm-l6-sentiment"
    cases = reference["cases"]
    outputs = llm.classify([case_prompt(c) for c in cases], use_tqdm=False)
    for out, case in zip(outputs, cases):
        assert out.prompt_token_ids == case["input_ids"], case["name"]
        assert_close(f"default-model/{case['name']}", out.outputs.probs, case["probs"])
    # The README's two sentences come out the right way round.
    good, bad = llm.classify(["Loved the new café—coffee was great.", "This update broke everything. Frustrating."])
    positive = [i for i, label in llm.id2label.items() if label == "positive"][0]
    assert good.outputs.probs[positive] > 0.9
    assert bad.outputs.probs[positive] < 0.1


def test_reward_model_rewards():
    """LLM.reward on a Qwen2 reward model: one raw reward per token (vLLM's
    default for it), the last row the sequence reward; sigmoid on request."""
    reference = load_reference(fixture_dir("qwen2-rm"))
    llm = LLM(str(fixture_dir("qwen2-rm")), device="cpu")
    cases = reference["cases"]
    outputs = llm.reward([c["text"] for c in cases], use_tqdm=False)
    activated = llm.reward([c["text"] for c in cases], PoolingParams(use_activation=True), use_tqdm=False)
    for out, act, case in zip(outputs, activated, cases):
        assert out.prompt_token_ids == case["input_ids"]
        np.testing.assert_allclose(out.outputs.data, np.asarray(case["token_logits"], dtype=np.float32), atol=ATOL)
        np.testing.assert_allclose(act.outputs.data, np.asarray(case["token_probs"], dtype=np.float32), atol=ATOL)
        assert abs(float(out.outputs.data[-1, 0]) - case["sequence_reward"]) <= ATOL
