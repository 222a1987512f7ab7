"""Stage 5, the run: greedy generation and the benchmark of a loaded model."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.inference.runner import BenchResult, GenerateResult, bench, generate

__all__ = [
    "BenchResult",
    "GenerateResult",
    "bench",
    "generate",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BenchResult": "runner",
        "GenerateResult": "runner",
        "bench": "runner",
        "generate": "runner",
    },
)
