"""glmdeploy: declarative multi-GPU deployment of GLM / ChatGLM and Hugging Face causal LMs.

The public API is re-exported here lazily: `import glmdeploy` imports neither torch nor
transformers until a function that needs them is called. See `glmdeploy.api`."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from glmdeploy.api import bench, compose, compose_config, generate, load, plan, validate
    from glmdeploy.config.settings import Deployment
    from glmdeploy.inference.runner import BenchResult, GenerateResult
    from glmdeploy.loading.loader import LoadedModel
    from glmdeploy.planning.deployment_plan import PlannedDeployment
    from glmdeploy.planning.types import Plan, PlanDoesNotFit
    from glmdeploy.problems import (
        ConfigError,
        DoesNotFitError,
        ExitCode,
        GlmDeployError,
        HardwareError,
        LoadError,
        OutputError,
        Problem,
    )

__all__ = [
    "BenchResult",
    "ConfigError",
    "Deployment",
    "DoesNotFitError",
    "ExitCode",
    "GenerateResult",
    "GlmDeployError",
    "HardwareError",
    "LoadError",
    "LoadedModel",
    "OutputError",
    "Plan",
    "PlanDoesNotFit",
    "PlannedDeployment",
    "Problem",
    "bench",
    "compose",
    "compose_config",
    "generate",
    "load",
    "plan",
    "validate",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BenchResult": "glmdeploy.inference.runner",
        "ConfigError": "glmdeploy.problems",
        "Deployment": "glmdeploy.config.settings",
        "DoesNotFitError": "glmdeploy.problems",
        "ExitCode": "glmdeploy.problems",
        "GenerateResult": "glmdeploy.inference.runner",
        "GlmDeployError": "glmdeploy.problems",
        "HardwareError": "glmdeploy.problems",
        "LoadError": "glmdeploy.problems",
        "LoadedModel": "glmdeploy.loading.loader",
        "OutputError": "glmdeploy.problems",
        "Plan": "glmdeploy.planning.types",
        "PlanDoesNotFit": "glmdeploy.planning.types",
        "PlannedDeployment": "glmdeploy.planning.deployment_plan",
        "Problem": "glmdeploy.problems",
        "bench": "glmdeploy.api",
        "compose": "glmdeploy.api",
        "compose_config": "glmdeploy.api",
        "generate": "glmdeploy.api",
        "load": "glmdeploy.api",
        "plan": "glmdeploy.api",
        "validate": "glmdeploy.api",
    },
)
