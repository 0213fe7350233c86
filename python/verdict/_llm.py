"""`verdict.LLM`: vLLM's offline pooling API (`classify`, `encode`, `score`)."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from verdict import _native
from verdict.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from verdict.pooling_params import PoolingParams

# vLLM `LLM` / engine keywords that tune what verdict does not have (GPU memory
# pools, CUDA graphs, parallelism, remote code, sampling): accepted, so vLLM
# scripts run unchanged, and named in one warning.
IGNORED_VLLM_KWARGS = frozenset(
    {
        "gpu_memory_utilization",
        "enforce_eager",
        "trust_remote_code",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "distributed_executor_backend",
        "seed",
        "swap_space",
        "cpu_offload_gb",
        "kv_cache_memory_bytes",
        "kv_cache_dtype",
        "block_size",
        "quantization",
        "load_format",
        "download_dir",
        "tokenizer_mode",
        "tokenizer_revision",
        "skip_tokenizer_init",
        "hf_token",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "disable_custom_all_reduce",
        "disable_log_stats",
        "max_seq_len_to_capture",
        "compilation_config",
        "structured_outputs_config",
        "logits_processors",
        "enable_lora",
        "max_lora_rank",
        "max_loras",
        "worker_cls",
        "mm_processor_kwargs",
        "override_neuron_config",
        "max_logprobs",
        "disable_async_output_proc",
    }
)

PromptInput = Union[str, Mapping[str, Any], Sequence[Any]]

# Progress bars only for calls long enough to watch.
PROGRESS_MIN_PROMPTS = 100


def _flag_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json.dumps({k: v for k, v in dataclasses.asdict(value).items() if v is not None})
    if hasattr(value, "__dict__") and not isinstance(value, (str, bytes)):
        return json.dumps({k: v for k, v in vars(value).items() if v is not None and not k.startswith("_")})
    return str(value)


class LLM:
    """A sequence-classification model loaded for offline use, with vLLM's keywords.

    `model` is a checkpoint directory or an `org/name` id in the local Hugging
    Face cache (None: verdict's bundled default model). Keywords that only tune
    vLLM's GPU engine (`gpu_memory_utilization`, `enforce_eager`,
    `trust_remote_code`, ...) are accepted and ignored with a warning.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        tokenizer: Optional[str] = None,
        revision: Optional[str] = None,
        runner: str = "auto",
        convert: str = "auto",
        hf_overrides: Optional[Dict[str, Any]] = None,
        pooler_config: Optional[Any] = None,
        max_model_len: Optional[int] = None,
        max_num_batched_tokens: Optional[int] = None,
        max_num_seqs: Optional[int] = None,
        dtype: Any = "auto",
        device: str = "auto",
        chat_template: Optional[str] = None,
        served_model_name: Optional[Union[str, List[str]]] = None,
        allowed_local_media_path: Optional[str] = None,
        allowed_media_domains: Optional[List[str]] = None,
        limit_mm_per_prompt: Optional[Dict[str, int]] = None,
        task: Optional[str] = None,
        override_pooler_config: Optional[Any] = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(k for k in kwargs if k not in IGNORED_VLLM_KWARGS)
        if unknown:
            raise TypeError(f"LLM.__init__() got an unexpected keyword argument {unknown[0]!r}")
        if callable(hf_overrides):
            raise TypeError("hf_overrides must be a dict (a callable is not supported)")
        if pooler_config is None and override_pooler_config is not None:
            pooler_config = override_pooler_config
        ignored = sorted(kwargs)
        # vLLM < 0.11 chose the runner with `task=`.
        if task not in (None, "auto"):
            if task in ("classify", "score", "reward", "token_classify"):
                runner = "pooling" if runner == "auto" else runner
            else:
                ignored.append(f"task={task!r}")
        if ignored:
            warnings.warn(
                "verdict ignores these vLLM settings, which it has no use for: " + ", ".join(ignored),
                stacklevel=2,
            )
        if not isinstance(dtype, str):
            dtype = str(dtype).replace("torch.", "")
        flags: List[str] = []

        for name, number in (
            ("max_model_len", max_model_len),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
        ):
            if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 1):
                raise ValueError(f"{name} must be a positive integer, not {number!r}")

        def add(name: str, value: Any) -> None:
            if value is not None:
                flags.extend([f"--{name.replace('_', '-')}", _flag_value(value)])

        add("model", model)
        add("tokenizer", tokenizer)
        add("revision", revision)
        add("runner", runner)
        add("convert", convert)
        add("hf_overrides", hf_overrides)
        add("pooler_config", pooler_config)
        add("max_model_len", max_model_len)
        add("max_num_batched_tokens", max_num_batched_tokens)
        add("max_num_seqs", max_num_seqs)
        add("dtype", dtype)
        add("device", device)
        add("chat_template", chat_template)
        add("limit_mm_per_prompt", limit_mm_per_prompt)
        add("allowed_local_media_path", allowed_local_media_path)
        if served_model_name is not None:
            names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
            flags.append("--served-model-name")
            flags.extend(names)
        if allowed_media_domains:
            flags.append("--allowed-media-domains")
            flags.extend(allowed_media_domains)
        self._engine = _native.Engine(flags)
        self._info: Dict[str, Any] = dict(self._engine.info())

    # ---- model facts -------------------------------------------------------

    @property
    def info(self) -> Dict[str, Any]:
        """What the loaded model is: architecture, task, num_labels, id2label, limits."""
        return dict(self._info)

    @property
    def id2label(self) -> Dict[int, str]:
        return dict(self._info["id2label"] or {})

    def __repr__(self) -> str:
        return f"LLM(model={self._info['served_model_name']!r}, architecture={self._info['architecture']!r})"

    # ---- vLLM's offline API ------------------------------------------------

    def classify(
        self,
        prompts: PromptInput,
        pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
        *,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        truncate_prompt_tokens: Optional[int] = None,
        tokenization_kwargs: Optional[Dict[str, Any]] = None,
        lora_request: Any = None,
    ) -> List[ClassificationRequestOutput]:
        """One probability vector per prompt (`outputs.probs`), in input order."""
        outputs = self._encode(
            prompts, pooling_params, "classify", use_tqdm, truncate_prompt_tokens, tokenization_kwargs, lora_request
        )
        return [ClassificationRequestOutput.from_base(o) for o in outputs]

    def encode(
        self,
        prompts: PromptInput,
        pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
        *,
        pooling_task: Optional[str] = None,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        truncate_prompt_tokens: Optional[int] = None,
        tokenization_kwargs: Optional[Dict[str, Any]] = None,
        lora_request: Any = None,
    ) -> List[PoolingRequestOutput[PoolingOutput]]:
        """Pooled data per prompt as NumPy arrays (`outputs.data`): 1-D for
        `pooling_task="classify"`, one row per token for `"token_classify"`."""
        return self._encode(
            prompts, pooling_params, pooling_task, use_tqdm, truncate_prompt_tokens, tokenization_kwargs, lora_request
        )

    def reward(
        self,
        prompts: PromptInput,
        pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
        *,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        truncate_prompt_tokens: Optional[int] = None,
        tokenization_kwargs: Optional[Dict[str, Any]] = None,
        lora_request: Any = None,
    ) -> List[PoolingRequestOutput[PoolingOutput]]:
        """Per-token rewards of a reward model (`token_classify`)."""
        return self._encode(
            prompts, pooling_params, "token_classify", use_tqdm, truncate_prompt_tokens, tokenization_kwargs, lora_request
        )

    def embed(
        self,
        prompts: PromptInput,
        pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]] = None,
        *,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        truncate_prompt_tokens: Optional[int] = None,
        tokenization_kwargs: Optional[Dict[str, Any]] = None,
        lora_request: Any = None,
    ) -> List[PoolingRequestOutput[PoolingOutput]]:
        """vLLM's `embed`: verdict serves classifiers, so this raises vLLM's
        "Embedding API is not supported by this model" error for them."""
        return self._encode(
            prompts, pooling_params, "embed", use_tqdm, truncate_prompt_tokens, tokenization_kwargs, lora_request
        )

    def score(
        self,
        data_1: Union[str, Sequence[str]],
        data_2: Union[str, Sequence[str]],
        /,
        *,
        use_tqdm: Union[bool, Callable[..., Any]] = True,
        pooling_params: Optional[PoolingParams] = None,
        truncate_prompt_tokens: Optional[int] = None,
        tokenization_kwargs: Optional[Dict[str, Any]] = None,
        lora_request: Any = None,
    ) -> List[ScoringRequestOutput]:
        """Cross-encoder scores for 1:1, 1:N or N:N (query, document) pairs
        (models with num_labels == 1)."""
        _refuse_lora(lora_request)
        queries = [data_1] if isinstance(data_1, str) else list(data_1)
        documents = [data_2] if isinstance(data_2, str) else list(data_2)
        for text in queries + documents:
            if not isinstance(text, str):
                raise ValueError(f"score inputs must be str, not {type(text).__name__}")
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise TypeError("pooling_params must be a PoolingParams")
        params = pooling_params._native("classify") if pooling_params is not None else None
        truncate, side, special = _tokenization(truncate_prompt_tokens, tokenization_kwargs, pooling_params)
        total = len(documents) if len(queries) == 1 else len(queries)
        with _Progress(use_tqdm, total) as progress:
            results = self._engine.score(
                queries,
                documents,
                params,
                truncate_prompt_tokens=truncate,
                truncation_side=side,
                add_special_tokens=special,
                progress=progress.update,
            )
        return [ScoringRequestOutput(rid, ScoringOutput(float(s)), ids) for rid, ids, s in results]

    # ---- internals ---------------------------------------------------------

    def _encode(
        self,
        prompts: PromptInput,
        pooling_params: Optional[Union[PoolingParams, Sequence[PoolingParams]]],
        task: Optional[str],
        use_tqdm: Union[bool, Callable[..., Any]],
        truncate_prompt_tokens: Optional[int],
        tokenization_kwargs: Optional[Dict[str, Any]],
        lora_request: Any,
    ) -> List[PoolingRequestOutput[PoolingOutput]]:
        _refuse_lora(lora_request)
        batch = _prompt_batch(prompts)
        task_name = task or "classify"
        single: Optional[PoolingParams] = None
        if pooling_params is None:
            params: Any = None
        elif isinstance(pooling_params, PoolingParams):
            single = pooling_params
            params = pooling_params._native(task_name)
        else:
            per_prompt = list(pooling_params)
            if not all(isinstance(p, PoolingParams) for p in per_prompt):
                raise TypeError("pooling_params must be a PoolingParams or a list of them")
            params = [p._native(task_name) for p in per_prompt]
        truncate, side, special = _tokenization(truncate_prompt_tokens, tokenization_kwargs, single)
        with _Progress(use_tqdm, len(batch)) as progress:
            results = self._engine.encode(
                batch,
                params,
                task,
                truncate_prompt_tokens=truncate,
                truncation_side=side,
                add_special_tokens=special,
                progress=progress.update,
            )
        return [
            PoolingRequestOutput(rid, PoolingOutput(np.frombuffer(data, dtype="<f4").reshape(shape)), ids)
            for rid, ids, data, shape in results
        ]


