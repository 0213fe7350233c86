"""The Rust engine behind `verdict` (PyO3). Use `verdict.LLM`; this is its backend."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__version__: str

ParamsTuple = Tuple[Optional[bool], Optional[int], Optional[int], Optional[List[int]], int, int]
Prompt = Union[str, Tuple[str, Any, Any]]

class Engine:
    def __init__(self, flags: List[str]) -> None: ...
    def info(self) -> Dict[str, Any]: ...
    def encode(
        self,
        prompts: Sequence[Prompt],
        params: Optional[Union[ParamsTuple, List[ParamsTuple]]],
        task: Optional[str],
        truncate_prompt_tokens: Optional[int] = None,
        truncation_side: Optional[str] = None,
        add_special_tokens: Optional[bool] = None,
        progress: Optional[Callable[[int], Any]] = None,
    ) -> List[Tuple[str, List[int], bytes, Tuple[int, ...]]]: ...
    def score(
        self,
        data_1: List[str],
        data_2: List[str],
        params: Optional[ParamsTuple] = None,
        truncate_prompt_tokens: Optional[int] = None,
        truncation_side: Optional[str] = None,
        add_special_tokens: Optional[bool] = None,
        progress: Optional[Callable[[int], Any]] = None,
    ) -> List[Tuple[str, List[int], float]]: ...

def run_cli(argv: List[str]) -> int: ...
def interpreter_exiting() -> None: ...
