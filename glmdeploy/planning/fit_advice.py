"""Explains a plan that does not fit: the shortfall, then the fixes, cheapest for the user first.

Each fix changes one setting and is checked by planning again, so every number it quotes is a real
plan's. Fixes are ranked by what they cost the user, and each says that cost: fewer sequences at
once (throughput) < a shorter context < lower precision (quality) < more GPUs (money) < offload
(milliseconds per token). A change that would still not fit is never a hint: it is said, without
one, after the fixes. int8/int4 are offered only where they can run (`QuantizationSupport`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from glmdeploy.config.settings import (
    GIB,
    Deployment,
    Dtype,
    Offload,
    Precision,
    Quantization,
    Strategy,
)
from glmdeploy.hardware.precision import ASSUMED, QuantizationSupport
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.planning.budget import percent, size
from glmdeploy.planning.host_devices import offload_spec
from glmdeploy.planning.types import DeviceSpec, Plan, device_label
from glmdeploy.problems import Problem

MAX_EXTRA_GPUS = 64
MAX_CPU_MEMORY_GIB = 2**20  # the schema's maximum of placement.cpu_memory_gib (a test keeps it so)
_PRECISION_COST = {
    Dtype.BF16: "bf16 keeps fp32's range with fewer digits, rarely noticeable in inference",
    Quantization.INT8: "8-bit weights (LLM.int8): some loss of quality, slower decoding",
    Quantization.INT4: "4-bit nf4 weights: a larger loss of quality",
}


_gib = size


def _peak(plan: Plan) -> str:
    device = plan.verdict.device
    where = f" on {device_label(device)}" if device is not None else ""
    return f"peak {percent(plan.verdict.utilisation)} of budget{where}"


class Replan(Protocol):
    """The planner (`glmdeploy.planning.strategies.try_plan`), passed in to try each fix."""

    def __call__(
        self,
        deployment: Deployment,
        anatomy: Anatomy,
        devices: Sequence[DeviceSpec],
        *,
        weights_only: bool = False,
    ) -> Plan: ...


_Try = Callable[[Deployment, Sequence[DeviceSpec], bool], Plan]


def does_not_fit_problems(
    deployment: Deployment,
    anatomy: Anatomy,
    devices: Sequence[DeviceSpec],
    plan: Plan,
    replan: Replan,
    *,
    weights_only: bool = False,
    quantization: QuantizationSupport = ASSUMED,
) -> list[Problem]:
    """The shortfall of `plan`; the fixes that make it fit, cheapest first, each with its cost;
    then the changes that would not be enough (without a hint)."""

    def _try(changed: Deployment, specs: Sequence[DeviceSpec], weights: bool) -> Plan:
        return replan(changed, anatomy, specs, weights_only=weights)

    found: list[Problem] = []
    if not weights_only:
        found += _batch_fix(deployment, devices, _try)
        found += _context_fix(deployment, devices, _try)
    found += _precision_fix(deployment, devices, plan, weights_only, _try, quantization)
    found += _gpu_fix(deployment, anatomy, devices, weights_only, _try)
    found += _offload_fix(deployment, devices, weights_only, _try)
    fixes = [p for p in found if p.hint is not None]
    return [_shortfall(plan), *fixes, *(p for p in found if p.hint is None)]


def _shortfall(plan: Plan) -> Problem:
    """How far the plan is from fitting, on the verdict's binding device, then in total."""
    gpus = [r for r in plan.rows if isinstance(r.device, int)]
    over = [r for r in plan.rows if (isinstance(r.device, int) or r.capacity_bytes) and
            r.total_bytes > r.capacity_bytes]  # fmt: skip
    binding = next((r for r in plan.rows if r.device == plan.verdict.device), None)
    weights = f"weights alone {_gib(sum(r.weights_bytes for r in plan.rows))}"
    if gpus:
        need = sum(r.total_bytes - r.reserve_bytes for r in gpus)
        usable = sum(max(0, r.capacity_bytes - r.reserve_bytes) for r in gpus)
        totals = f"all GPUs: {_gib(need)} needed, {_gib(usable)} usable ({weights})"
    else:
        totals = f"no GPU: the CPU runs the model ({weights})"
    if over and binding is not None:
        short = sum(r.total_bytes - r.capacity_bytes for r in over)
        message = (
            f"short by {_gib(short)}: {device_label(binding.device)} ({binding.name}) would need "
            f"{_gib(binding.total_bytes)} of its {_gib(binding.capacity_bytes)}; {totals}"
        )
    else:
        off = [r for r in plan.rows if not isinstance(r.device, int)]
        shown = ", ".join(f"{r.device} {_gib(r.weights_bytes)}" for r in off) or "none"
        message = f"units do not fit where offload may put them (off-GPU: {shown}); {totals}"
    return Problem("placement", message, hint="one of the fixes below, or fewer/larger units")


