"""`glmdeploy serve engine=vllm`: hand the deployment over to vLLM's own OpenAI-compatible server.

The vLLM side (`glmdeploy.engines.vllm.serve.serve_with_vllm`: config export, fit check, starting
`vllm serve`) is its own package; it is imported only here, only when asked for.
"""

from __future__ import annotations

from glmdeploy.config.settings import Deployment
from glmdeploy.problems import ConfigError, Problem

VLLM_MODULE = "glmdeploy.engines.vllm.serve"


def hand_over_to_vllm(deployment: Deployment, *, json_out: bool) -> int:
    """Start vLLM for `deployment` on `serve.host`:`serve.port`; returns vLLM's exit code.

    Raises:
        ConfigError: this build of glmdeploy has no vLLM hand-over.
    """
    try:
        from glmdeploy.engines.vllm.serve import serve_with_vllm
    except ModuleNotFoundError as exc:
        if not VLLM_MODULE.startswith(str(exc.name)):
            raise  # the module is there but something it imports is not: its own error
        message = f"vLLM hand-over is not available in this build of glmdeploy (no {VLLM_MODULE})"
        hint = "engine=transformers serves the model with glmdeploy's own server"
        raise ConfigError([Problem("engine", message, "engine=transformers", hint)]) from exc
    serve = deployment.serve
    return int(serve_with_vllm(deployment, host=serve.host, port=serve.port, json_out=json_out))
