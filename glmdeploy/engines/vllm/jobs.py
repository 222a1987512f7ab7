"""The vLLM steps of glmdeploy's job commands: `export vllm` and `plan engine=vllm`, and the
refusal of the commands that would run the model with transformers.

The CLI's job runner (`glmdeploy.cli.jobs`) calls these with plain arguments and records what they
put in `results["vllm"]` (the export's `to_dict()`), so `glmdeploy report` can tabulate sweeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from glmdeploy.config.settings import Deployment, EngineName
from glmdeploy.problems import ConfigError, Problem

CONFIG_NAME = "vllm.yaml"
TRANSFORMERS_COMMANDS = ("load", "generate", "bench", "run")


def refuse_transformers_commands(command: str, deployments: Iterable[Deployment]) -> None:
    """load/generate/bench/run load the model with transformers: not for engine=vllm.

    Raises:
        ConfigError: `command` is one of them and a deployment has engine.name=vllm.
    """
    if command not in TRANSFORMERS_COMMANDS:
        return
    if any(d.engine.name is EngineName.VLLM for d in deployments):
        raise ConfigError(
            [
                Problem(
                    "engine.name",
                    f"vllm: `glmdeploy {command}` runs the model with transformers, not vLLM",
                    "engine=transformers for this command",
                    "write vLLM's config with `glmdeploy export vllm …`, start it with "
                    "`glmdeploy serve engine=vllm …`, or check the fit with "
                    "`glmdeploy plan engine=vllm …`",
                )
            ]
        )


def run_vllm_step(
    deployment: Deployment,
    *,
    run_dir: Path | None,
    out: str | None,
    write: bool,
    json_out: bool,
    results: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """Export (and with `write`, write) vLLM's config for `deployment`; print it unless JSON.

    The config goes to `run_dir/vllm.yaml` and to `out` when given; the commands name `out` if
    given, else the run directory's copy. `results["vllm"]` is set even when it does not fit.

    Raises:
        ConfigError, HardwareError: what vLLM refuses, or the GPUs.
        VllmDoesNotFit: it does not fit (nothing is written then).
    """
    from glmdeploy.engines.vllm.export import VllmDoesNotFit, export_vllm
    from glmdeploy.engines.vllm.render import print_export

    targets = [Path(out)] if out else []
    if write and run_dir is not None:
        targets.append(run_dir / CONFIG_NAME)
    named = (targets[0] if targets else Path(CONFIG_NAME)).resolve()
    try:
        export = export_vllm(deployment, config_path=named)
    except VllmDoesNotFit as exc:
        results["vllm"] = exc.export.to_dict()
        if not json_out:
            print_export(exc.export)
        if write:
            say("not written: a config that does not fit would fail when vLLM starts")
        raise
    results["vllm"] = export.to_dict()
    if write:
        for target in dict.fromkeys(targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            export.write(target)
        results["vllm"]["written"] = [str(t) for t in dict.fromkeys(targets)]
    if not json_out:
        print_export(export, written=str(named) if write and targets else None)
