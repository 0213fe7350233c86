"""verdict: Hugging Face sequence classifiers with vLLM's offline API, run by a Rust engine.

    from verdict import LLM

    llm = LLM(model="jason9693/Qwen2.5-1.5B-apeach", runner="pooling")
    (output,) = llm.classify("Hello, my name is")
    print(output.outputs.probs)

`verdict.ray` runs the same classifier on Ray Data and Ray Serve.
"""

import atexit

from verdict._llm import LLM
from verdict import _native
from verdict._native import __version__
from verdict.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from verdict.pooling_params import PoolingParams

# At exit, engines still loaded are left to the process's end rather than
# finishing the batch they are running (so Ctrl-C exits at once).
atexit.register(_native.interpreter_exiting)

__all__ = [
    "LLM",
    "PoolingParams",
    "PoolingOutput",
    "PoolingRequestOutput",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
    "__version__",
]
