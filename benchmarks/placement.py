"""Benchmark: glmdeploy `balanced` vs transformers' `device_map="auto"`, weights only, same budgets.

For each model and fleet: max-device-load ÷ the best possible (the optimum of the contiguous split
problem, computed here independently by dynamic programming), GPUs used, cross-device hops in
forward order, and plan time (median of N runs, skeleton already built for both). Loads are
load/budget per GPU, so heterogeneous fleets compare utilisation. Prints a Markdown table.

    python benchmarks/placement.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from glmdeploy.config.settings import (
    GIB,
    Deployment,
    Dtype,
    GpuMode,
    GpuSelection,
    ModelSource,
    ModelSpec,
    Placement,
    Precision,
    Runtime,
    SourceKind,
    Strategy,
)
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.skeleton import build_anatomy, meta_model
from glmdeploy.planning.budget import hops
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.planning.transformers_map import transformers_device_map, unit_assignment
from glmdeploy.planning.types import DeviceKey, DeviceSpec, PlanDoesNotFit

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # glm-4-9b-chat-hf is transformers' GlmForCausalLM (model_type glm), like conf/model/
    "GLM-4-9B": ("glm", dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696,
                              num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                              head_dim=128, attention_bias=True)),
    "ChatGLM3-6B": ("glm", dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696,
                                num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=2,
                                head_dim=128, attention_bias=True, pad_token_id=None)),
    "Llama-70B-sized": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=80, num_attention_heads=64,
                                      num_key_value_heads=8)),
    "GLM-4.5-Air-sized": ("glm4_moe", dict(vocab_size=151552, hidden_size=4096,
                                           intermediate_size=10944, num_hidden_layers=46,
                                           num_attention_heads=96, num_key_value_heads=8,
                                           head_dim=128, n_routed_experts=128,
                                           moe_intermediate_size=1408, num_experts_per_tok=8,
                                           n_shared_experts=1, first_k_dense_replace=1)),
}  # fmt: skip
FLEETS: dict[str, list[int]] = {
    "2×24": [24, 24],
    "4×24": [24] * 4,
    "8×80": [80] * 8,
    "10/24/24": [10, 24, 24],
}


def best_split(loads: Sequence[int], budgets: Sequence[int]) -> float:
    """min over contiguous splits (devices in order, runs may be empty) of max load/budget: DP."""
    n = len(loads)
    prefix = [0]
    for w in loads:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: first j units on the devices so far
    for budget in budgets:
        best = [
            min(max(best[i], (prefix[j] - prefix[i]) / budget) for i in range(j + 1))
            for j in range(n + 1)
        ]
    return best[n]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def deployment() -> Deployment:
    return Deployment(
        model=ModelSpec("bench", ModelSource(SourceKind.NONE), None),
        gpus=GpuSelection(GpuMode.AUTO),
        precision=Precision(Dtype.BF16),
        placement=Placement(Strategy.BALANCED, reserve_gib=0.0),
        runtime=Runtime(max_context_tokens=1),
    )


def measure(
    anatomy: Anatomy, assignment: dict[str, DeviceKey], budgets: list[int]
) -> tuple[float, int, int] | None:
    """(max load/budget, GPUs used, hops), or None when something is off-GPU."""
    if any(not isinstance(d, int) for d in assignment.values()):
        return None
    load = [0] * len(budgets)
    for unit in anatomy.units:
        load[int(assignment[unit.name])] += unit.bytes(Dtype.BF16)
    worst = max(w / b for w, b in zip(load, budgets, strict=True))
    return worst, sum(1 for w in load if w), len(hops(anatomy, assignment))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    from transformers import AutoConfig

    header = (
        "| model | fleet (GiB) | weights (GiB) | ratio glmdeploy | ratio transformers "
        "| GPUs used g / t | hops g / t | plan ms g / t |"
    )
    lines = [header, "|" + "---|" * 8]
    skeleton_s: dict[str, float] = {}
    for label, (model_type, kwargs) in MODELS.items():
        cfg = AutoConfig.for_model(model_type, **kwargs)
        start = time.perf_counter()
        anatomy = build_anatomy(cfg)
        skeleton_s[label] = time.perf_counter() - start
        model = meta_model(cfg)
        weights = [u.bytes(Dtype.BF16) for u in anatomy.units]
        for fleet, sizes in FLEETS.items():
            budgets = [s * GIB for s in sizes]
            devices = [
                DeviceSpec(i, i, f"{s} GiB", b)
                for i, (s, b) in enumerate(zip(sizes, budgets, strict=True))
            ]
            optimum = best_split(weights, budgets)
            row = f"| {label} | {fleet} | {sum(weights) / GIB:.1f} |"
            try:
                plan = plan_placement(deployment(), anatomy, devices, weights_only=True)
                ours = measure(anatomy, dict(plan.device_map), budgets)
            except PlanDoesNotFit:
                ours = None
            raw = transformers_device_map(model, dict(enumerate(budgets)))
            theirs = measure(anatomy, unit_assignment(anatomy, raw), budgets)
            if ours is None and theirs is None:
                lines.append(row + " does not fit | does not fit (offloads to disk) | – | – | – |")
                continue
            ms_ours = median_ms(
                partial(plan_placement, deployment(), anatomy, devices, weights_only=True),
                args.repeats,
            )
            ms_theirs = median_ms(
                partial(transformers_device_map, model, dict(enumerate(budgets))), args.repeats
            )
            cells = [
                f"{ours[0] / optimum:.2f}" if ours else "does not fit",
                f"{theirs[0] / optimum:.2f}" if theirs else "offloads to disk",
                f"{ours[1] if ours else '–'} / {theirs[1] if theirs else '–'}",
                f"{ours[2] if ours else '–'} / {theirs[2] if theirs else '–'}",
                f"{ms_ours:.1f} / {ms_theirs:.1f}",
            ]
            lines.append(row + " " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print()
    print("Skeleton build (first call, includes imports for the first model): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in skeleton_s.items()))  # fmt: skip


if __name__ == "__main__":
    main()
