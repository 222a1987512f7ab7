"""Placement as a pure function: deployment × anatomy × devices -> Plan (no torch, no CUDA).

Strategies (`placement.strategy`):

- `balanced`: the exact minimum, over contiguous splits of the forward-ordered units onto the GPUs
  in selection order, of the maximum utilisation (weights + KV + workspace) / (capacity − reserve)
  (`glmdeploy.planning.partition`). No-split blocks are units; a unit tied to an earlier one
  (lm_head tied to model.embed_tokens) is glued to it and counted there: the logits step then
  hops back.
- `auto`: `balanced` on the fewest leading GPUs (in selection order) whose plan keeps every GPU at
  ≤ AUTO_TARGET utilisation; all GPUs when no prefix gets there. Why: model parallelism by device
  map runs one GPU at a time, so extra GPUs buy memory, not speed, while each one adds a hop and
  takes a GPU away from other jobs; memory beyond a 10 % margin (on top of the reserve and the full
  KV cache, already counted) buys nothing.
- `balanced_low_0`: `balanced` with the first selected GPU's budget scaled by
  (1 − gpu0_free_fraction) while splitting (rows report real budgets). Any ids, any order.
- `sequential`: fill GPUs in order, each to its budget.
- `explicit`: the user's map (`glmdeploy.planning.explicit_map`), budgeted like any other plan.
- `transformers`: transformers' own `device_map="auto"` for the same budgets
  (`glmdeploy.planning.transformers_map`).

Offload (only when `placement.offload` allows): the longest prefix of items that fits the GPUs stays
there, the rest goes to cpu (then disk). Offloaded units run on the execution GPU (the first GPU
holding units, accelerate's main device), which pays for their KV cache, the workspace and a buffer
as large as the largest offloaded unit; their weights cross PCIe on every forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from glmdeploy.config.settings import GIB, CheckpointLayout, Deployment, Dtype, Strategy
from glmdeploy.hardware.precision import ASSUMED, GpuCapability, QuantizationSupport, resolve_dtype
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.planning import partition
from glmdeploy.planning.budget import TOLERANCE, assemble, fingerprint, percent
from glmdeploy.planning.memory import MemoryModel, deployment_memory
from glmdeploy.planning.types import (
    DeviceKey,
    DeviceSpec,
    Fingerprint,
    Plan,
    PlanDoesNotFit,
    device_label,
)
from glmdeploy.problems import ConfigError, Problem

AUTO_TARGET = 0.9


@dataclass(frozen=True)
class _Setup:
    deployment: Deployment
    anatomy: Anatomy
    memory: MemoryModel
    gpus: tuple[DeviceSpec, ...]
    capacities: dict[DeviceKey, int]  # after caps
    offload_devices: tuple[DeviceSpec, ...]  # cpu, then disk, as allowed
    items: tuple[tuple[int, ...], ...]  # unit indices, tied followers glued to their leader
    item_loads: tuple[int, ...]  # weights + KV per item on a GPU
    item_peaks: tuple[int, ...]  # workspace of a GPU running the item (a GPU: its largest)


def plan_placement(
    deployment: Deployment,
    anatomy: Anatomy,
    devices: Sequence[DeviceSpec],
    *,
    weights_only: bool = False,
    quantization: QuantizationSupport = ASSUMED,
) -> Plan:
    """Plan where each unit goes, with its memory budget.

    Args:
        deployment: the validated config (placement, precision, runtime, gpus.max_memory_gib).
        anatomy: the model skeleton (`build_anatomy`).
        devices: selected GPUs in selection order (key = physical id), plus "cpu"/"disk" specs
            when offload may use them (absent: unlimited).
        weights_only: count weights only (no KV, workspace or reserve), as transformers does.
        quantization: whether int8/int4 can run on these GPUs (fix advice offers them only then).

    Raises:
        ConfigError: an invalid explicit map, or `plan_file` (restore saved plans with
            `Plan.from_dict` and `Fingerprint.mismatches`).
        PlanDoesNotFit: no plan fits; its problems give the shortfall and the cheapest fixes.
    """
    from glmdeploy.planning.fit_advice import does_not_fit_problems

    deployment = with_resolved_dtype(deployment, devices)
    plan = try_plan(deployment, anatomy, devices, weights_only=weights_only)
    if not plan.fits:
        problems = does_not_fit_problems(deployment, anatomy, devices, plan, try_plan,
                                         weights_only=weights_only,
                                         quantization=quantization)  # fmt: skip
        raise PlanDoesNotFit(problems, plan)
    return plan


def with_resolved_dtype(deployment: Deployment, devices: Sequence[DeviceSpec]) -> Deployment:
    """`deployment` with `precision.dtype=auto` resolved for the GPUs among `devices`."""
    if deployment.precision.dtype is not Dtype.AUTO:
        return deployment
    gpus = tuple(GpuCapability(int(d.key), d.name, d.compute_capability)
                 for d in devices if isinstance(d.key, int))  # fmt: skip
    dtype, _ = resolve_dtype(Dtype.AUTO, gpus)
    return replace(deployment, precision=replace(deployment.precision, dtype=dtype))


def try_plan(
    deployment: Deployment,
    anatomy: Anatomy,
    devices: Sequence[DeviceSpec],
    *,
    weights_only: bool = False,
) -> Plan:
    """Like `plan_placement`, but returns the best plan found even when it does not fit."""
    deployment = with_resolved_dtype(deployment, devices)
    setup = _setup(deployment, anatomy, devices, weights_only)
    strategy = deployment.placement.strategy
    notes: list[str] = []
    if strategy is Strategy.PLAN_FILE:
        raise ConfigError(
            [Problem("placement.strategy", "plan_file plans are restored, not computed",
                     hint="load it with Plan.from_dict and check Fingerprint.mismatches")]
        )  # fmt: skip
    if strategy is Strategy.EXPLICIT:
        from glmdeploy.planning.explicit_map import check_explicit_map

        keys = [g.key for g in setup.gpus]
        placement = deployment.placement
        legacy = deployment.model.source.layout is CheckpointLayout.CHATGLM
        check = check_explicit_map(
            placement.map, anatomy, keys, placement.offload, checkpoint_names=legacy
        )
        if not check.ok:
            raise ConfigError(list(check.problems))
        assignment, notes = check.device_map, list(check.notes)
    elif strategy is Strategy.TRANSFORMERS:
        from glmdeploy.planning.transformers_map import max_memory, transformers_assignment

        budgets = max_memory(setup.gpus, setup.offload_devices, setup.capacities, setup.memory)
        assignment, notes = transformers_assignment(
            anatomy, deployment.model, setup.memory, budgets
        )
    else:
        assignment, notes = _automatic(setup, strategy)
    devices_used = (*setup.gpus, *setup.offload_devices)
    stamp = fingerprint(anatomy, setup.memory, deployment.runtime, devices_used, setup.capacities)
    plan = assemble(
        anatomy, setup.memory, setup.gpus, setup.offload_devices, setup.capacities, assignment,
        strategy=str(strategy), notes=notes, fingerprint=stamp,
    )  # fmt: skip
    if strategy is Strategy.BALANCED_LOW_0 and setup.gpus:
        frac = deployment.placement.gpu0_free_fraction
        plan = replace(plan, notes=(*plan.notes, low_0_note(plan, frac)))
    return plan


def low_0_note(plan: Plan, free_fraction: float) -> str:
    """What balanced_low_0 did, in the numbers of the plan's own rows."""
    first, *others = [r for r in plan.rows if isinstance(r.device, int)]
    label = device_label(first.device)
    limit = 1 - free_fraction
    rest = max((r.utilisation for r in others), default=None)
    rest_text = f", the other GPUs at up to {percent(rest)}" if rest is not None else ""
    if first.utilisation <= limit + TOLERANCE:
        return (
            f"balanced_low_0: {label} keeps {free_fraction:.0%} of its budget free: it is planned "
            f"at {percent(first.utilisation)} (at most {limit:.0%}){rest_text}"
        )
    return (
        f"balanced_low_0: {label} was to keep {free_fraction:.0%} of its budget free, but is "
        f"planned at {percent(first.utilisation)}{rest_text}: the model does not fit otherwise"
    )


