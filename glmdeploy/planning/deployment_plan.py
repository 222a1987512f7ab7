"""From a validated deployment to a plan: hardware facts, GPU selection, model skeleton, placement.

This is the glue between the pure pieces (`gpu_select`, `anatomy`, `planner`) and the facts that
come from outside: the GPUs (NVML, or a declared fleet), RAM and disk for offload, a local
checkpoint's config.json, and a saved plan file. It never initialises CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from glmdeploy import atomic
from glmdeploy.config.settings import (
    Deployment,
    GpuMode,
    SourceKind,
    Strategy,
)
from glmdeploy.hardware.gpu_select import GpuAssignment, select_gpus
from glmdeploy.hardware.nvml import HardwareSnapshot, declared_snapshot, probe
from glmdeploy.hardware.precision import resolve_dtype, selected_gpus
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.anatomy_cache import anatomy_for
from glmdeploy.planning.strategies import current_fingerprint, plan_placement
from glmdeploy.planning.types import DeviceSpec, Plan, PlanDoesNotFit
from glmdeploy.problems import ConfigError, Problem


@dataclass(frozen=True)
class PlannedDeployment:
    """Everything `plan` computed, which `load` needs and run records keep.

    `deployment` has its dtype resolved (never `auto`); `requested` is the deployment as given.
    """

    deployment: Deployment
    snapshot: HardwareSnapshot
    assignment: GpuAssignment
    anatomy: Anatomy
    devices: tuple[DeviceSpec, ...]
    plan: Plan
    dtype_reason: str = ""  # why this dtype (precision=auto resolves per GPU)
    requested: Deployment | None = None


class DeploymentDoesNotFit(PlanDoesNotFit):
    """No placement fits; `planned` is the best attempt with everything it was planned for."""

    def __init__(self, problems: list[Problem], planned: PlannedDeployment) -> None:
        super().__init__(problems, planned.plan)
        self.planned = planned


def hardware_for(deployment: Deployment) -> HardwareSnapshot:
    """The GPUs to plan for: the declared fleet, nothing (cpu), or this machine's (NVML)."""
    mode = deployment.gpus.mode
    if mode is GpuMode.DECLARED:
        return declared_snapshot(deployment.gpus.declared)
    if mode is GpuMode.CPU:
        return HardwareSnapshot((), None, None, None, "none")
    return probe()


def offload_devices(
    deployment: Deployment, *, has_gpus: bool, run_dir: Path | None = None
) -> list[DeviceSpec]:
    """cpu (RAM the plan may use) and disk (free space) specs, as `placement.offload` allows.

    Without GPUs the CPU runs the model, so it is always offered then.
    """
    placement = deployment.placement
    keys = list(placement.offload.devices)
    if not has_gpus and "cpu" not in keys:
        keys.insert(0, "cpu")
    specs: list[DeviceSpec] = []
    for key in keys:
        if key == "cpu":
            specs.append(DeviceSpec("cpu", None, "CPU RAM", _ram_bytes()))
        else:
            folder = Path(placement.offload_folder or run_dir or Path.cwd())
            specs.append(DeviceSpec("disk", None, f"disk ({folder})", _free_disk(folder)))
    return specs


def _ram_bytes() -> int:
    """90 % of the RAM available now (the default CPU budget)."""
    import psutil

    return int(psutil.virtual_memory().available * 0.9)


def _free_disk(folder: Path) -> int:
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    return shutil.disk_usage(probe_dir).free


def plan_deployment(
    deployment: Deployment,
    *,
    snapshot: HardwareSnapshot | None = None,
    env: Mapping[str, str] | None = None,
    weights_only: bool = False,
) -> PlannedDeployment:
    """Select GPUs, build the skeleton and plan the placement (or restore a saved plan).

    Raises:
        ConfigError, HardwareError: the config or the GPUs are wrong.
        DoesNotFitError: nothing fits; its problems name the cheapest fixes.
    """
    requested = deployment
    snapshot = snapshot if snapshot is not None else hardware_for(deployment)
    assignment = select_gpus(deployment.gpus, snapshot, os.environ if env is None else env)
    # Plan in the dtype the loader will use (auto: bf16 where every selected GPU has it).
    dtype, dtype_reason = resolve_dtype(deployment.precision.dtype, selected_gpus(assignment))
    deployment = dataclasses.replace(
        deployment, precision=dataclasses.replace(deployment.precision, dtype=dtype)
    )
    gpu_specs = [
        DeviceSpec(d.physical_id, d.physical_id, d.name, d.capacity_bytes, d.compute_capability)
        for d in assignment.devices
    ]
    devices = (*gpu_specs, *offload_devices(deployment, has_gpus=bool(gpu_specs)))
    anatomy = anatomy_for(deployment.model)  # cached: no torch unless it must be built
    if deployment.placement.strategy is Strategy.PLAN_FILE:
        plan = restore_plan(deployment, anatomy, devices)
    else:
        try:
            plan = plan_placement(deployment, anatomy, devices, weights_only=weights_only)
        except PlanDoesNotFit as exc:
            best = PlannedDeployment(deployment, snapshot, assignment, anatomy, devices, exc.plan,
                                     dtype_reason, requested)  # fmt: skip
            raise DeploymentDoesNotFit(exc.problems, best) from exc
    return PlannedDeployment(deployment, snapshot, assignment, anatomy, devices, plan, dtype_reason,
                             requested)  # fmt: skip


def restore_plan(deployment: Deployment, anatomy: Anatomy, devices: tuple[DeviceSpec, ...]) -> Plan:
    """Read a saved plan and refuse it if it was made for another model, precision or fleet."""
    path = Path(deployment.placement.plan_file or "")
    try:
        saved = Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            [
                Problem(
                    "placement.plan_file",
                    f"cannot read plan '{path}': {exc}",
                    "a file written by `glmdeploy plan --save FILE`",
                )
            ]
        ) from exc
    problems = saved.fingerprint.mismatches(current_fingerprint(deployment, anatomy, devices))
    if problems:
        raise ConfigError(
            [dataclasses.replace(p, path=f"placement.plan_file ({p.path})") for p in problems],
            "the saved plan does not match this deployment",
        )
    return saved


def save_plan(plan: Plan, path: Path) -> None:
    """Write a plan as JSON, atomically (a temp file renamed over the target)."""
    atomic.write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")


def describe_source(deployment: Deployment) -> str:
    src = deployment.model.source
    return {
        SourceKind.EMBEDDED: f"embedded (seed {src.seed})",
        SourceKind.LOCAL: f"local {src.path}",
        SourceKind.HUB: f"hub {src.hub_id}@{src.revision or 'main'}",
        SourceKind.NONE: "none (plan only)",
    }[src.kind]
