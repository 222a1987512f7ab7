"""What exists (probed, or a declared fleet) and what to use (all, ids, least used) combine freely.

The origin scenario, "a server with 8 GPUs; use physical GPUs 2 and 3", plans on any machine, and
rows name GPUs as the real run would see them (`GPU 2 → cuda:0`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import glmdeploy
from glmdeploy.config.settings import GIB, DeclaredGpu, GpuMode, GpuSelection
from glmdeploy.hardware.doctor import collect_report, render_report
from glmdeploy.hardware.gpu_select import existing_gpus, select_gpus
from glmdeploy.hardware.nvml import HardwareSnapshot, declared_snapshot
from glmdeploy.problems import ConfigError, HardwareError

H100 = DeclaredGpu("H100 80GB", 80, (9, 0))
EIGHT = (H100,) * 8
NO_MACHINE = HardwareSnapshot((), None, None, "NVML Shared Library Not Found", "none")
ORIGIN = ["model=chatglm3-6b", "gpus=8x80gib", "gpus.ids=[2,3]", "precision=bf16"]


def fleet_select(env: dict[str, str] | None = None, **selection: Any) -> Any:
    chosen = GpuSelection(declared=EIGHT, **selection)
    return select_gpus(chosen, existing_gpus(chosen, lambda: NO_MACHINE), env or {})


def test_what_exists_is_the_declared_fleet_else_the_machine_else_nothing() -> None:
    probed = HardwareSnapshot((), "550", "12.4", None, "nvml")
    assert existing_gpus(GpuSelection(GpuMode.AUTO, declared=EIGHT), lambda: probed).ids == tuple(
        range(8)
    )
    assert existing_gpus(GpuSelection(GpuMode.AUTO), lambda: probed) is probed
    assert existing_gpus(GpuSelection(GpuMode.CPU), lambda: probed).source == "none"


def test_physical_ids_of_a_declared_fleet_become_logical_in_ascending_order() -> None:
    a = fleet_select(mode=GpuMode.IDS, ids=(3, 2), max_memory_gib={3: 40})
    assert a.source == "declared" and a.physical_ids == (2, 3)
    assert [d.logical_id for d in a.devices] == [0, 1]
    assert a.capacity_bytes == {2: 80 * GIB, 3: 40 * GIB}
    assert a.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3"}


def test_cuda_visible_devices_restricts_a_declared_fleet_too() -> None:
    a = fleet_select({"CUDA_VISIBLE_DEVICES": "2,3"}, mode=GpuMode.AUTO)
    assert a.physical_ids == (2, 3) and [d.logical_id for d in a.devices] == [0, 1]
    b = fleet_select({"CUDA_VISIBLE_DEVICES": "5,6,7"}, mode=GpuMode.LEAST_USED, count=2)
    assert b.physical_ids == (5, 6)
    with pytest.raises(HardwareError) as caught:
        fleet_select({"CUDA_VISIBLE_DEVICES": "2,3"}, mode=GpuMode.IDS, ids=(1,))
    assert "hidden by CUDA_VISIBLE_DEVICES=2,3" in caught.value.problems[0].message


def test_ids_outside_the_declared_fleet_say_so() -> None:
    with pytest.raises(HardwareError) as caught:
        fleet_select(mode=GpuMode.IDS, ids=(9,))
    (problem,) = caught.value.problems
    assert problem.message == "GPU 9 is not in the declared fleet"
    assert problem.expected == "declared: 0, 1, 2, 3, 4, 5, 6, 7"


def test_the_origin_scenario_composes_validates_and_plans_anywhere(
    cli: Any, tmp_path: Path
) -> None:
    dep = glmdeploy.compose(ORIGIN)
    assert dep.gpus.mode is GpuMode.IDS and dep.gpus.ids == (2, 3) and len(dep.gpus.declared) == 8
    assert dep.summary().startswith("chatglm3-6b on GPUs 2, 3 of 8 × 80 GiB (declared)")
    planned = glmdeploy.plan(dep)
    assert [r.device for r in planned.plan.rows] == [2, 3]
    shown = cli("plan", *ORIGIN, "placement=balanced", f"hydra.run.dir={tmp_path}")
    assert shown.code == 0, shown.err
    assert "GPU 2 → cuda:0" in shown.out and "GPU 3 → cuda:1" in shown.out
    assert "GPU 0" not in shown.out


def test_least_used_count_on_a_declared_fleet() -> None:
    dep = glmdeploy.compose(["gpus=4x24gib", "gpus.count=2"])
    assert dep.gpus.mode is GpuMode.LEAST_USED and dep.gpus.count == 2
    assert [r.device for r in glmdeploy.plan(dep).plan.rows] == [0, 1]


def test_cuda_visible_devices_on_a_declared_fleet_end_to_end(
    cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    shown = cli("plan", "gpus=8x80gib", "model=chatglm3-6b", f"hydra.run.dir={tmp_path}")
    assert shown.code == 0, shown.err
    assert "GPU 2 → cuda:0" in shown.out and "GPU 3 → cuda:1" in shown.out
    assert "GPU 0 → " not in shown.out


def test_the_shipped_origin_profile_plans_on_gpus_2_and_3() -> None:
    planned = glmdeploy.plan(["profile=chatglm3-6b-gpus-2-3-of-8"])
    assert {d for d in planned.plan.device_map.values()} == {2, 3}
    assert [(d.physical_id, d.logical_id) for d in planned.assignment.devices] == [(2, 0), (3, 1)]


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        (["gpus=8x80gib", "gpus.ids=[2,9]"], "gpus.ids", "GPU 9 is not in the declared fleet"),
        (["gpus=2x24gib", "gpus.count=3"], "gpus.count", "3 GPUs requested"),
        (["gpus=8x80gib", "gpus.ids=[2,3]", "gpus.count=2"], "gpus.count", "not both"),
        (["gpus=least_used", "+gpus.ids=[2,3]"], "gpus.ids", "only used with"),
        (["gpus=8x80gib", "gpus.ids=[2,3]", "gpus.max_memory_gib={0: 20}"],
         "gpus.max_memory_gib.0", "not selected"),
    ],
)  # fmt: skip
def test_selections_that_cannot_be_made_are_config_errors(
    overrides: list[str], path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        glmdeploy.compose(overrides)
    assert any(p.path == path and message in p.message for p in caught.value.problems), [
        (p.path, p.message) for p in caught.value.problems
    ]


def test_a_legacy_declared_mode_still_means_all_of_the_fleet() -> None:
    config = glmdeploy.api.compose_config(["gpus=2x24gib"])
    config["gpus"]["mode"] = "declared"
    dep = glmdeploy.validate(config)
    assert dep.gpus.mode is GpuMode.AUTO and len(dep.gpus.declared) == 2
    del config["gpus"]["mode"]  # a fleet file may give just `declared:`
    assert glmdeploy.validate(config).gpus == dep.gpus


def test_declared_gpus_cannot_be_loaded() -> None:
    with pytest.raises(HardwareError, match="declared GPUs are for planning"):
        glmdeploy.load(["gpus=2x24gib", "gpus.ids=[1]", "precision=bf16"])


def test_doctor_shows_the_declared_selection_as_the_run_would_see_it() -> None:
    dep = glmdeploy.compose(ORIGIN)
    report = collect_report(dep, environ={}, torch_cuda=None)
    assert report.selection is not None and report.selection.physical_ids == (2, 3)
    assert "- selection (ids, declared fleet): GPU 2 -> cuda:0, GPU 3 -> cuda:1" in render_report(
        report
    )
    assert report.hardware.source != "declared"  # the machine itself is still reported


def test_declared_snapshot_numbers_gpus_from_zero() -> None:
    assert declared_snapshot(EIGHT).ids == tuple(range(8))
