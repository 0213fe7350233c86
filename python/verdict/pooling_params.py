"""vLLM's `PoolingParams`: per-request pooling settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class PoolingParams:
    """Per-prompt pooling parameters, with vLLM's names.

    use_activation: apply the model's activation (softmax / sigmoid); None keeps
        the model's default (`pooler_config`), False returns raw logits.
    truncate_prompt_tokens: keep only this many tokens of each prompt (-1: the
        model's max_model_len).
    step_tag_id, returned_token_ids: STEP pooling (process reward models) only.
    dimensions, normalize: embedding-only; refused for classifiers, as vLLM does.
    """

    truncate_prompt_tokens: Optional[int] = None
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None
    step_tag_id: Optional[int] = None
    returned_token_ids: Optional[List[int]] = None
    task: Optional[str] = None
    requires_token_ids: bool = False
    extra_kwargs: Optional[Dict[str, Any]] = field(default=None, repr=False)
    # Scoring: cut queries / documents to this many tokens first (0: off).
    max_tokens_per_query: int = 0
    max_tokens_per_doc: int = 0

    def clone(self) -> "PoolingParams":
        return PoolingParams(**{k: getattr(self, k) for k in self.__dataclass_fields__})

    def _native(self, task: str) -> Tuple[Any, ...]:
        """The tuple the engine takes; refuses parameters the task does not have."""
        if self.normalize is not None:
            raise ValueError(
                f"Task '{task}' only supports ['use_activation'] parameters, "
                "does not support ['normalize'] parameters"
            )
        return (
            self.use_activation,
            self.dimensions,
            self.step_tag_id,
            None if self.returned_token_ids is None else list(self.returned_token_ids),
            int(self.max_tokens_per_query),
            int(self.max_tokens_per_doc),
        )
