"""The engine's errors reach Python as the exceptions vLLM raises, with the
engine's (vLLM's) messages; vLLM-only keywords are accepted with one warning."""

import warnings

import pytest

from conftest import fixture_dir
from verdict import LLM, PoolingParams


@pytest.fixture(scope="module")
def qwen():
    return LLM(str(fixture_dir("qwen2-cls")), max_model_len=512)


def test_no_prompts(qwen):
    with pytest.raises(ValueError, match="^You must pass at least one prompt$"):
        qwen.classify([])


def test_too_long_prompt(qwen):
    with pytest.raises(ValueError) as err:
        qwen.classify(["hello " * 600, "fine"])
    assert str(err.value).startswith("This model's maximum context length is 512 tokens.")


def test_truncation_keeps_a_long_prompt(qwen):
    (out,) = qwen.classify("hello " * 600, truncate_prompt_tokens=5)
    assert len(out.prompt_token_ids) == 5
    (same,) = qwen.classify("hello " * 600, tokenization_kwargs={"truncate_prompt_tokens": 5})
    assert same.outputs.probs == out.outputs.probs
    (left,) = qwen.classify(
        "hello " * 600 + "world", tokenization_kwargs={"truncate_prompt_tokens": 3, "truncation_side": "left"}
    )
    assert len(left.prompt_token_ids) == 3


def test_empty_prompt(qwen):
    with pytest.raises(ValueError, match="cannot be empty"):
        qwen.classify("")


def test_params_length(qwen):
    with pytest.raises(ValueError, match=r"^The lengths of prompts \(2\) and params \(1\) must be the same\.$"):
        qwen.classify(["a", "b"], [PoolingParams()])


def test_encode_needs_a_task(qwen):
    with pytest.raises(ValueError) as err:
        qwen.encode("hi")
    assert str(err.value).startswith("pooling_task required for `LLM.encode`.")


def test_embedding_is_refused(qwen):
    for call in (lambda: qwen.encode("hi", pooling_task="embed"), lambda: qwen.embed("hi")):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == (
            "Embedding API is not supported by this model. Try converting the model using `--convert embed`."
        )


def test_unknown_task(qwen):
    with pytest.raises(ValueError, match="^Unsupported task: 'sing'"):
        qwen.encode("hi", pooling_task="sing")


def test_dimensions_refused(qwen):
    with pytest.raises(ValueError) as err:
        qwen.classify("hi", PoolingParams(dimensions=8))
    assert str(err.value) == (
        "Task 'classify' only supports ['use_activation'] parameters, does not support ['dimensions'] parameters"
    )


def test_score_needs_one_label(qwen):
    with pytest.raises(ValueError, match=r"^Scoring API is only enabled for num_labels == 1\.$"):
        qwen.score("a", "b")


def test_score_pairing():
    llm = LLM(str(fixture_dir("xlmr-rerank")))
    with pytest.raises(ValueError, match=r"^Input lengths must be either 1:1, 1:N or N:N$"):
        llm.score(["a", "b"], ["c", "d", "e"])


def test_token_ids_out_of_vocabulary(qwen):
    with pytest.raises(ValueError, match="out of vocabulary|vocab"):
        qwen.classify({"prompt_token_ids": [10**9]})


def test_bad_prompt_types(qwen):
    with pytest.raises(ValueError, match="a prompt must be"):
        qwen.classify([3.5])
    with pytest.raises(ValueError, match="needs 'prompt', 'prompt_token_ids' or 'messages'"):
        qwen.classify({"text": "hi"})


def test_lora_refused(qwen):
    with pytest.raises(ValueError, match="LoRA"):
        qwen.classify("hi", lora_request=object())


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "nowhere"))


def test_bad_engine_settings():
    with pytest.raises(ValueError) as err:
        LLM(str(fixture_dir("qwen2-cls")), dtype="float8")
    assert str(err.value).startswith("invalid value 'float8' for '--dtype <DTYPE>' [possible values: auto, float32")
    assert "--help" not in str(err.value)
    with pytest.raises(ValueError, match="^--hf-overrides is not valid JSON"):
        LLM(str(fixture_dir("qwen2-cls")), hf_overrides="{bad")
    with pytest.raises(ValueError, match="^max_model_len must be a positive integer, not -3$"):
        LLM(str(fixture_dir("qwen2-cls")), max_model_len=-3)


def test_generate_runner_refused():
    with pytest.raises(RuntimeError, match="pooling models only"):
        LLM(str(fixture_dir("qwen2-cls")), runner="generate")


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'modle'"):
        LLM(str(fixture_dir("qwen2-cls")), modle="x")


def test_vllm_keywords_warn_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llm = LLM(
            str(fixture_dir("qwen2-cls")),
            runner="pooling",
            gpu_memory_utilization=0.9,
            enforce_eager=True,
            trust_remote_code=True,
            tensor_parallel_size=1,
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for name in ("enforce_eager", "gpu_memory_utilization", "tensor_parallel_size", "trust_remote_code"):
        assert name in messages[0]
    assert llm.classify("hi")[0].outputs.num_classes == 2


def test_old_task_keyword_selects_pooling():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = LLM(str(fixture_dir("qwen2-cls")), task="classify")
    assert llm.info["task"] == "classify"


def test_pooler_config_and_hf_overrides():
    # token_classify through pooler_config, as vLLM's PoolerConfig(task=...) does.
    llm = LLM(str(fixture_dir("qwen2-cls")), pooler_config={"task": "token_classify"})
    (out,) = llm.encode("Hello world", pooling_task="token_classify")
    assert out.outputs.data.shape == (2, 2)
    # hf_overrides reaches the config: three labels named as given.
    llm = LLM(
        str(fixture_dir("gpt2-lm-tokens")),
        convert="classify",
        hf_overrides={"classifier_from_token": ["Ġyes", "Ġno", "Ġmaybe"], "method": "no_post_processing"},
    )
    assert llm.info["num_labels"] == 3
