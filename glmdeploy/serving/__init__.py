"""Stage 6, serving: the deployment behind an OpenAI-compatible HTTP API (`glmdeploy serve`)."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.serving.backend import (
        GenerationJob,
        GenerationOutcome,
        InferenceBackend,
        Sampling,
    )
    from glmdeploy.serving.handover import hand_over_to_vllm
    from glmdeploy.serving.preflight import Listener, listen
    from glmdeploy.serving.server import serve_model
    from glmdeploy.serving.text import TextAssembler

__all__ = [
    "GenerationJob",
    "GenerationOutcome",
    "InferenceBackend",
    "Listener",
    "Sampling",
    "TextAssembler",
    "hand_over_to_vllm",
    "listen",
    "serve_model",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "GenerationJob": "backend",
        "GenerationOutcome": "backend",
        "InferenceBackend": "backend",
        "Sampling": "backend",
        "TextAssembler": "text",
        "hand_over_to_vllm": "handover",
        "Listener": "preflight",
        "listen": "preflight",
        "serve_model": "server",
    },
)
