"""vLLM (0.33.0): its `vllm serve` config from a deployment, a fit check with vLLM's own memory
rules before anything boots, and starting it when it is installed. vLLM itself is never imported.
"""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.engines.vllm.export import VllmDoesNotFit, VllmExport, export_vllm
    from glmdeploy.engines.vllm.facts import VLLM_VERSION
    from glmdeploy.engines.vllm.fit import VllmFit
    from glmdeploy.engines.vllm.flags import bad_config_keys, serve_flags
    from glmdeploy.engines.vllm.serve import serve_with_vllm

__all__ = [
    "VLLM_VERSION",
    "VllmDoesNotFit",
    "VllmExport",
    "VllmFit",
    "bad_config_keys",
    "export_vllm",
    "serve_flags",
    "serve_with_vllm",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "VLLM_VERSION": "facts",
        "VllmDoesNotFit": "export",
        "VllmExport": "export",
        "VllmFit": "fit",
        "bad_config_keys": "flags",
        "export_vllm": "export",
        "serve_flags": "flags",
        "serve_with_vllm": "serve",
    },
)