def _largest_fitting(
    deployment: Deployment, devices: Sequence[DeviceSpec], _try: _Try, key: str
) -> tuple[int, int | None]:
    """`runtime.<key>` now, and the largest smaller value that fits (None: not even 1)."""
    runtime = deployment.runtime
    now: int = getattr(runtime, key)

    def fits(value: int) -> bool:
        change: dict[str, Any] = {key: value}
        changed = replace(deployment, runtime=replace(runtime, **change))
        return _try(changed, devices, False).fits

    if now <= 1 or not fits(1):
        return now, None
    lo, hi = 1, now  # fits(lo), not fits(hi); fitting is monotone in both keys
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return now, lo


def _batch_fix(deployment: Deployment, devices: Sequence[DeviceSpec], _try: _Try) -> list[Problem]:
    now, best = _largest_fitting(deployment, devices, _try, "batch_size")
    if best is None:
        return []
    ratio = now / best
    return [
        Problem(
            "runtime.batch_size",
            f"fits with at most {best} sequence(s) at once (now {now}); cost: up to "
            f"{ratio:.1f}× lower throughput".replace(".0×", "×"),
            hint=f"runtime.batch_size={best}",
        )
    ]


def _context_fix(
    deployment: Deployment, devices: Sequence[DeviceSpec], _try: _Try
) -> list[Problem]:
    now, best = _largest_fitting(deployment, devices, _try, "max_context_tokens")
    if best is None:
        return []
    value = best // 256 * 256 or best
    if value <= deployment.runtime.max_new_tokens:  # no room left for a prompt: not a fix
        return []
    return [
        Problem(
            "runtime.max_context_tokens",
            f"fits with at most {best} tokens of context (now {now}); cost: prompts and answers "
            f"{1 - value / now:.0%} shorter ({value} tokens)",
            hint=f"runtime.max_context_tokens={value}",
        )
    ]


def _precision_fix(
    deployment: Deployment,
    devices: Sequence[DeviceSpec],
    plan: Plan,
    weights_only: bool,
    _try: _Try,
    quantization: QuantizationSupport,
) -> list[Problem]:
    current = deployment.precision
    options: list[Precision] = []
    if current.dtype is Dtype.FP32 or plan.fingerprint.dtype == Dtype.FP32:
        options.append(Precision(Dtype.BF16, current.quantization))
    if quantization.runs and current.quantization is Quantization.NONE:
        options.append(replace(current, quantization=Quantization.INT8))
    if quantization.runs and current.quantization is not Quantization.INT4:
        options.append(replace(current, quantization=Quantization.INT4))
    before = sum(r.weights_bytes for r in plan.rows)
    last: tuple[Precision, Plan] | None = None
    for option in options:
        candidate = _try(replace(deployment, precision=option), devices, weights_only)
        last = (option, candidate)
        if candidate.fits:
            break
    if last is None:
        return []
    option, candidate = last
    quantised = option.quantization is not current.quantization
    path = "precision.quantization" if quantised else "precision.dtype"
    value = str(option.quantization if quantised else option.dtype)
    weights = f"the weights take {_gib(sum(r.weights_bytes for r in candidate.rows))}"
    if not candidate.fits:
        message = f"even with {value} ({weights}, now {_gib(before)}) it does not fit"
        return [Problem(path, message)]
    cost = _PRECISION_COST[option.quantization if quantised else option.dtype]
    if quantised and quantization.missing_here:
        cost += f"; this machine lacks {' and '.join(quantization.missing_here)}: plan only"
    return [
        Problem(
            path,
            f"with {value} {weights} (now {_gib(before)}) and it fits ({_peak(candidate)}); "
            f"cost: {cost}",
            hint=f"{path}={value}",
        )
    ]


