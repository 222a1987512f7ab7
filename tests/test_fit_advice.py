"""Fix advice: every fix with its cost, cheapest for the user first, and never a hint that does not
fit; int8/int4 only where they can run (or, for declared GPUs, with what this machine lacks)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.config.settings import (
    GIB,
    DeclaredGpu,
    Deployment,
    Dtype,
    GpuMode,
    GpuSelection,
    ModelSource,
    Offload,
    Precision,
    Quantization,
    Runtime,
    SourceKind,
)
from glmdeploy.hardware.gpu_select import AssignedGpu, GpuAssignment
from glmdeploy.hardware.nvml import HardwareSnapshot, probe
from glmdeploy.hardware.precision import quantization_support
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.deployment_plan import plan_deployment
from glmdeploy.planning.strategies import plan_placement, try_plan
from glmdeploy.planning.types import DeviceSpec, PlanDoesNotFit
from glmdeploy.problems import HardwareError, Problem

from builders import TINY_ARCH, make_deployment

MB = 10**6
TWO_SMALL_GPUS = [DeviceSpec(0, 0, "A", 20 * MB), DeviceSpec(1, 1, "B", 20 * MB)]
DECLARED_A100 = DeclaredGpu("A100", 80)
A100 = AssignedGpu(0, 0, "A100", "GPU-0", 80 * GIB, 80 * GIB, (8, 0))
NO_GPU_HERE = HardwareSnapshot((), None, None, "NVML Shared Library Not Found", "none")


@pytest.fixture(scope="module")
def tiny() -> Anatomy:
    return build_anatomy(config_from_architecture(TINY_ARCH))


def batch_of(n: int, **kw: Any) -> Deployment:
    runtime = Runtime(4096, batch_size=n, max_new_tokens=32)
    return make_deployment("auto", reserve_gib=0.0, runtime=runtime, **kw)


def advice(
    dep: Deployment, anatomy: Anatomy, devices: list[DeviceSpec], **kw: Any
) -> list[Problem]:
    with pytest.raises(PlanDoesNotFit) as caught:
        plan_placement(dep, anatomy, devices, **kw)
    return caught.value.problems


def apply(dep: Deployment, hint: str) -> Deployment | None:
    """The deployment with a `key=value` hint applied (None: not such a hint)."""
    match = re.fullmatch(r"([\w.]+)=(\S+)", hint)
    if match is None:
        return None
    key, value = match.groups()
    if key == "runtime.batch_size":
        return replace(dep, runtime=replace(dep.runtime, batch_size=int(value)))
    if key == "runtime.max_context_tokens":
        return replace(dep, runtime=replace(dep.runtime, max_context_tokens=int(value)))
    if key == "precision.quantization":
        return replace(dep, precision=replace(dep.precision, quantization=Quantization(value)))
    if key == "precision.dtype":
        return replace(dep, precision=replace(dep.precision, dtype=Dtype(value)))
    if key == "placement.offload":
        return replace(dep, placement=replace(dep.placement, offload=Offload(value)))
    raise AssertionError(f"unexpected hint {hint}")


def assert_every_hint_fits(dep: Deployment, anatomy: Anatomy, devices: list[DeviceSpec],
                           problems: list[Problem]) -> None:  # fmt: skip
    for problem in problems[1:]:
        changed = apply(dep, problem.hint) if problem.hint else None
        if changed is not None:
            assert try_plan(changed, anatomy, devices).fits, problem


def test_fixes_come_cheapest_first_each_with_its_cost(tiny: Anatomy) -> None:
    dep = batch_of(8)
    problems = advice(dep, tiny, TWO_SMALL_GPUS)
    paths = [p.path for p in problems]
    assert paths == [
        "placement",  # the shortfall
        "runtime.batch_size",  # fewer sequences
        "runtime.max_context_tokens",  # shorter context
        "placement.offload",  # the CPU runs it: the most expensive fix that fits
        "precision.quantization",  # not enough: said, with no hint, in the same order
        "gpus",
    ], [(p.path, p.message) for p in problems]
    batch = problems[1]
    n = int((batch.hint or "").rpartition("=")[2])
    assert 1 <= n < 8 and try_plan(batch_of(n), tiny, TWO_SMALL_GPUS).fits
    assert not try_plan(batch_of(n + 1), tiny, TWO_SMALL_GPUS).fits
    assert "× lower throughput" in batch.message
    assert "% shorter" in problems[2].message
    offload = problems[3].message
    assert "the CPU runs the whole model" in offload and "ms/token" in offload
    assert re.search(r"it needs [\d.]+ [MG]iB of RAM", offload)
    assert problems[4].hint is None and problems[5].hint is None
    assert "does not fit" in problems[4].message
    assert_every_hint_fits(dep, tiny, TWO_SMALL_GPUS, problems)


def test_a_precision_that_does_not_fit_is_never_a_hint(tiny: Anatomy) -> None:
    dep = batch_of(1)
    devices = [DeviceSpec(0, 0, "A", 4 * MB)]
    problems = advice(dep, tiny, devices)
    quant = [p for p in problems if p.path.startswith("precision")]
    assert quant and all(p.hint is None for p in quant if "does not fit" in p.message)
    assert_every_hint_fits(dep, tiny, devices, problems)


def test_more_gpus_and_lower_precision_say_what_they_cost(tiny: Anatomy) -> None:
    dep = make_deployment("balanced", reserve_gib=0.0, max_context_tokens=64)
    devices = [DeviceSpec(0, 0, "A", 250_000)]  # bf16 weights: 0.43 MB
    problems = advice(dep, tiny, devices, weights_only=True)
    by_path = {p.path: p for p in problems}
    assert (
        "precision.quantization" in by_path
        and "quality" in by_path["precision.quantization"].message
    )
    assert by_path["precision.quantization"].hint == "precision.quantization=int4"  # int8: too big
    assert "more GPU" in by_path["gpus"].message
    order = [p.path for p in problems]
    assert order.index("precision.quantization") < order.index("gpus")


def test_no_quantisation_is_offered_where_it_cannot_run(tiny: Anatomy) -> None:
    dep = make_deployment("auto", reserve_gib=0.0, max_context_tokens=64)
    devices = [DeviceSpec(0, 0, "A", 250_000)]
    here = quantization_support(GpuAssignment(GpuMode.AUTO, (A100,)), bitsandbytes=False)
    assert not here.runs and here.missing_here == ("bitsandbytes",)
    problems = advice(dep, tiny, devices, weights_only=True, quantization=here)
    assert not any(p.path == "precision.quantization" for p in problems)
    cpu = quantization_support(GpuAssignment(GpuMode.CPU, ()), bitsandbytes=True)
    assert not cpu.runs and cpu.missing_here == ("a CUDA GPU",)


def test_declared_gpus_may_assume_quantisation_but_say_what_this_machine_lacks() -> None:
    declared = GpuAssignment(GpuMode.AUTO, (A100,), source="declared")
    support = quantization_support(declared, machine_has_gpu=False, bitsandbytes=False)
    assert support.runs and support.missing_here == ("a CUDA GPU", "bitsandbytes")
    dep = make_deployment(
        "auto",
        architecture=TINY_ARCH,
        source=ModelSource(SourceKind.EMBEDDED),
        gpus=GpuSelection(declared=(DECLARED_A100,)),
        precision=Precision(Dtype.BF16, Quantization.INT8),
    )
    planned = plan_deployment(dep, env={})
    assert planned.plan.fits
    (note,) = [n for n in planned.plan.notes if "this machine lacks" in n]
    assert "int8" in note and planned.lacking_here == note


def test_quantisation_on_this_machine_without_a_gpu_is_refused_with_exit_3() -> None:
    dep = make_deployment(
        "auto",
        architecture=TINY_ARCH,
        source=ModelSource(SourceKind.EMBEDDED),
        gpus=GpuSelection(GpuMode.AUTO),
        precision=Precision(Dtype.AUTO, Quantization.INT4),
    )
    with pytest.raises(HardwareError) as caught:
        plan_deployment(dep, snapshot=NO_GPU_HERE, env={})
    (problem,) = caught.value.problems
    assert problem.path == "precision.quantization" and "a CUDA GPU" in problem.message
    assert caught.value.exit_code == 3


def test_a_cpu_plan_never_suggests_int8_and_quotes_real_numbers(cli: Any, tmp_path: Path) -> None:
    shown = cli("plan", "gpus=cpu", "+placement.cpu_memory_gib=0.0001",
                f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert shown.code == 5
    assert "int8" not in shown.err and "int4" not in shown.err
    assert "max utilisation 0.00" not in shown.err


SMALL_DECLARED_GPU = ["gpus.declared=[{name: Small, memory_gib: 0.001}]", "placement.reserve_gib=0"]


def test_offload_is_offered_only_where_the_plan_with_it_fits(cli: Any, tmp_path: Path) -> None:
    """The advice tried offload=cpu on an unlimited CPU: 'offload=cpu fits' for a plan that,
    made with offload=cpu, did not (it needed more than placement.cpu_memory_gib)."""
    capped = ["+placement.cpu_memory_gib=0.001", f"hydra.run.dir={tmp_path}/a"]
    advised = cli("plan", *SMALL_DECLARED_GPU, *capped)
    assert advised.code == 5 and "placement.offload" not in advised.err, advised.err
    taken = cli("plan", *SMALL_DECLARED_GPU, *capped, "placement.offload=cpu")
    assert taken.code == 5, taken.err


def test_offload_short_of_this_machines_ram_says_how_much_the_cpu_needs(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A declared fleet's server may have the RAM this machine lacks: the fix names it."""
    from glmdeploy.planning import host_devices

    monkeypatch.setattr(host_devices, "_ram_bytes", lambda: 100_000)  # this machine: 0.1 MB free
    advised = cli("plan", *SMALL_DECLARED_GPU, f"hydra.run.dir={tmp_path}/a")
    assert advised.code == 5, advised.err
    line = next(s for s in advised.err.splitlines() if s.startswith("  placement.offload:"))
    assert "offload=cpu fits" in line and "more than the 0.1 MiB this machine gives it" in line
    hint = re.search(r"hint: (placement.offload=cpu \+\+placement.cpu_memory_gib=1)$", advised.err,
                     re.MULTILINE)  # fmt: skip
    assert hint is not None, advised.err
    taken = cli("plan", *SMALL_DECLARED_GPU, *hint.group(1).split(), f"hydra.run.dir={tmp_path}/b")
    assert taken.code == 0, taken.err