def current_fingerprint(
    deployment: Deployment,
    anatomy: Anatomy,
    devices: Sequence[DeviceSpec],
    *,
    weights_only: bool = False,
) -> Fingerprint:
    """What a plan for these inputs would record: compare a saved plan's with `mismatches`."""
    deployment = with_resolved_dtype(deployment, devices)
    setup = _setup(deployment, anatomy, devices, weights_only)
    used = (*setup.gpus, *setup.offload_devices)
    return fingerprint(anatomy, setup.memory, deployment.runtime, used, setup.capacities)


def _setup(
    deployment: Deployment, anatomy: Anatomy, devices: Sequence[DeviceSpec], weights_only: bool
) -> _Setup:
    placement = deployment.placement
    gpus = tuple(d for d in devices if isinstance(d.key, int))
    mm = deployment_memory(deployment, anatomy, gpus=bool(gpus), weights_only=weights_only)
    caps = deployment.gpus.max_memory_gib
    capacities: dict[DeviceKey, int] = {}
    for d in devices:
        cap = d.capacity_bytes
        if isinstance(d.key, int) and d.physical_id is not None and d.physical_id in caps:
            cap = min(cap, round(caps[d.physical_id] * GIB))
        if d.key == "cpu" and placement.cpu_memory_gib is not None:
            cap = round(placement.cpu_memory_gib * GIB)
        capacities[d.key] = cap
    offload = []
    wanted = placement.offload.devices
    if not gpus:  # no GPU: the model runs on the CPU
        wanted = tuple(dict.fromkeys(("cpu", *wanted)))
    for key in wanted:
        spec = next((d for d in devices if d.key == key), None)
        spec = spec or DeviceSpec(key, None, key, 0)  # not given: unlimited
        capacities.setdefault(key, 0)
        offload.append(spec)
    leaders: dict[str, list[int]] = {}
    for i, unit in enumerate(anatomy.units):
        leaders.setdefault(anatomy.tied_leader(unit.name), []).append(i)
    items = tuple(tuple(v) for v in leaders.values())
    loads = tuple(sum(mm.unit_weights[i] + mm.unit_kv[i] for i in item) for item in items)
    peaks = tuple(mm.workspace_of(item) for item in items)
    return _Setup(deployment, anatomy, mm, gpus, capacities, tuple(offload), items, loads, peaks)


