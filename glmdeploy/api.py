"""glmdeploy's public Python API: compose, validate, plan, load, generate, bench.

Each function returns the objects the CLI renders (`glmdeploy.cli` is a shell over these), and
raises a `GlmDeployError` subclass with every problem found (`ConfigError`, `HardwareError`,
`LoadError`, `DoesNotFitError`): the same messages and exit codes as the command line.

```python
import glmdeploy

planned = glmdeploy.plan(["model=glm-4-9b-chat-hf", "gpus=2x24gib", "precision=bf16"])
planned.plan.device_map         # unit -> physical GPU id / "cpu" / "disk"
loaded = glmdeploy.load(["gpus=cpu"])  # the tiny embedded model, planned, loaded and verified
glmdeploy.generate(loaded, "The capital of France is").new_ids
```

Torch is imported only by `load`, `generate` and `bench` (and `plan` when it must build a model
skeleton).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glmdeploy.config.locations import ConfigSource
    from glmdeploy.config.settings import Deployment
    from glmdeploy.inference.runner import BenchResult, GenerateResult
    from glmdeploy.loading.loader import LoadedModel
    from glmdeploy.planning.deployment_plan import PlannedDeployment

ConfigDirs = str | Path | Sequence[str | Path] | None


def compose(
    overrides: Sequence[str] = (),
    *,
    config_dir: ConfigDirs = None,
    config_name: str | None = None,
) -> Deployment:
    """Compose the config groups with `overrides` (as on the command line), validate, and type.

    Args:
        overrides: `group=option`, `key=value`, `+key=value`, `~key`, as the CLI takes them.
        config_dir: the user's own config directories, searched before the shipped groups
            (as `--config-dir`); `GLMDEPLOY_CONFIG_PATH` is honoured too.
        config_name: the primary config (default `config`).

    Raises:
        ConfigError: every problem of the overrides and of the composed config.
    """
    from glmdeploy.config.deployments import load_deployment

    return load_deployment(overrides, _source(config_dir, config_name)).deployment


def compose_config(
    overrides: Sequence[str] = (),
    *,
    config_dir: ConfigDirs = None,
    config_name: str | None = None,
) -> dict[str, Any]:
    """The composed, resolved config as a plain dict (what `glmdeploy show --json` prints).

    Raises:
        ConfigError: overrides that cannot be applied (the config itself is not validated).
    """
    from glmdeploy.config.compose import compose_dict

    return compose_dict(overrides, _source(config_dir, config_name))


def validate(config: Mapping[str, Any]) -> Deployment:
    """Validate a composed config (a plain dict, as `glmdeploy show --json` prints it).

    Raises:
        ConfigError: every schema and semantic problem, sorted by path.
    """
    from glmdeploy.config.validate import validate_dict

    return validate_dict(config)


def plan(deployment: Deployment | Mapping[str, Any] | Sequence[str]) -> PlannedDeployment:
    """Plan the placement and per-device memory budget; no weights are read, no GPU is touched.

    Args:
        deployment: a `Deployment`, a composed config dict, or overrides for `compose`.

    Returns:
        The plan (`.plan`: device map, per-device rows, verdict) with the GPUs it was made for.

    Raises:
        ConfigError, HardwareError: the config or the GPUs are wrong.
        DeploymentDoesNotFit: nothing fits; `.planned` holds the best attempt, `.problems` the
            shortfall and the fixes.
    """
    from glmdeploy.planning.deployment_plan import plan_deployment

    return plan_deployment(_deployment(deployment))


def load(
    target: PlannedDeployment | Deployment | Mapping[str, Any] | Sequence[str],
    *,
    offload_folder: str | Path | None = None,
    progress: bool = False,
) -> LoadedModel:
    """Plan (unless given a plan), load exactly as planned, and verify every tensor's device.

    Returns:
        The live model with its tokenizer (if any), the plan (`.planned`) and the verification
        (`.device_bytes`: planned against loaded bytes per device).

    Raises:
        As `plan`, and LoadError (the checkpoint, or tensors not where the plan put them);
        ConfigError for a `parallel` deployment (its ranks run under torchrun: use the CLI).
    """
    from glmdeploy.loading.loader import load_model
    from glmdeploy.planning.deployment_plan import PlannedDeployment

    planned = target if isinstance(target, PlannedDeployment) else plan(target)
    if planned.plan.parallel is not None:
        from glmdeploy.problems import ConfigError, Problem

        message = "tensor/pipeline-parallel ranks run under torchrun, not in this process"
        hint = "run `glmdeploy generate|bench|load` with the same overrides (it starts torchrun)"
        raise ConfigError([Problem("parallel", message, hint=hint)])
    loaded = load_model(planned.requested or planned.deployment, planned.plan, planned.assignment,
                        offload_folder=offload_folder, progress=progress)  # fmt: skip
    return dataclasses.replace(loaded, planned=planned)


def generate(
    loaded: LoadedModel, prompt: str | None = None, *, max_new_tokens: int | None = None
) -> GenerateResult:
    """Greedy generation from `prompt` (default: `runtime.prompt`) with the loaded model."""
    from glmdeploy.inference.runner import generate as run_generate

    return run_generate(loaded, _runtime(loaded, prompt, max_new_tokens))


def bench(loaded: LoadedModel, *, repeats: int = 5) -> BenchResult:
    """Time to first token, decode tokens/s (medians of `repeats`) and peak memory per device."""
    from glmdeploy.inference.runner import bench as run_bench

    return run_bench(loaded, _runtime(loaded, None, None), repeats=repeats)


def _source(config_dir: ConfigDirs, config_name: str | None) -> ConfigSource:
    from glmdeploy.config.locations import config_source

    dirs = [config_dir] if isinstance(config_dir, str | Path) else list(config_dir or ())
    return config_source(dirs, config_name)


def _deployment(value: Deployment | Mapping[str, Any] | Sequence[str]) -> Deployment:
    from glmdeploy.config.settings import Deployment

    if isinstance(value, Deployment):
        return value
    if isinstance(value, Mapping):
        return validate(value)
    if isinstance(value, str):  # one override, not a sequence of characters
        return compose([value])
    return compose(value)


def _runtime(loaded: LoadedModel, prompt: str | None, max_new_tokens: int | None) -> Any:
    from glmdeploy.problems import ConfigError, Problem

    if loaded.planned is None:
        hint = "load it with glmdeploy.load(), which keeps the plan and its runtime settings"
        raise ConfigError([Problem("loaded", "this model was loaded without a plan", hint=hint)])
    runtime = loaded.planned.deployment.runtime
    changes: dict[str, Any] = {}
    if prompt is not None:
        changes["prompt"] = prompt
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            message = f"max_new_tokens={max_new_tokens}"
            raise ConfigError([Problem("max_new_tokens", message, "at least 1")])
        changes["max_new_tokens"] = max_new_tokens
    return dataclasses.replace(runtime, **changes)