def _refuse_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise ValueError("verdict does not serve LoRA adapters (lora_request must be None)")


def _tokenization(
    truncate_prompt_tokens: Optional[int],
    tokenization_kwargs: Optional[Dict[str, Any]],
    params: Optional[PoolingParams],
) -> Tuple[Optional[int], Optional[str], Optional[bool]]:
    """(truncate_prompt_tokens, truncation_side, add_special_tokens) from the
    call's keywords, `tokenization_kwargs` (vLLM >= 0.11) or the params."""
    kwargs = dict(tokenization_kwargs or {})
    unknown = set(kwargs) - {"truncate_prompt_tokens", "truncation_side", "add_special_tokens", "max_length", "truncation"}
    if unknown:
        raise ValueError(f"unsupported tokenization_kwargs: {sorted(unknown)}")
    truncate = truncate_prompt_tokens
    if truncate is None:
        truncate = kwargs.get("truncate_prompt_tokens")
    if truncate is None and kwargs.get("truncation") and kwargs.get("max_length") is not None:
        truncate = kwargs["max_length"]
    if truncate is None and params is not None:
        truncate = params.truncate_prompt_tokens
    return (truncate, kwargs.get("truncation_side"), kwargs.get("add_special_tokens"))


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in value
    )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, Mapping) and "role" in m for m in value
    )