def _budgets(setup: _Setup, strategy: Strategy) -> list[int]:
    budgets = [setup.capacities[g.key] - setup.memory.reserve for g in setup.gpus]
    if strategy is Strategy.BALANCED_LOW_0 and budgets:
        budgets[0] = int(budgets[0] * (1 - setup.deployment.placement.gpu0_free_fraction))
    return budgets


def _split(
    loads: Sequence[int],
    peaks: Sequence[int],
    budgets: list[int],
    floors: list[int],
    sequential: bool,
    always: list[int] | None = None,
) -> tuple[list[int], float]:
    """Sequential: fill in order at utilisation 1 (balanced if that fails); else balanced."""
    always = always if always is not None else [0] * len(budgets)
    if_used = [0] * len(budgets)
    if sequential:
        prefix = list(itertools.accumulate(loads, initial=0))
        ranges = partition.RangeMax(peaks)
        bounds = partition.greedy_split(prefix, budgets, always, if_used, 1.0, ranges, floors)
        if bounds is not None:
            return bounds, partition.utilisation(loads, bounds, budgets, always, if_used, peaks,
                                                 floors)  # fmt: skip
    return partition.min_max_split(loads, budgets, always, if_used, peaks, floors)


def _automatic(setup: _Setup, strategy: Strategy) -> tuple[dict[str, DeviceKey], list[str]]:
    """balanced / balanced_low_0 / sequential / auto, with offload when allowed."""
    notes: list[str] = []
    if not setup.gpus:  # the CPU runs the model (the plan's notes say so, with the cost)
        return {u.name: "cpu" for u in setup.anatomy.units}, notes
    budgets = _budgets(setup, strategy)
    real = _budgets(setup, Strategy.BALANCED)
    n_gpus = len(budgets)
    sequential = strategy is Strategy.SEQUENTIAL
    loads, peaks = setup.item_loads, setup.item_peaks
    zero = [0] * n_gpus
    if strategy is Strategy.AUTO and n_gpus > 1:
        for k in range(1, n_gpus + 1):
            bounds, util = _split(loads, peaks, budgets[:k], zero[:k], False)
            if util <= AUTO_TARGET:
                bounds += [bounds[-1]] * (n_gpus - k)
                notes.append(
                    f"auto: {k} of {n_gpus} GPUs, the fewest leading ones that keep every GPU "
                    f"at ≤ {AUTO_TARGET:.0%} utilisation"
                )
                break
        else:
            bounds, util = _split(loads, peaks, budgets, zero, False)
            notes.append(f"auto: all {n_gpus} GPUs (none fewer stay ≤ {AUTO_TARGET:.0%})")
    else:
        bounds, util = _split(loads, peaks, budgets, zero, sequential)
    cut = len(loads)
    over = partition.utilisation(loads, bounds, real, zero, zero, peaks) > 1
    if over and setup.offload_devices:
        cut, bounds = _offload_cut(setup, budgets, sequential)
    assignment: dict[str, DeviceKey] = {}
    for d, gpu in enumerate(setup.gpus):
        for item in setup.items[bounds[d] : bounds[d + 1]]:
            for i in item:
                assignment[setup.anatomy.units[i].name] = gpu.key
    assignment.update(_offload_rest(setup, cut))
    order = {u.name: i for i, u in enumerate(setup.anatomy.units)}
    return dict(sorted(assignment.items(), key=lambda kv: order[kv[0]])), notes