def _gpu_fix(
    deployment: Deployment,
    anatomy: Anatomy,
    devices: Sequence[DeviceSpec],
    weights_only: bool,
    _try: _Try,
) -> list[Problem]:
    gpus = [d for d in devices if isinstance(d.key, int)]
    if not gpus:
        return []
    largest = max(gpus, key=lambda d: d.capacity_bytes)
    others = [d for d in devices if not isinstance(d.key, int)]
    strategy = deployment.placement.strategy
    if strategy in (Strategy.EXPLICIT, Strategy.TRANSFORMERS, Strategy.PLAN_FILE):
        strategy = Strategy.BALANCED
    balanced = replace(deployment, placement=replace(deployment.placement, strategy=strategy))
    next_key = max(int(d.key) for d in gpus) + 1
    for n in range(len(gpus) + 1, len(gpus) + MAX_EXTRA_GPUS + 1):
        extra = [
            DeviceSpec(next_key + j, next_key + j, largest.name, largest.capacity_bytes)
            for j in range(n - len(gpus))
        ]
        candidate = _try(balanced, [*gpus, *extra, *others], weights_only)
        if candidate.fits:
            return [
                Problem(
                    "gpus",
                    f"{n} GPUs of {_gib(largest.capacity_bytes)} would fit ({_peak(candidate)}, "
                    f"strategy {strategy}); cost: {n - len(gpus)} more GPU(s), "
                    f"{len(candidate.hops)} hop(s) per forward pass",
                    hint=f"select {n} such GPUs (gpus.ids, or gpus.declared to plan for them)",
                )
            ]
    from glmdeploy.planning.memory import deployment_memory

    mm = deployment_memory(deployment, anatomy, gpus=True, weights_only=weights_only)
    # The unit that needs the most on a GPU of its own: weights, KV cache and its workspace.
    need = [(w + kv + ws, ws) for w, kv, ws in
            zip(mm.unit_weights, mm.unit_kv, mm.unit_workspace, strict=True)]  # fmt: skip
    total, work = max(need)
    return [
        Problem(
            "gpus",
            f"no number of {_gib(largest.capacity_bytes)} GPUs fits: one GPU needs "
            f"{_gib(work)} of workspace plus {_gib(total - work)} for its largest unit, and has "
            f"{_gib(largest.capacity_bytes - mm.reserve)} usable",
        )
    ]


def _offload_fix(
    deployment: Deployment, devices: Sequence[DeviceSpec], weights_only: bool, _try: _Try
) -> list[Problem]:
    """The first offload that fits, on the devices the plan with it would see (this machine's RAM
    and disk, not unlimited ones). Where only this machine's RAM is short, the offload is offered
    with the RAM it needs (`placement.cpu_memory_gib`): the machine that runs it may have it."""
    placement = deployment.placement
    if placement.strategy in (Strategy.EXPLICIT, Strategy.TRANSFORMERS):
        return []
    order = [Offload.NONE, Offload.CPU, Offload.DISK]  # each allows more off-GPU devices
    for target in order[order.index(placement.offload) + 1 :]:
        changed = replace(deployment, placement=replace(placement, offload=target))
        known = {d.key for d in devices}
        specs = [*devices, *(offload_spec(changed, k) for k in target.devices if k not in known)]
        candidate, ram_hint = _try(changed, specs, weights_only), ""
        short = next((r for r in candidate.rows if r.device == "cpu"
                      and r.total_bytes > r.capacity_bytes), None)  # fmt: skip
        if short is not None and placement.cpu_memory_gib is None:
            gib = math.ceil(short.total_bytes / GIB)
            if gib <= MAX_CPU_MEMORY_GIB:  # the schema's bound
                more = replace(changed.placement, cpu_memory_gib=gib)
                candidate = _try(replace(changed, placement=more), specs, weights_only)
                ram_hint = f" ++placement.cpu_memory_gib={gib}"  # ++: set or add
        if not candidate.fits:
            continue
        costs = [n for n in candidate.notes if n.startswith(("offload:", "no unit is on a GPU"))]
        ram = sum(r.total_bytes for r in candidate.rows if r.device == "cpu")
        needs = f"it needs {_gib(ram)} of RAM"
        if short is not None:
            needs += f", more than the {_gib(short.capacity_bytes)} this machine gives it"
        return [
            Problem(
                "placement.offload",
                f"offload={target} fits; cost: "
                f"{'; '.join(c.removeprefix('offload: ') for c in costs)}; {needs}",
                hint=f"placement.offload={target}{ram_hint}",
            )
        ]
    return []