def _chat_prompt(messages: Any, options: Mapping[str, Any]) -> tuple:
    opts = {
        "add_generation_prompt": bool(options.get("add_generation_prompt", False)),
        "continue_final_message": bool(options.get("continue_final_message", False)),
        "chat_template_kwargs": dict(options.get("chat_template_kwargs") or {}),
    }
    return ("chat", json.dumps(list(messages)), json.dumps(opts))


def _one_prompt(prompt: Any) -> Any:
    """A prompt in the engine's form: a str, or a tagged tuple."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            types = prompt.get("token_type_ids")
            return (
                "tokens",
                [int(t) for t in ids],
                None if types is None else [int(t) for t in types],
            )
        if "messages" in prompt:
            return _chat_prompt(prompt["messages"], prompt)
        if "prompt" in prompt:
            if prompt.get("multi_modal_data"):
                raise ValueError(
                    "multi_modal_data is not supported: pass images and videos as chat "
                    'messages ({"messages": [...]} with image_url / video_url parts)'
                )
            return prompt["prompt"]
        raise ValueError(
            "a prompt dict needs 'prompt', 'prompt_token_ids' or 'messages'; got keys " + str(sorted(prompt))
        )
    if _is_token_ids(prompt):
        return ("tokens", [int(t) for t in prompt], None)
    if _is_conversation(prompt):
        return _chat_prompt(prompt, {})
    raise ValueError(
        f"a prompt must be a str, a dict (prompt / prompt_token_ids / messages), token ids or chat messages, "
        f"not {type(prompt).__name__}"
    )


def _prompt_batch(prompts: PromptInput) -> List[Any]:
    """vLLM's single-or-batch rule: one prompt, or a sequence of them."""
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if isinstance(prompts, (str, Mapping)) or _is_token_ids(prompts) or _is_conversation(prompts):
        return [_one_prompt(prompts)]
    if not isinstance(prompts, Sequence) and hasattr(prompts, "tolist"):
        prompts = prompts.tolist()  # pandas Series, pyarrow arrays
    if not isinstance(prompts, (list, tuple)):
        prompts = list(prompts)
    return [_one_prompt(p) for p in prompts]


class _Progress:
    """A progress bar for long calls: tqdm when installed (or the factory given
    as `use_tqdm`), else a line on a terminal's stderr."""

    def __init__(self, use_tqdm: Union[bool, Callable[..., Any]], total: int) -> None:
        self._bar: Any = None
        self._plain = False
        self._done = 0
        self._total = total
        if not use_tqdm or total < PROGRESS_MIN_PROMPTS:
            return
        if callable(use_tqdm):
            self._bar = use_tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._plain = sys.stderr.isatty()
            return
        self._bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)

    def update(self, done: int) -> None:
        step = done - self._done
        self._done = done
        if self._bar is not None:
            self._bar.update(step)
        elif self._plain:
            sys.stderr.write(f"\rProcessed prompts: {done}/{self._total}")
            sys.stderr.flush()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._plain and self._done:
            sys.stderr.write("\n")
