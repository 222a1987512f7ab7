"""Budgets a unit -> device assignment into a `Plan`: per-device rows, hops, verdict and notes.

Every strategy (computed, explicit or transformers') goes through `assemble`, so all plans are
measured with the same memory model (`glmdeploy.planning.memory`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

from glmdeploy.config.settings import GIB, Runtime
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.planning.memory import MemoryModel
from glmdeploy.planning.types import (
    BudgetRow,
    DeviceKey,
    DeviceSpec,
    Fingerprint,
    Hop,
    Plan,
    Verdict,
    device_label,
    summarise,
)
from glmdeploy.planning.workspace_term import workspace_note

PCIE_BYTES_PER_S = 25e9  # PCIe 4.0 x16, effective host-to-device
DISK_BYTES_PER_S = 2e9  # a fast NVMe SSD
RAM_BYTES_PER_S = 50e9  # a desktop's dual-channel DDR5 (servers have more): CPU decoding's bound
TOLERANCE = 1e-9


def assemble(
    anatomy: Anatomy,
    memory: MemoryModel,
    gpus: Sequence[DeviceSpec],
    offload_devices: Sequence[DeviceSpec],
    capacities: Mapping[DeviceKey, int],
    assignment: Mapping[str, DeviceKey],
    *,
    strategy: str,
    notes: Sequence[str],
    fingerprint: Fingerprint,
) -> Plan:
    """The plan for `assignment` (unit -> device), budgeted on `gpus` then cpu/disk."""
    index = {u.name: i for i, u in enumerate(anatomy.units)}
    on: dict[DeviceKey, list[int]] = {}
    for name in anatomy.names:
        if name in assignment:
            on.setdefault(assignment[name], []).append(index[name])
    gpu_keys = [g.key for g in gpus]
    # accelerate's main device: the first GPU holding a unit, else the CPU.
    execution: DeviceKey = next((k for k in gpu_keys if on.get(k)), "cpu")
    offloaded = [
        i for k, units in on.items() if k not in gpu_keys and k != execution for i in units
    ]

    rows: list[BudgetRow] = []
    used = [d for d in offload_devices if d.key in on or (d.key == execution and offloaded)]
    for spec in (*gpus, *used):
        units = on.get(spec.key, [])
        weights = sum(memory.unit_weights[i] for i in units)
        kv = workspace = 0
        if isinstance(spec.key, int) or spec.key == execution:  # where compute happens
            kv = sum(memory.unit_kv[i] for i in units)
            workspace = memory.workspace_of(units)  # the largest: units run one at a time
        if spec.key == execution and offloaded:
            # Offloaded units run here: their buffers stay here (accelerate offloads parameters
            # only), their KV cache and workspace are made here, and their weights stream in.
            weights += sum(memory.unit_buffers[i] for i in offloaded)
            kv += sum(memory.unit_kv[i] for i in offloaded)
            workspace = memory.workspace_of([*units, *offloaded])
            workspace += _streaming_buffer(anatomy, memory, offloaded)
        elif spec.key not in gpu_keys and spec.key != execution:  # offloaded from here
            weights -= sum(memory.unit_buffers[i] for i in units)
        reserve = memory.reserve if isinstance(spec.key, int) else 0
        capacity = capacities.get(spec.key, 0)
        rows.append(_row(spec, anatomy, memory, units, weights, kv, workspace, reserve, capacity))
    stray = [k for k in on if k not in gpu_keys and k not in {s.key for s in offload_devices}]

    complete = not stray and len(assignment) == len(anatomy.units)
    plan_hops = hops(anatomy, assignment)
    offloaded_bytes = sum(memory.unit_weights[i] - memory.unit_buffers[i] for i in offloaded)
    all_notes = [*notes, *_notes(anatomy, memory, assignment, on, offloaded_bytes, execution)]
    if stray:
        all_notes.append(f"units on devices that offload does not allow: {stray}")
    return Plan(
        strategy=strategy,
        device_map={n: assignment[n] for n in anatomy.names if n in assignment},
        rows=tuple(rows),
        hops=plan_hops,
        verdict=judge(rows, plan_hops, complete=complete),
        notes=tuple(all_notes),
        fingerprint=fingerprint,
        offloaded_bytes=offloaded_bytes,
        workspace=memory.workspace,
    )


def judge(rows: Sequence[BudgetRow], plan_hops: Sequence[Hop], *, complete: bool) -> Verdict:
    """The plan's one verdict: does it fit, which device binds, and how tightly.

    Every GPU has a budget (capacity − reserve); cpu and disk have one when their capacity is
    known (not 0). The binding device is the most utilised of those; the plan fits when every unit
    is placed where it may go (`complete`) and no budget is exceeded.
    """
    budgeted = [r for r in rows if isinstance(r.device, int) or r.capacity_bytes > 0]
    binding = max(budgeted, key=lambda r: r.utilisation, default=None)
    within = all(r.utilisation <= 1 + TOLERANCE for r in budgeted)
    utilisation = binding.utilisation if binding is not None else 0.0
    device = binding.device if binding is not None else None
    if complete and within:
        holding = sum(1 for r in rows if r.weights_bytes)
        peak = (
            f"peak {percent(utilisation)} of budget ({device_label(binding.device)})"
            if binding is not None
            else "no device with a known budget"
        )
        sentence = (
            f"fits: {holding} device(s) hold weights, {peak}, "
            f"{len(plan_hops)} cross-device hop(s) per forward pass"
        )
        return Verdict(True, device, utilisation, sentence)
    if binding is not None and not within:
        sentence = (
            f"does not fit: {device_label(binding.device)} ({binding.name}) would need "
            f"{size(binding.total_bytes)} of its {size(binding.capacity_bytes)} "
            f"({percent(utilisation)} of budget)"
        )
    else:
        sentence = "does not fit: units are unplaced or on devices that offload does not allow"
    return Verdict(False, device, utilisation, sentence)


def size(nbytes: float) -> str:
    """`17.5 GiB`; below 0.1 GiB in MiB (`0.8 MiB`), so small models show real numbers."""
    return f"{nbytes / GIB:.1f} GiB" if abs(nbytes) >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def percent(utilisation: float) -> str:
    """A utilisation as the table shows it: `55%`, `∞` when there is no budget at all."""
    return "∞" if math.isinf(utilisation) else f"{utilisation:.0%}"


def hops(anatomy: Anatomy, assignment: Mapping[str, DeviceKey]) -> tuple[Hop, ...]:
    """Device changes between consecutive units in forward order (unmapped units skipped)."""
    placed = [(n, assignment[n]) for n in anatomy.names if n in assignment]
    return tuple(
        Hop(before=a, after=b, source=da, target=db)
        for (a, da), (b, db) in itertools.pairwise(placed)
        if da != db
    )


def _streaming_buffer(anatomy: Anatomy, memory: MemoryModel, offloaded: list[int]) -> int:
    """Room for the largest offloaded item's parameters (tied units travel together)."""
    sizes: dict[str, int] = {}
    for i in offloaded:
        leader = anatomy.tied_leader(anatomy.units[i].name)
        sizes[leader] = sizes.get(leader, 0) + memory.unit_weights[i] - memory.unit_buffers[i]
    return max(sizes.values(), default=0)


