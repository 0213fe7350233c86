"""Outputs shaped like vLLM's (`vllm.outputs`): the same classes, fields and reprs,
with NumPy arrays where vLLM has torch tensors."""

from __future__ import annotations

from typing import Generic, List, TypeVar

import numpy as np

T = TypeVar("T")


class PoolingOutput:
    """The pooled data of one prompt: a 1-D array (`classify`) or one row per
    token (`token_classify`)."""

    __slots__ = ("data",)

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"PoolingOutput(data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolingOutput) and bool(np.array_equal(self.data, other.data))


class ClassificationOutput:
    """The probability vector of one prompt (raw logits with `use_activation=False`)."""

    __slots__ = ("probs",)

    def __init__(self, probs: List[float]) -> None:
        self.probs = probs

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> "ClassificationOutput":
        data = pooling_output.data
        if data.ndim != 1:
            raise ValueError("pooled_data should be a 1-D probability vector")
        return ClassificationOutput(data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)

    def __repr__(self) -> str:
        return f"ClassificationOutput(num_classes={self.num_classes})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassificationOutput) and self.probs == other.probs


class ScoringOutput:
    """The relevance score of one (query, document) pair."""

    __slots__ = ("score",)

    def __init__(self, score: float) -> None:
        self.score = score

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> "ScoringOutput":
        data = pooling_output.data
        if data.ndim != 1 or data.shape[0] != 1:
            raise ValueError("pooled_data should be a scalar score")
        return ScoringOutput(float(data[0]))

    def __repr__(self) -> str:
        return f"ScoringOutput(score={self.score})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScoringOutput) and self.score == other.score


class PoolingRequestOutput(Generic[T]):
    """One prompt's result: vLLM's `PoolingRequestOutput`."""

    __slots__ = ("request_id", "outputs", "prompt_token_ids", "num_cached_tokens", "finished")

    def __init__(
        self,
        request_id: str,
        outputs: T,
        prompt_token_ids: List[int],
        finished: bool = True,
        num_cached_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.outputs = outputs
        self.prompt_token_ids = prompt_token_ids
        # verdict has no prefix cache.
        self.num_cached_tokens = num_cached_tokens
        self.finished = finished

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(request_id={self.request_id!r}, "
            f"outputs={self.outputs!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"num_cached_tokens={self.num_cached_tokens}, "
            f"finished={self.finished})"
        )


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    """`LLM.classify`'s result for one prompt."""

    __slots__ = ()

    @staticmethod
    def from_base(request_output: PoolingRequestOutput[PoolingOutput]) -> "ClassificationRequestOutput":
        return ClassificationRequestOutput(
            request_output.request_id,
            ClassificationOutput.from_base(request_output.outputs),
            request_output.prompt_token_ids,
            request_output.finished,
        )


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    """`LLM.score`'s result for one pair."""

    __slots__ = ()

