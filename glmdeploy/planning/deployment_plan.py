"""From a validated deployment to a plan: hardware facts, GPU selection, model skeleton, placement.

This is the glue between the pure pieces (`gpu_select`, `anatomy`, `planner`) and the facts that
come from outside: the GPUs (NVML, or a declared fleet), RAM and disk for offload, a local
checkpoint's config.json, and a saved plan file. It never initialises CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from glmdeploy import atomic
from glmdeploy.config.settings import (
    Deployment,
    MapEntry,
    Offload,
    Quantization,
    SourceKind,
    Strategy,
)
from glmdeploy.distributed.rules import runs_on_torchrun
from glmdeploy.hardware.gpu_select import GpuAssignment, existing_gpus, select_gpus
from glmdeploy.hardware.nvml import HardwareSnapshot
from glmdeploy.hardware.precision import (
    ASSUMED,
    QuantizationSupport,
    quantization_support,
    resolve_dtype,
    selected_gpus,
)
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.anatomy_cache import anatomy_for
from glmdeploy.model.hf_config import checkpoint_layout
from glmdeploy.planning.host_devices import offload_devices
from glmdeploy.planning.strategies import current_fingerprint, plan_placement, try_plan
from glmdeploy.planning.types import DeviceSpec, Plan, PlanDoesNotFit, device_label
from glmdeploy.problems import ConfigError, HardwareError, Problem


@dataclass(frozen=True)
class PlannedDeployment:
    """Everything `plan` computed, which `load` needs and run records keep.

    `deployment` has its dtype resolved (never `auto`) and its checkpoint layout detected;
    `requested` is the deployment as given.
    """

    deployment: Deployment
    snapshot: HardwareSnapshot
    assignment: GpuAssignment
    anatomy: Anatomy
    devices: tuple[DeviceSpec, ...]
    plan: Plan
    dtype_reason: str = ""  # why this dtype (precision=auto resolves per GPU)
    requested: Deployment | None = None
    quantization: QuantizationSupport = ASSUMED  # can int8/int4 run there; what this machine lacks

    @property
    def lacking_here(self) -> str | None:
        """What the plan assumes that this machine cannot do (declared GPUs only), or None."""
        return self.quantization.note(self.deployment.precision.quantization)


class DeploymentDoesNotFit(PlanDoesNotFit):
    """No placement fits; `planned` is the best attempt with everything it was planned for."""

    def __init__(self, problems: list[Problem], planned: PlannedDeployment) -> None:
        super().__init__(problems, planned.plan)
        self.planned = planned


def hardware_for(deployment: Deployment) -> HardwareSnapshot:
    """The GPUs that exist to plan for: the declared fleet, else this machine's (NVML)."""
    return existing_gpus(deployment.gpus)


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
    # Plan in the dtype the loader will use (auto: bf16 where every selected GPU has it), knowing
    # the checkpoint's naming (a detected ChatGLM2/3 checkpoint accepts maps in its own names).
    dtype, dtype_reason = resolve_dtype(deployment.precision.dtype, selected_gpus(assignment))
    model = deployment.model
    source = dataclasses.replace(model.source, layout=checkpoint_layout(model))
    deployment = dataclasses.replace(
        deployment,
        model=dataclasses.replace(model, source=source),
        precision=dataclasses.replace(deployment.precision, dtype=dtype),
    )
    gpu_specs = [
        DeviceSpec(d.physical_id, d.physical_id, d.name, d.capacity_bytes, d.compute_capability)
        for d in assignment.devices
    ]
    devices = (*gpu_specs, *offload_devices(deployment, has_gpus=bool(gpu_specs)))
    # int8/int4 only where they can run: declared GPUs are assumed to, this machine must.
    quant = deployment.precision.quantization
    support = quantization_support(assignment)
    if quant is not Quantization.NONE and not support.runs:
        raise HardwareError([support.refusal(quant)])
    lacking = tuple(n for n in (support.note(quant),) if n)
    anatomy = anatomy_for(deployment.model)  # cached: no torch unless it must be built
    try:
        if deployment.placement.strategy is Strategy.PLAN_FILE:
            plan = restore_plan(deployment, anatomy, devices)
        elif runs_on_torchrun(deployment):  # one row per rank (glmdeploy.distributed)
            from glmdeploy.distributed.rank_plan import plan_ranks

            plan = plan_ranks(deployment, anatomy, devices, weights_only=weights_only)
        else:
            plan = plan_placement(deployment, anatomy, devices, weights_only=weights_only,
                                  quantization=support)  # fmt: skip
    except PlanDoesNotFit as exc:
        worst = dataclasses.replace(exc.plan, notes=(*exc.plan.notes, *lacking))
        best = PlannedDeployment(deployment, snapshot, assignment, anatomy, devices, worst,
                                 dtype_reason, requested, support)  # fmt: skip
        raise DeploymentDoesNotFit(exc.problems, best) from exc
    plan = dataclasses.replace(plan, notes=(*plan.notes, *lacking))
    return PlannedDeployment(deployment, snapshot, assignment, anatomy, devices, plan, dtype_reason,
                             requested, support)  # fmt: skip


