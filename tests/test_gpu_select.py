"""GPU selection: modes, CUDA_VISIBLE_DEVICES rules, physical/logical ids, the CUDA state check."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

from glmdeploy.config.settings import GIB, DeclaredGpu, GpuMode, GpuSelection
from glmdeploy.hardware.gpu_select import (
    AssignedGpu,
    GpuAssignment,
    apply_environment,
    existing_gpus,
    select_gpus,
    to_logical,
    to_physical,
)
from glmdeploy.hardware.nvml import GpuInfo, HardwareSnapshot, declared_snapshot
from glmdeploy.problems import ConfigError, HardwareError, Problem

UUIDS = (
    "GPU-5d1e0a0a-1111-2222-3333-444455556666",
    "GPU-5d2f1b1b-1111-2222-3333-444455556666",
    "GPU-8c3c2c2c-1111-2222-3333-444455556666",
    "GPU-9d4d3d3d-1111-2222-3333-444455556666",
)


def gpu(i: int, name: str, total_gib: int, used_gib: float, cc: tuple[int, int]) -> GpuInfo:
    used = int(used_gib * GIB)
    return GpuInfo(i, name, UUIDS[i], total_gib * GIB, used, total_gib * GIB - used, cc)


# Four GPUs with different memory in use; V100s (cc 7.0) and L40S (cc 8.9) mixed.
FLEET = HardwareSnapshot(
    gpus=(
        gpu(0, "Tesla V100-SXM2-32GB", 32, 20, (7, 0)),
        gpu(1, "NVIDIA L40S", 48, 1, (8, 9)),
        gpu(2, "Tesla V100-SXM2-32GB", 32, 0.5, (7, 0)),
        gpu(3, "NVIDIA L40S", 48, 1, (8, 9)),  # ties with GPU 1 on memory in use
    ),
    driver_version="550.54.15",
    cuda_driver_version="12.4",
    nvml_error=None,
    source="nvml",
)
NO_NVML = HardwareSnapshot((), None, None, "NVML Shared Library Not Found", "none")
PCI = "PCI_BUS_ID"


def select(env: Mapping[str, str] | None = None, **selection: object) -> GpuAssignment:
    return select_gpus(GpuSelection(**selection), FLEET, env or {})  # type: ignore[arg-type]


def problems_of(env: Mapping[str, str] | None = None, **selection: object) -> list[Problem]:
    with pytest.raises((HardwareError, ConfigError)) as caught:
        select(env, **selection)
    return caught.value.problems


# --- modes ---------------------------------------------------------------------------------------


def test_auto_takes_every_gpu_in_pci_order() -> None:
    a = select(mode=GpuMode.AUTO)
    assert a.physical_ids == (0, 1, 2, 3)
    assert [d.logical_id for d in a.devices] == [0, 1, 2, 3]
    assert a.env == {"CUDA_DEVICE_ORDER": PCI, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert a.capacity_bytes == {0: 32 * GIB, 1: 48 * GIB, 2: 32 * GIB, 3: 48 * GIB}
    assert a.free_bytes[0] == 12 * GIB
    assert a.compute_capabilities == {0: (7, 0), 1: (8, 9), 2: (7, 0), 3: (8, 9)}
    assert a.source == "nvml"


def test_ids_are_physical_and_become_logical_in_ascending_order() -> None:
    a = select(mode=GpuMode.IDS, ids=(3, 1))
    assert a.devices == (
        AssignedGpu(1, 0, "NVIDIA L40S", UUIDS[1], 48 * GIB, 47 * GIB, (8, 9)),
        AssignedGpu(3, 1, "NVIDIA L40S", UUIDS[3], 48 * GIB, 47 * GIB, (8, 9)),
    )
    assert a.env == {"CUDA_DEVICE_ORDER": PCI, "CUDA_VISIBLE_DEVICES": "1,3"}
    assert (to_logical(a, 1), to_logical(a, 3)) == (0, 1)
    assert (to_physical(a, 0), to_physical(a, 1)) == (1, 3)


def test_memory_caps_are_keyed_by_physical_id_and_never_exceed_the_gpu() -> None:
    a = select(mode=GpuMode.IDS, ids=(2, 3), max_memory_gib={2: 20.5, 3: 100})
    assert a.capacity_bytes == {2: int(20.5 * GIB), 3: 48 * GIB}


@pytest.mark.parametrize(
    ("count", "expected"),
    [(1, (2,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (0, 1, 2, 3))],
)
def test_least_used_picks_the_emptiest_gpus_ties_by_id(count: int, expected: tuple[int]) -> None:
    a = select(mode=GpuMode.LEAST_USED, count=count)
    assert a.physical_ids == expected
    assert a.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, expected))


def test_least_used_chooses_among_visible_gpus_and_ignores_caps_of_the_others() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0,3"}
    a = select(env, mode=GpuMode.LEAST_USED, count=1, max_memory_gib={0: 10, 3: 10})
    assert a.physical_ids == (3,) and a.capacity_bytes == {3: 10 * GIB}


def test_least_used_needs_enough_gpus() -> None:
    assert problems_of(mode=GpuMode.LEAST_USED, count=5) == [
        Problem(
            "gpus.count",
            "5 GPUs requested, only 4 can be used",
            "at most 4 (allowed: 0, 1, 2, 3)",
            "run `glmdeploy doctor` to see each GPU's id and UUID",
        )
    ]


def test_cpu_uses_no_gpu_and_leaves_the_environment_alone() -> None:
    a = select({"CUDA_VISIBLE_DEVICES": "garbage"}, mode=GpuMode.CPU)
    assert a.devices == () and a.env == {}


def test_declared_uses_the_declared_fleet_and_ignores_the_machine() -> None:
    declared = (DeclaredGpu("A100", 80), DeclaredGpu("RTX 3090", 24, (8, 6)))
    selection = GpuSelection(GpuMode.AUTO, declared=declared, max_memory_gib={1: 20})
    a = select_gpus(selection, existing_gpus(selection, lambda: FLEET), {})
    assert a.source == "declared" and a.declared
    assert a.env == {"CUDA_DEVICE_ORDER": PCI, "CUDA_VISIBLE_DEVICES": "0,1"}  # as a run would
    assert a.physical_ids == (0, 1) and to_logical(a, 1) == 1
    assert a.capacity_bytes == {0: 80 * GIB, 1: 20 * GIB}
    assert a.compute_capabilities == {0: (8, 0), 1: (8, 6)}
    assert declared_snapshot(declared).ids == (0, 1)


@pytest.mark.parametrize(
    ("selection", "path"),
    [
        ({"mode": GpuMode.IDS}, "gpus.ids"),
        ({"mode": GpuMode.LEAST_USED}, "gpus.count"),
        ({"mode": GpuMode.LEAST_USED, "count": 0}, "gpus.count"),
    ],
)
def test_incomplete_selections_are_config_errors(selection: dict[str, object], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        select(None, **selection)
    assert [p.path for p in caught.value.problems] == [path]


# --- ids that are not there ----------------------------------------------------------------------


def test_an_id_not_on_the_machine() -> None:
    two = HardwareSnapshot(FLEET.gpus[:2], "550.54.15", "12.4", None, "nvml")
    with pytest.raises(HardwareError) as caught:
        select_gpus(GpuSelection(GpuMode.IDS, ids=(0, 3)), two, {})
    assert caught.value.problems == [
        Problem(
            path="gpus.ids",
            message="GPU 3 is not on this machine",
            expected="visible: 0, 1",
            hint="run `glmdeploy doctor`, or choose gpus=auto",
        )
    ]
    assert str(caught.value) == (
        "error: hardware does not match the config (1 problem)\n"
        "  gpus.ids: GPU 3 is not on this machine\n"
        "    expected: visible: 0, 1\n"
        "    hint: run `glmdeploy doctor`, or choose gpus=auto"
    )


def test_without_nvml_the_expected_line_says_why() -> None:
    with pytest.raises(HardwareError) as caught:
        select_gpus(GpuSelection(GpuMode.IDS, ids=(0,)), NO_NVML, {})
    [problem] = caught.value.problems
    assert problem.expected == "visible: none (NVML: NVML Shared Library Not Found)"


def test_all_problems_are_reported_at_once_and_sorted() -> None:
    found = problems_of(mode=GpuMode.IDS, ids=(7, 1, 1), max_memory_gib={0: 8})
    assert [(p.path, p.message) for p in found] == [
        ("gpus.ids", "GPU 1 is listed 2 times"),
        ("gpus.ids", "GPU 7 is not on this machine"),
        ("gpus.max_memory_gib", "GPU 0 has a memory cap but is not selected"),
    ]
    assert found[2].expected == "caps for GPUs 1, 7"
    assert found[2].hint == "remove the cap for GPU 0, or select GPU 0"


def test_auto_and_no_gpu_selects_nothing_and_leaves_the_environment() -> None:
    a = select_gpus(GpuSelection(GpuMode.AUTO), NO_NVML, {})
    assert a.devices == () and a.env == {} and a.source == "none"


# --- an existing CUDA_VISIBLE_DEVICES ------------------------------------------------------------


@pytest.mark.parametrize(
    ("visible", "allowed"),
    [
        ("1,2", (1, 2)),
        (" 2, 0 ", (0, 2)),  # whitespace; chosen in ascending order
        (UUIDS[3], (3,)),
        (f"{UUIDS[2]},{UUIDS[0]}", (0, 2)),
        ("GPU-8c3c", (2,)),  # a unique prefix
        ("gpu-9D4D", (3,)),  # any case
        (f"1,{UUIDS[3]}", (1, 3)),
        ("", ()),
        ("-1", ()),
        ("1,-1,2", (1,)),  # as in CUDA, a negative entry ends the list
    ],
)
def test_visible_devices_restrict_auto(visible: str, allowed: tuple[int, ...]) -> None:
    a = select({"CUDA_VISIBLE_DEVICES": visible}, mode=GpuMode.AUTO)
    assert a.physical_ids == allowed
    assert [d.logical_id for d in a.devices] == list(range(len(allowed)))
    expected_env = {"CUDA_DEVICE_ORDER": PCI, "CUDA_VISIBLE_DEVICES": ",".join(map(str, allowed))}
    assert a.env == (expected_env if allowed else {})


def test_ids_must_be_a_subset_of_visible_devices() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "1,2"}
    assert select(env, mode=GpuMode.IDS, ids=(2,)).env["CUDA_VISIBLE_DEVICES"] == "2"
    assert problems_of(env, mode=GpuMode.IDS, ids=(0, 2)) == [
        Problem(
            "gpus.ids",
            "GPU 0 is hidden by CUDA_VISIBLE_DEVICES=1,2",
            "allowed: 1, 2",
            "choose ids among the allowed ones, or unset CUDA_VISIBLE_DEVICES",
        )
    ]


def test_empty_visible_devices_allows_no_gpu() -> None:
    [problem] = problems_of({"CUDA_VISIBLE_DEVICES": ""}, mode=GpuMode.IDS, ids=(0,))
    assert (problem.message, problem.expected) == (
        "GPU 0 is hidden by CUDA_VISIBLE_DEVICES=",
        "allowed: none",
    )


@pytest.mark.parametrize(
    ("visible", "message", "expected"),
    [
        ("0,abc", "'abc' is not a GPU id or UUID (it is '0,abc')", "comma-separated physical ids"),
        ("0,MIG-1234", "'MIG-1234' is not a GPU id or UUID", "MIG is not supported"),
        ("9", "GPU 9 is not on this machine (it is '9')", "visible: 0, 1, 2, 3"),
        ("GPU-5d", "GPU-5d matches several GPUs (it is 'GPU-5d')", "a GPU UUID"),
        ("GPU-ffff", "GPU-ffff matches no GPU", "`nvidia-smi -L`"),
        ("1,1", "GPU 1 is listed twice", None),
        (f"3,{UUIDS[3]}", "GPU 3 is listed twice", None),
    ],
)
def test_bad_visible_devices(visible: str, message: str, expected: str | None) -> None:
    [problem] = problems_of({"CUDA_VISIBLE_DEVICES": visible}, mode=GpuMode.AUTO)
    assert problem.path == "CUDA_VISIBLE_DEVICES"
    assert problem.message.startswith(message)
    if expected is None:
        assert problem.expected is None
    else:
        assert expected in (problem.expected or "")
    assert problem.hint == (
        "fix or unset CUDA_VISIBLE_DEVICES; run `glmdeploy doctor` to see each GPU's id and UUID"
    )


def test_fastest_first_order_conflicts_with_explicit_ids() -> None:
    env = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    [problem] = problems_of(env, mode=GpuMode.IDS, ids=(0,))
    assert problem == Problem(
        "gpus.ids",
        "CUDA_DEVICE_ORDER=FASTEST_FIRST is set, but gpus.ids are nvidia-smi (PCI bus) ids",
        "CUDA_DEVICE_ORDER unset or PCI_BUS_ID",
        "unset CUDA_DEVICE_ORDER (glmdeploy sets PCI_BUS_ID), or use gpus=auto and UUIDs in "
        "CUDA_VISIBLE_DEVICES",
    )


def test_fastest_first_order_conflicts_with_integer_visible_devices_once() -> None:
    env = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": "0,1"}
    [problem] = problems_of(env, mode=GpuMode.AUTO)
    assert problem.path == "CUDA_VISIBLE_DEVICES"
    assert "read in the order CUDA_DEVICE_ORDER=FASTEST_FIRST" in problem.message


def test_fastest_first_is_overridden_where_no_integer_id_depends_on_it() -> None:
    env = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "CUDA_VISIBLE_DEVICES": UUIDS[2]}
    assert select(env, mode=GpuMode.AUTO).env["CUDA_DEVICE_ORDER"] == PCI
    only_order = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    assert select(only_order, mode=GpuMode.LEAST_USED, count=1).physical_ids == (2,)
    assert select({"CUDA_DEVICE_ORDER": PCI}, mode=GpuMode.IDS, ids=(0,)).physical_ids == (0,)


# --- physical <-> logical ------------------------------------------------------------------------


def test_to_logical_rejects_an_unselected_gpu() -> None:
    a = select(mode=GpuMode.IDS, ids=(2, 3))
    with pytest.raises(HardwareError) as caught:
        to_logical(a, 0, "placement.map")
    assert caught.value.problems == [
        Problem(
            "placement.map",
            "GPU 0 is not selected (selected: 2, 3)",
            hint="glmdeploy names GPUs by physical id, as in gpus.ids and nvidia-smi; "
            "this process sees GPU 2 as cuda:0, GPU 3 as cuda:1",
        )
    ]


def test_to_physical_rejects_an_unknown_logical_id() -> None:
    a = select(mode=GpuMode.IDS, ids=(2,))
    with pytest.raises(HardwareError, match=r"cuda:1 is not a device of this process"):
        to_physical(a, 1)


# --- applying the environment --------------------------------------------------------------------


def test_apply_environment_sets_the_variables() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "HOME": "/root"}
    apply_environment(select(mode=GpuMode.IDS, ids=(2, 3)), environ, cuda_probe=lambda: None)
    assert environ == {
        "CUDA_VISIBLE_DEVICES": "2,3",
        "CUDA_DEVICE_ORDER": PCI,
        "HOME": "/root",
    }


def test_apply_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "x")  # monkeypatch restores both afterwards
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "x")
    apply_environment(select(mode=GpuMode.IDS, ids=(1,)), cuda_probe=lambda: None)
    assert (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["CUDA_DEVICE_ORDER"]) == ("1", PCI)


def test_apply_environment_accepts_cuda_already_seeing_exactly_the_selection() -> None:
    environ: dict[str, str] = {}
    torch_style = ("8C3C2C2C-1111-2222-3333-444455556666", "9d4d3d3d111122223333444455556666")
    apply_environment(select(mode=GpuMode.IDS, ids=(2, 3)), environ, lambda: torch_style)
    assert environ["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize("seen", [UUIDS, (UUIDS[3], UUIDS[2]), (UUIDS[2],), ("unknown",)])
def test_apply_environment_refuses_when_cuda_already_sees_other_gpus(seen: tuple[str]) -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    with pytest.raises(HardwareError) as caught:
        apply_environment(select(mode=GpuMode.IDS, ids=(2, 3)), environ, lambda: seen)
    [problem] = caught.value.problems
    assert problem.path == "CUDA_VISIBLE_DEVICES"
    assert problem.message == (
        f"CUDA is already initialised in this process, seeing {len(seen)} GPU(s) instead of "
        "exactly GPUs 2, 3"
    )
    assert problem.hint is not None
    assert "reads CUDA_VISIBLE_DEVICES once" in problem.hint
    assert "fresh process" in problem.hint
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=2,3 before any CUDA call" in (
        problem.hint
    )
    assert environ == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}  # untouched


def test_nothing_to_apply_means_no_cuda_check() -> None:
    def probe_must_not_run() -> None:
        raise AssertionError("probed CUDA for a selection that sets nothing")

    for assignment in (
        select(mode=GpuMode.CPU),
        select({"CUDA_VISIBLE_DEVICES": ""}, mode=GpuMode.AUTO),
    ):
        environ: dict[str, str] = {}
        apply_environment(assignment, environ, probe_must_not_run)
        assert environ == {}