def test_the_ram_a_fix_may_ask_for_is_the_schemas_maximum() -> None:
    import json

    from glmdeploy.config.locations import SCHEMA_PATH
    from glmdeploy.planning.fit_advice import MAX_CPU_MEMORY_GIB

    schema = json.loads(Path(SCHEMA_PATH).read_text())
    placement = schema["properties"]["placement"]["properties"]
    assert placement["cpu_memory_gib"]["maximum"] == MAX_CPU_MEMORY_GIB


needs_no_gpu = pytest.mark.skipif(
    bool(probe().gpus), reason="checks doctor on a machine without GPUs"
)


@needs_no_gpu
@pytest.mark.parametrize(
    ("overrides", "code", "says"),
    [
        (["precision=int8"], 3, "cannot plan"),
        (["gpus=cpu", "+placement.cpu_memory_gib=0.0001"], 5, "does not fit"),
        (["gpus=cpu"], 0, "fits"),
    ],
)
def test_doctor_exit_code_follows_its_verdict(
    cli: Any, overrides: list[str], code: int, says: str
) -> None:
    result = cli("doctor", *overrides)
    assert result.code == code, result.out + result.err
    fit = next(line for line in result.out.splitlines() if line.startswith("- fit: "))
    assert fit.startswith(f"- fit: {says}")
    assert "max utilisation 0.00" not in result.out
