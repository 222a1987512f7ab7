"""Engines that serve a deployment instead of glmdeploy's own transformers runner (vLLM)."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.engines.vllm.export import VllmExport, export_vllm
    from glmdeploy.engines.vllm.serve import serve_with_vllm

__all__ = ["VllmExport", "export_vllm", "serve_with_vllm"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "VllmExport": "glmdeploy.engines.vllm.export",
        "export_vllm": "glmdeploy.engines.vllm.export",
        "serve_with_vllm": "glmdeploy.engines.vllm.serve",
    },
)
