"""Placement: exact maps for invented budgets, optimality against brute force, fixes, no CUDA."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmdeploy.config.settings import (
    GIB,
    Dtype,
    GpuMode,
    GpuSelection,
    MapEntry,
    Offload,
    Placement,
    Precision,
    Quantization,
    Runtime,
    Strategy,
)
from glmdeploy.model.anatomy import Anatomy, Tally, TiedGroup, Unit
from glmdeploy.planning.memory import activation_bytes, logits_bytes, memory_model
from glmdeploy.planning.partition import min_max_split
from glmdeploy.planning.strategies import (
    AUTO_TARGET,
    current_fingerprint,
    plan_placement,
    try_plan,
)
from glmdeploy.planning.types import (
    DeviceSpec,
    Plan,
    PlanDoesNotFit,
    device_map_for_transformers,
    summarise,
)
from glmdeploy.problems import ConfigError

from builders import make_deployment


def unit(name: str, kind: str, size: int, numel: bool, layer: int | None = None) -> Unit:
    """A unit of `size` bytes (dtype-independent), or `size` elements in the compute dtype."""
    params = (
        Tally(compute=size, linear=size if kind == "block" else 0)
        if numel
        else Tally(other_bytes=size)
    )
    return Unit(
        name, kind, kind, layer, size, params, Tally(), Tally(), (f"{name}.weight",), (name,)
    )


def synthetic(
    blocks: Sequence[int], embed: int = 100, norm: int = 10, head: int = 100, *,
    tied: bool = False, numel: bool = False, kv_heads: int = 1, vocab: int = 1,
) -> Anatomy:  # fmt: skip
    units = (
        unit("model.embed_tokens", "embedding", embed, numel),
        *(unit(f"model.layers.{i}", "block", b, numel, i) for i, b in enumerate(blocks)),
        unit("model.norm", "norm", norm, numel),
        unit("lm_head", "head", 0 if tied else head, numel),
    )
    group = TiedGroup(
        ("lm_head.weight", "model.embed_tokens.weight"), ("model.embed_tokens", "lm_head")
    )
    return Anatomy(
        model_type="synthetic", model_class="SyntheticForCausalLM",
        config_hash=f"synthetic-{len(blocks)}", units=units, order_source="traced",
        no_split_classes=("block",), tied_groups=(group,) if tied else (),
        containers=("model", "model.layers"), hidden_size=1, intermediate_size=1,
        vocab_size=vocab, num_attention_heads=1, num_key_value_heads=kv_heads, head_dim=1,
        config_dtype=None,
    )  # fmt: skip


def gpus(*sizes: int, ids: Sequence[int] | None = None) -> list[DeviceSpec]:
    keys = list(ids) if ids is not None else list(range(len(sizes)))
    return [DeviceSpec(k, k, f"GPU{k}", s) for k, s in zip(keys, sizes, strict=True)]


# Planner cases: no reserve, one token of context and nothing generated unless a test says so.
deployment = partial(
    make_deployment, name="test", reserve_gib=0.0, max_context_tokens=1, max_new_tokens=0
)


def layout(plan: Plan) -> dict[Any, str]:
    return {row.device: row.units for row in plan.rows}


E, L, N, H = "model.embed_tokens", "model.layers", "model.norm", "lm_head"


@pytest.mark.parametrize(
    ("strategy", "layers", "fleet", "expected"),
    [
        ("balanced", 4, {0: 400, 1: 400}, {0: f"{E}, {L}.0-1", 1: f"{L}.2-3, {N}, {H}"}),
        ("balanced", 4, {0: 200, 1: 500}, {0: f"{E}, {L}.0", 1: f"{L}.1-3, {N}, {H}"}),
        ("balanced", 4, {0: 1000, 1: 1000, 2: 1000},
         {0: f"{E}, {L}.0", 1: f"{L}.1-2", 2: f"{L}.3, {N}, {H}"}),
        ("balanced", 4, {0: 50, 1: 1000}, {0: "", 1: f"{E}, {L}.0-3, {N}, {H}"}),
        ("balanced", 2, {5: 300, 2: 300}, {5: f"{E}, {L}.0", 2: f"{L}.1, {N}, {H}"}),
        ("sequential", 4, {0: 350, 1: 1000}, {0: f"{E}, {L}.0-1", 1: f"{L}.2-3, {N}, {H}"}),
        ("sequential", 4, {0: 1000, 1: 1000}, {0: f"{E}, {L}.0-3, {N}, {H}", 1: ""}),
        ("balanced_low_0", 4, {0: 500, 1: 500}, {0: f"{E}, {L}.0", 1: f"{L}.1-3, {N}, {H}"}),
        ("balanced_low_0", 4, {3: 500, 1: 500}, {3: f"{E}, {L}.0", 1: f"{L}.1-3, {N}, {H}"}),
        ("auto", 4, {0: 1000, 1: 1000, 2: 1000, 3: 1000},
         {0: f"{E}, {L}.0-3, {N}, {H}", 1: "", 2: "", 3: ""}),
        ("auto", 4, {0: 400, 1: 400, 2: 400, 3: 400},
         {0: f"{E}, {L}.0-1", 1: f"{L}.2-3, {N}, {H}", 2: "", 3: ""}),
    ],
)  # fmt: skip
def test_exact_maps_for_invented_budgets(
    strategy: str, layers: int, fleet: dict[int, int], expected: dict[int, str]
) -> None:
    anatomy = synthetic([100] * layers)
    devices = gpus(*fleet.values(), ids=list(fleet))
    plan = plan_placement(
        deployment(strategy, gpu0_free_fraction=0.5), anatomy, devices, weights_only=True
    )
    assert layout(plan) == expected
    assert list(plan.device_map) == list(anatomy.names)
    assert plan.fits


def test_tied_head_stays_with_the_embedding_and_is_counted_there() -> None:
    anatomy = synthetic([100] * 4, tied=True)
    plan = plan_placement(deployment(), anatomy, gpus(1000, 1000), weights_only=True)
    assert layout(plan) == {0: f"{E}, {L}.0-1, {H}", 1: f"{L}.2-3, {N}"}
    assert [(h.before, h.after) for h in plan.hops] == [(f"{L}.1", f"{L}.2"), (N, H)]
    assert [r.weights_bytes for r in plan.rows] == [300, 210]
    assert any("tied" in note for note in plan.notes)


def test_auto_uses_the_fewest_gpus_under_the_target() -> None:
    anatomy = synthetic([100] * 4)
    plan = plan_placement(deployment("auto"), anatomy, gpus(400, 400, 400, 400), weights_only=True)
    assert AUTO_TARGET >= 310 / 400  # two GPUs reach the target, one does not
    assert sum(1 for r in plan.rows if r.units) == 2
    assert plan.notes[0].startswith("auto: 2 of 4 GPUs")


def test_kv_workspace_and_reserve_are_counted_per_device() -> None:
    anatomy = synthetic([100] * 4, kv_heads=3, vocab=5)
    plan = plan_placement(
        deployment(max_context_tokens=10, reserve_gib=1e-7), anatomy, gpus(5000, 5000, 5000)
    )
    runtime = Runtime(10, max_new_tokens=0)
    mm = memory_model(anatomy, Precision(Dtype.BF16), runtime, Placement(
        Strategy.BALANCED, reserve_gib=1e-7))  # fmt: skip
    # A synthetic anatomy has no config to trace: the historical formula, composed as it was:
    # activations on every GPU holding a unit, the logits on top where the final norm/head are.
    activations = activation_bytes(anatomy, runtime, Dtype.BF16)
    logits = logits_bytes(anatomy, runtime, Dtype.BF16)
    assert plan.workspace is not None and plan.workspace.method == "formula"
    assert any(n.startswith("workspace: historical formula, not exact") for n in plan.notes)
    kv_layer = 1 * 10 * 3 * 1 * 2 * 2
    for row in plan.rows:
        layers = sum(1 for u in anatomy.blocks if plan.device_map[u.name] == row.device)
        assert row.kv_bytes == layers * kv_layer
        head_here = row.device in (plan.device_map[N], plan.device_map[H])
        assert row.workspace_bytes == (activations if row.units else 0) + (
            logits if head_here else 0
        )
        assert row.reserve_bytes == mm.reserve
        assert (
            row.total_bytes == row.weights_bytes + row.kv_bytes + row.workspace_bytes + mm.reserve
        )
        assert row.utilisation == pytest.approx(
            (row.total_bytes - mm.reserve) / (row.capacity_bytes - mm.reserve)
        )


def test_user_caps_lower_capacity() -> None:
    anatomy = synthetic([100] * 4)
    plan = plan_placement(
        deployment(gpus=GpuSelection(GpuMode.AUTO, max_memory_gib={0: 250 / GIB})),
        anatomy,
        gpus(1000, 1000),
        weights_only=True,
    )
    assert plan.rows[0].capacity_bytes == 250
    assert layout(plan) == {0: E, 1: f"{L}.0-3, {N}, {H}"}  # 100/250 and 510/1000


def brute_force(loads: Sequence[int], budgets: Sequence[int], always: Sequence[int],
                if_used: Sequence[int], peaks: Sequence[int] | None = None,
                floors: Sequence[int] | None = None) -> float:  # fmt: skip
    n, best = len(loads), math.inf
    peaks = peaks or [0] * n
    floors = floors or [0] * len(budgets)
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(budgets) - 1):
        bounds = [0, *cuts, n]
        worst = 0.0
        for d, budget in enumerate(budgets):
            run = range(bounds[d], bounds[d + 1])
            load = always[d] + max([floors[d], *(peaks[i] for i in run)])
            load += if_used[d] + sum(loads[i] for i in run) if run else 0
            worst = max(worst, load / budget if budget > 0 else (math.inf if load else 0.0))
        best = min(best, worst)
    return best


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(1, 100), st.integers(0, 80)), max_size=8),
    devices=st.lists(
        st.tuples(st.integers(0, 300), st.integers(0, 30), st.integers(0, 30),
                  st.integers(0, 40)),
        min_size=1,
        max_size=4,
    ),
    with_peaks=st.booleans(),
)  # fmt: skip
def test_min_max_split_is_optimal(
    items: list[tuple[int, int]], devices: list[tuple[int, int, int, int]], with_peaks: bool
) -> None:
    """Loads add up on a device; peaks (workspace) count once, the largest (and floors)."""
    loads = [w for w, _ in items]
    peaks = [p for _, p in items] if with_peaks else None
    budgets, always, if_used, floors = (list(x) for x in zip(*devices, strict=True))
    floors = floors if with_peaks else None
    bounds, util = min_max_split(loads, budgets, always, if_used, peaks, floors)
    best = brute_force(loads, budgets, always, if_used, peaks, floors)
    if math.isinf(best):
        assert math.isinf(util)
        return
    assert util == pytest.approx(best, rel=1e-9)
    assert bounds[0] == 0 and bounds[-1] == len(loads) and bounds == sorted(bounds)


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    sizes=st.lists(st.integers(300, 3000), min_size=1, max_size=3),
    tied=st.booleans(),
    context=st.integers(1, 40),
)
def test_balanced_plans_are_optimal(
    blocks: list[int], sizes: list[int], tied: bool, context: int
) -> None:
    anatomy = synthetic(blocks, embed=150, head=120, tied=tied, kv_heads=2, vocab=3)
    plan = try_plan(deployment(max_context_tokens=context), anatomy, gpus(*sizes))
    mm = memory_model(anatomy, Precision(Dtype.BF16), Runtime(context, max_new_tokens=0),
                      Placement(Strategy.BALANCED, reserve_gib=0))  # fmt: skip
    names = [n for n in anatomy.names if not (tied and n == H)]
    cost = [mm.unit_weights[anatomy.index(n)] + mm.unit_kv[anatomy.index(n)] for n in names]
    peaks = [mm.unit_workspace[anatomy.index(n)] for n in names]
    if tied:  # the head runs where the embedding is
        peaks[names.index(E)] = mm.unit_workspace[anatomy.index(H)]
    best = brute_force(cost, sizes, [0] * len(sizes), [0] * len(sizes), peaks)
    assert plan.max_utilisation == pytest.approx(best, rel=1e-9)


def test_does_not_fit_gives_the_shortfall_and_fixes_in_numbers() -> None:
    anatomy = synthetic([GIB // 2] * 8, embed=GIB // 2, head=GIB // 2, norm=1, numel=True)  # 10 GiB
    with pytest.raises(PlanDoesNotFit) as caught:
        plan_placement(deployment(max_context_tokens=1), anatomy, gpus(4 * GIB, 4 * GIB))
    by_path = {p.path: p for p in caught.value.problems}
    assert by_path["placement"].message.startswith("short by")
    assert "8.0 GiB usable" in by_path["placement"].message
    assert by_path["precision.quantization"].message.startswith(
        "with int8 the weights take 6.0 GiB"
    )
    assert by_path["precision.quantization"].hint == "precision.quantization=int8"
    assert by_path["gpus"].message.startswith("4 GPUs of 4.0 GiB would fit")
    assert by_path["placement.offload"].hint == "placement.offload=cpu"
    assert "ms/token" in by_path["placement.offload"].message
    assert not caught.value.plan.fits and caught.value.exit_code == 5


def test_shorter_context_is_suggested_when_the_kv_cache_is_the_problem() -> None:
    anatomy = synthetic([100] * 4, kv_heads=50)  # 200 bytes of KV per layer per token
    with pytest.raises(PlanDoesNotFit) as caught:
        plan_placement(deployment(max_context_tokens=10), anatomy, gpus(2000, 2000))
    fix = next(p for p in caught.value.problems if p.path == "runtime.max_context_tokens")
    assert fix.message.startswith("fits with at most 4 tokens")
    assert plan_placement(deployment(max_context_tokens=4), anatomy, gpus(2000, 2000)).fits
    assert not try_plan(deployment(max_context_tokens=5), anatomy, gpus(2000, 2000)).fits


def test_offload_moves_the_tail_to_cpu_then_disk_with_its_cost() -> None:
    anatomy = synthetic([100] * 6)
    devices = [*gpus(450), DeviceSpec("cpu", None, "RAM", 250)]
    plan = plan_placement(deployment(offload=Offload.DISK), anatomy, devices, weights_only=True)
    assert layout(plan) == {0: f"{E}, {L}.0-1", "cpu": f"{L}.2-3", "disk": f"{L}.4-5, {N}, {H}"}
    assert plan.rows[0].workspace_bytes == 100  # streaming buffer for the largest offloaded unit
    assert plan.offloaded_bytes == 510 and any("ms/token" in n for n in plan.notes)
    with pytest.raises(PlanDoesNotFit):
        plan_placement(deployment(), anatomy, devices, weights_only=True)


def test_explicit_maps_are_checked_then_budgeted() -> None:
    anatomy = synthetic([100] * 4)
    entries = (MapEntry((E, f"{L}.0-2"), 7), MapEntry((f"{L}.3", N, H), 9))
    plan = plan_placement(
        deployment("explicit", map=entries),
        anatomy,
        gpus(500, 500, ids=[7, 9]),
        weights_only=True,
    )
    assert layout(plan) == {7: f"{E}, {L}.0-2", 9: f"{L}.3, {N}, {H}"}
    with pytest.raises(ConfigError) as caught:
        plan_placement(deployment("explicit", map=entries), anatomy, gpus(500, 500))
    assert {p.path for p in caught.value.problems} == {
        "placement.map[0].device",
        "placement.map[1].device",
    }


def test_transformers_strategy_reproduces_transformers_map() -> None:
    from transformers import AutoConfig

    from glmdeploy.model.skeleton import build_anatomy, meta_model
    from glmdeploy.planning.transformers_map import transformers_device_map

    cfg = AutoConfig.for_model(
        "glm", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=None,
    )  # fmt: skip
    anatomy = build_anatomy(cfg)
    total = anatomy.total_bytes(Dtype.BF16)
    plan = try_plan(deployment("transformers"), anatomy, gpus(total // 2, total // 2, total // 2))
    raw = transformers_device_map(meta_model(cfg), {0: total // 2, 1: total // 2, 2: total // 2})
    for name, device in plan.device_map.items():
        assert raw.get(name, raw.get("model.layers")) == device or name in raw
    assert set(plan.device_map) == set(anatomy.names)
    assert "transformers" in plan.notes[0]


def test_plans_round_trip_and_refuse_another_fingerprint() -> None:
    anatomy = synthetic([100] * 4, tied=True)
    plan = plan_placement(deployment(), anatomy, gpus(1000, 1000))
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert device_map_for_transformers(again) == dict(plan.device_map)
    assert plan.fingerprint.mismatches(again.fingerprint) == []
    current = current_fingerprint(deployment(), anatomy, gpus(1000, 1000))
    assert current == plan.fingerprint
    other = plan_placement(deployment(precision=Dtype.FP16), anatomy, gpus(1000, 900))
    paths = {p.path for p in plan.fingerprint.mismatches(other.fingerprint)}
    assert paths == {"precision.dtype", "runtime.kv_cache_dtype", "gpus"}


def test_summaries_compress_layer_ranges() -> None:
    names = [E, f"{L}.0", f"{L}.1", f"{L}.2", f"{L}.5", N, f"{L}.6"]
    assert summarise(names) == f"{E}, {L}.0-2, {L}.5, {N}, {L}.6"


def test_planning_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoConfig

    from glmdeploy.model.skeleton import build_anatomy

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("CUDA was called while planning")

    for name in ("_lazy_init", "init", "device_count", "mem_get_info", "get_device_properties",
                 "is_available", "set_device", "current_device", "synchronize"):  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, forbidden)
    cfg = AutoConfig.for_model(
        "qwen2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    anatomy = build_anatomy(cfg)
    for strategy in ("balanced", "auto", "balanced_low_0", "sequential"):
        plan = plan_placement(deployment(strategy, max_context_tokens=64), anatomy, gpus(GIB, GIB))
        assert plan.fits
    assert not torch.cuda.is_initialized()


def test_planner_modules_do_not_import_torch() -> None:
    code = (
        "import sys, glmdeploy.planning.strategies, glmdeploy.planning.explicit_map, "
        "glmdeploy.planning.memory, glmdeploy.planning.types; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_no_gpu_runs_on_the_cpu() -> None:
    anatomy = synthetic([100] * 2)
    plan = plan_placement(
        deployment(max_context_tokens=4), anatomy, [DeviceSpec("cpu", None, "RAM", 10**6)]
    )
    assert set(plan.device_map.values()) == {"cpu"} and plan.rows[0].kv_bytes > 0


def test_quantisation_shrinks_block_weights_only() -> None:
    anatomy = synthetic([1000] * 2, embed=1000, head=1000, numel=True)
    precision = Precision(Dtype.BF16, Quantization.INT4)
    plan = plan_placement(deployment(precision=precision), anatomy, gpus(10**6), weights_only=True)
    assert plan.rows[0].weights_bytes == 2 * 1000 * 2 + 2 * 500 + 10 * 2
    assert replace(precision, quantization=Quantization.NONE) == Precision(Dtype.BF16)