def _offload_cut(setup: _Setup, budgets: list[int], sequential: bool) -> tuple[int, list[int]]:
    """The longest item prefix that fits the GPUs when the rest is offloaded, and its split.

    The execution GPU e (the first one holding items) carries the offloaded items' KV cache, the
    workspace of running them (at least), a buffer for the largest of them, and item 0; GPUs before
    e stay empty. Cut 0 (all off-GPU) means the CPU runs the model, as accelerate does when no GPU
    holds a module.
    """
    mm, loads, peaks, n_gpus = setup.memory, setup.item_loads, setup.item_peaks, len(budgets)
    for cut in range(len(loads) - 1, 0, -1):
        rest = [i for item in setup.items[cut:] for i in item]
        extra = max(sum(mm.unit_weights[i] for i in item) for item in setup.items[cut:])
        extra += sum(mm.unit_kv[i] + mm.unit_buffers[i] for i in rest)
        for e in range(n_gpus):
            sub_budgets = [0] * e + budgets[e:]
            always, floors = [0] * n_gpus, [0] * n_gpus
            always[e] = extra + loads[0]
            floors[e] = max(peaks[0], *peaks[cut:])
            prefix = list(itertools.accumulate(loads[1:cut], initial=0))
            ranges = partition.RangeMax(peaks[1:cut])
            if partition.greedy_split(prefix, sub_budgets, always, [0] * n_gpus, 1.0, ranges,
                                      floors) is None:  # fmt: skip
                continue
            sub, _ = _split(loads[1:cut], peaks[1:cut], sub_budgets, floors, sequential, always)
            return cut, [0] * (e + 1) + [b + 1 for b in sub[e + 1 :]]
    return 0, [0] * (n_gpus + 1)


def _offload_rest(setup: _Setup, cut: int) -> dict[str, DeviceKey]:
    """Items from `cut` on: cpu until its capacity (0: unlimited) is used, then disk."""
    out: dict[str, DeviceKey] = {}
    devices = list(setup.offload_devices)
    used = 0
    for item in setup.items[cut:]:
        size = sum(setup.memory.unit_weights[i] for i in item)
        cap = setup.capacities.get(devices[0].key, 0) if devices else 0
        while len(devices) > 1 and cap and used + size > cap:
            devices.pop(0)
            used, cap = 0, setup.capacities.get(devices[0].key, 0)
        used += size
        for i in item:
            out[setup.anatomy.units[i].name] = devices[0].key if devices else "cpu"
    return out
