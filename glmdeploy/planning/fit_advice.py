"""Explains a plan that does not fit: the shortfall in GiB and the cheapest fixes, in numbers.

Each fix is checked by planning again with one setting changed (other precision, more GPUs of the
largest selected size, a shorter context, offload), so every number it quotes is a real plan's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from glmdeploy.config.settings import (
    GIB,
    Deployment,
    Dtype,
    Offload,
    Precision,
    Quantization,
    Strategy,
)
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.planning.types import DeviceSpec, Plan, device_label
from glmdeploy.problems import Problem

MAX_EXTRA_GPUS = 64


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


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
) -> list[Problem]:
    """The shortfall of `plan`, then each fix that would make it fit (or how far it gets)."""

    def _try(changed: Deployment, specs: Sequence[DeviceSpec], weights: bool) -> Plan:
        return replan(changed, anatomy, specs, weights_only=weights)

    problems = [_shortfall(plan)]
    problems += _precision_fix(deployment, devices, plan, weights_only, _try)
    problems += _gpu_fix(deployment, anatomy, devices, weights_only, _try)
    if not weights_only:
        problems += _context_fix(deployment, devices, _try)
    problems += _offload_fix(deployment, devices, weights_only, _try)
    return problems


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


def _precision_fix(
    deployment: Deployment,
    devices: Sequence[DeviceSpec],
    plan: Plan,
    weights_only: bool,
    _try: _Try,
) -> list[Problem]:
    current = deployment.precision
    options: list[Precision] = []
    if current.dtype is Dtype.FP32 or plan.fingerprint.dtype == Dtype.FP32:
        options.append(Precision(Dtype.BF16, current.quantization))
    if current.quantization is Quantization.NONE:
        options.append(replace(current, quantization=Quantization.INT8))
    if current.quantization is not Quantization.INT4:
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
    weights = sum(r.weights_bytes for r in candidate.rows)
    verdict = (
        f"fits (max utilisation {candidate.max_utilisation:.2f})"
        if candidate.fits
        else "still does not fit"
    )
    path, value = (
        ("precision.dtype", str(option.dtype))
        if option.quantization is current.quantization
        else ("precision.quantization", str(option.quantization))
    )
    return [
        Problem(
            path,
            f"with {value} the weights take {_gib(weights)} (now {_gib(before)}): {verdict}",
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
                    f"{n} GPUs of {_gib(largest.capacity_bytes)} would fit "
                    f"(max utilisation {candidate.max_utilisation:.2f}, strategy {strategy})",
                    hint=f"select {n} such GPUs (gpus.ids or a declared fleet)",
                )
            ]
    from glmdeploy.planning.memory import memory_model

    mm = memory_model(anatomy, deployment.precision, deployment.runtime, deployment.placement,
                      weights_only=weights_only)  # fmt: skip
    unit = max(w + kv for w, kv in zip(mm.unit_weights, mm.unit_kv, strict=True))
    return [
        Problem(
            "gpus",
            f"no number of {_gib(largest.capacity_bytes)} GPUs fits: one GPU needs "
            f"{_gib(mm.activations)} of workspace plus {_gib(unit)} for its largest unit, and has "
            f"{_gib(largest.capacity_bytes - mm.reserve)} usable",
        )
    ]


def _context_fix(
    deployment: Deployment, devices: Sequence[DeviceSpec], _try: _Try
) -> list[Problem]:
    runtime = deployment.runtime
    current = runtime.max_context_tokens

    def fits(tokens: int) -> bool:
        changed = replace(deployment, runtime=replace(runtime, max_context_tokens=tokens))
        return _try(changed, devices, False).fits

    if current <= 1 or not fits(1):
        return []
    lo, hi = 1, current  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return [
        Problem(
            "runtime.max_context_tokens",
            f"fits with at most {lo} tokens of context (now {current})",
            hint=f"runtime.max_context_tokens={lo // 256 * 256 or lo}",
        )
    ]


def _offload_fix(
    deployment: Deployment, devices: Sequence[DeviceSpec], weights_only: bool, _try: _Try
) -> list[Problem]:
    placement = deployment.placement
    if placement.strategy in (Strategy.EXPLICIT, Strategy.TRANSFORMERS):
        return []
    target = {Offload.NONE: Offload.CPU, Offload.CPU: Offload.DISK}.get(placement.offload)
    if target is None:
        return []
    changed = replace(deployment, placement=replace(placement, offload=target))
    candidate = _try(changed, devices, weights_only)
    if not candidate.fits:
        return []
    costs = [n for n in candidate.notes if n.startswith(("offload:", "no unit is on a GPU"))]
    return [
        Problem(
            "placement.offload",
            f"offload={target} fits: {'; '.join(c.removeprefix('offload: ') for c in costs)}",
            hint=f"placement.offload={target}",
        )
    ]