def restore_plan(deployment: Deployment, anatomy: Anatomy, devices: tuple[DeviceSpec, ...]) -> Plan:
    """Read a saved plan and refuse it if it was made for another model, precision or fleet, or
    if its device map (edited by hand, say) does not place this model's units on these devices.

    The budget is computed again from the saved map, so the rows are true for this machine.

    Raises:
        ConfigError: the file is not a plan (its schema), or does not fit this deployment.
        PlanDoesNotFit: the saved map no longer fits the devices.
    """
    from glmdeploy.formats import read_document

    path = Path(deployment.placement.plan_file or "")
    title = "the saved plan does not match this deployment"
    saved = Plan.from_dict(read_document(path, "plan", title="invalid plan file"))
    problems = saved.fingerprint.mismatches(current_fingerprint(deployment, anatomy, devices))
    if problems:
        raise ConfigError(
            [dataclasses.replace(p, path=f"placement.plan_file ({p.path})") for p in problems],
            title,
        )
    keys = {d.key for d in devices}
    offload = Offload.DISK if "disk" in keys else Offload.CPU if "cpu" in keys else Offload.NONE
    entries = tuple(MapEntry((name,), device) for name, device in saved.device_map.items())
    placement = dataclasses.replace(deployment.placement, strategy=Strategy.EXPLICIT, map=entries,
                                    offload=offload)  # fmt: skip
    try:
        again = try_plan(dataclasses.replace(deployment, placement=placement), anatomy, devices)
    except ConfigError as exc:
        raise ConfigError([_in_file(p, path) for p in exc.problems], title) from exc
    restored = dataclasses.replace(again, strategy=saved.strategy, fingerprint=saved.fingerprint,
                                   notes=saved.notes)  # fmt: skip
    if not restored.fits:
        message = f"the saved plan does not fit these devices any more ({verdict_of(restored)})"
        hint = "plan again: glmdeploy plan … --save FILE"
        raise PlanDoesNotFit([Problem(str(path), message, hint=hint)], restored)
    return restored


def _in_file(problem: Problem, path: Path) -> Problem:
    """A problem of the map check, located in the plan file (`placement.map[3]` -> entry 3)."""
    where = re.sub(r"placement\.map(\[\d+\])?(\.\w+)?", lambda m: f"device_map{m[1] or ''}",
                   problem.path)  # fmt: skip
    message = re.sub(r"placement\.map", "device_map", problem.message)
    hint = problem.hint
    if hint is not None and "modules:" in hint:  # explicit-map syntax: not what a plan file holds
        hint = "plan again (`glmdeploy plan … --save FILE`), or undo the edit"
    return dataclasses.replace(problem, path=f"{path}:{where}", message=message, hint=hint)


def verdict_of(plan: Plan) -> str:
    over = [f"{device_label(r.device)} at {r.utilisation:.0%}" for r in plan.rows
            if r.utilisation > 1]  # fmt: skip
    return ", ".join(over) or "devices over their budget"


def save_plan(plan: Plan, path: Path) -> None:
    """Write a plan as JSON, atomically (a temp file renamed over the target).

    Raises:
        OutputError: `path` cannot be written (a directory, a missing directory, a full disk).
    """
    from glmdeploy.outputs import check_file, output_error

    check_file(path, "the plan file")
    try:
        atomic.write_text(path, json.dumps(plan.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise output_error(path, exc, "the plan file") from exc


def describe_source(deployment: Deployment) -> str:
    src = deployment.model.source
    return {
        SourceKind.EMBEDDED: f"embedded (seed {src.seed})",
        SourceKind.LOCAL: f"local {src.path}",
        SourceKind.HUB: f"hub {src.hub_id}@{src.revision or 'main'}",
        SourceKind.NONE: "none (plan only)",
    }[src.kind]