def _row(
    spec: DeviceSpec,
    anatomy: Anatomy,
    memory: MemoryModel,
    units: list[int],
    weights: int,
    kv: int,
    workspace: int,
    reserve: int,
    capacity: int,
) -> BudgetRow:
    load = weights + kv + workspace
    budget = capacity - reserve
    if isinstance(spec.key, int):
        utilisation = load / budget if budget > 0 else (math.inf if load else 0.0)
    else:
        utilisation = load / capacity if capacity > 0 else 0.0
    return BudgetRow(
        device=spec.key,
        physical_id=spec.physical_id,
        name=spec.name,
        units=summarise(anatomy.units[i].name for i in units),
        n_params=sum(memory.unit_params[i] for i in units),
        weights_bytes=weights,
        kv_bytes=kv,
        workspace_bytes=workspace,
        reserve_bytes=reserve,
        total_bytes=load + reserve,
        capacity_bytes=capacity,
        utilisation=utilisation,
    )


def _notes(
    anatomy: Anatomy,
    memory: MemoryModel,
    assignment: Mapping[str, DeviceKey],
    on: Mapping[DeviceKey, list[int]],
    offloaded_bytes: int,
    execution: DeviceKey,
) -> list[str]:
    notes: list[str] = []
    if memory.workspace is not None:
        notes.append(workspace_note(memory.workspace))
    if execution == "cpu" and not any(isinstance(k, int) for k in on):
        ram = sum(memory.unit_weights[i] for i in on.get("cpu", []))
        notes.append(
            f"no unit is on a GPU: the CPU runs the whole model, reading its {size(ram)} "
            f"of weights in RAM for every generated token: ≥ {milliseconds(ram / RAM_BYTES_PER_S)} "
            f"ms/token at {RAM_BYTES_PER_S / 1e9:.0f} GB/s"
        )
    if anatomy.order_source != "traced":
        notes.append("forward order inferred from registration order (tracing failed)")
    for group in anatomy.tied_groups:
        leader, *followers = group.units
        if leader in assignment:
            notes.append(
                f"{', '.join(followers)} shares its weight with {leader} (tied): both on "
                f"{device_label(assignment[leader])}, counted once"
            )
    if offloaded_bytes:
        disk_bytes = sum(memory.unit_weights[i] for i in on.get("disk", []))
        seconds = offloaded_bytes / PCIE_BYTES_PER_S + disk_bytes / DISK_BYTES_PER_S
        disk = f" ({disk_bytes / GIB:.2f} GiB read from disk at {DISK_BYTES_PER_S / 1e9:.0f} GB/s)"
        notes.append(
            f"offload: {offloaded_bytes / GIB:.2f} GiB of weights live off-GPU and are copied to "
            f"{device_label(execution)} on every forward pass (every generated token)"
            f"{disk if disk_bytes else ''}: "
            f"≥ {milliseconds(seconds)} ms/token at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s PCIe"
        )
    return notes


def milliseconds(seconds: float) -> str:
    """`375`, `4.2`, `0.017`: milliseconds with the digits that matter."""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2g}"


def fingerprint(
    anatomy: Anatomy,
    memory: MemoryModel,
    runtime: Runtime,
    devices: Sequence[DeviceSpec],
    capacities: Mapping[DeviceKey, int],
) -> Fingerprint:
    """What a plan is computed for: architecture, precision, runtime and capped capacities."""
    return Fingerprint(
        config_hash=anatomy.config_hash,
        model_class=anatomy.model_class,
        dtype=str(memory.dtype),
        quantization=str(memory.quantization),
        kv_cache_dtype=str(memory.kv_dtype),
        max_context_tokens=runtime.max_context_tokens,
        batch_size=runtime.batch_size,
        devices=tuple((d.key, capacities.get(d.key, 0)) for d in devices),
    )
