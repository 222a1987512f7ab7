"""One verdict per plan, computed once and shown the same everywhere (table, line, JSON, advice)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.config.settings import GIB, Dtype, Precision, Strategy
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.strategies import plan_placement, try_plan
from glmdeploy.planning.types import DeviceSpec, Plan, PlanDoesNotFit
from glmdeploy.records.pictures import picture_title

from builders import TINY_ARCH, make_deployment


@pytest.fixture(scope="module")
def tiny() -> Anatomy:
    return build_anatomy(config_from_architecture(TINY_ARCH))


def cpu_only(capacity: int) -> list[DeviceSpec]:
    return [DeviceSpec("cpu", None, "CPU RAM", capacity)]


def test_a_cpu_plan_that_does_not_fit_is_judged_by_the_cpu(tiny: Anatomy) -> None:
    dep = make_deployment("auto", precision=Precision(Dtype.FP32), max_context_tokens=64)
    plan = try_plan(dep, tiny, cpu_only(100_000))  # far less than the 0.8 MiB of weights
    (row,) = plan.rows
    assert row.device == "cpu" and row.utilisation > 1
    verdict = plan.verdict
    assert not verdict.fits and not plan.fits
    assert verdict.device == "cpu" and verdict.utilisation == row.utilisation
    assert plan.max_utilisation == row.utilisation
    assert f"{row.utilisation:.0%}" in verdict.sentence and "cpu" in verdict.sentence
    assert verdict.sentence.startswith("does not fit")
    with pytest.raises(PlanDoesNotFit) as caught:
        plan_placement(dep, tiny, cpu_only(100_000))
    shortfall = caught.value.problems[0]
    assert shortfall.path == "placement"
    assert "all GPUs" not in shortfall.message and "cpu" in shortfall.message


def test_a_fitting_plan_names_its_binding_device(tiny: Anatomy) -> None:
    dep = make_deployment("balanced", reserve_gib=0.0, max_context_tokens=64)
    gpus = [DeviceSpec(0, 0, "A", GIB), DeviceSpec(1, 1, "B", GIB // 100)]
    plan = plan_placement(dep, tiny, gpus)
    worst = max(plan.rows, key=lambda r: r.utilisation)
    assert plan.verdict.fits and plan.verdict.device == worst.device
    assert plan.verdict.utilisation == worst.utilisation == plan.max_utilisation
    assert plan.verdict.sentence.startswith("fits: ")
    assert f"{worst.utilisation:.0%} of budget" in plan.verdict.sentence


def test_the_verdict_survives_the_plan_file(tiny: Anatomy) -> None:
    dep = make_deployment("auto", precision=Precision(Dtype.FP32), max_context_tokens=64)
    plan = try_plan(dep, tiny, cpu_only(100_000))
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["verdict"]["sentence"] == plan.verdict.sentence
    assert data["fits"] is False and data["max_utilisation"] == plan.verdict.utilisation
    assert Plan.from_dict(data).verdict == plan.verdict
    assert plan.verdict.sentence in picture_title(plan)


def percents(text: str) -> list[str]:
    return re.findall(r"\d+%", text)


def test_cli_table_line_json_record_and_doctor_agree_on_a_cpu_plan(
    cli: Any, tmp_path: Path
) -> None:
    args = ["gpus=cpu", "model=tiny-glm", "+placement.cpu_memory_gib=0.0001"]
    shown = cli("plan", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert shown.code == 5
    row = next(line for line in shown.out.splitlines() if line.lstrip().startswith("cpu"))
    line = next(line for line in shown.out.splitlines() if line.startswith("does not fit"))
    assert percents(row)[-1] in line  # the table's `used` is the verdict's utilisation
    assert " 0% of budget" not in line and "(0% of budget" not in line
    assert "all GPUs" not in shown.err
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["plan"]["verdict"]["sentence"] == line
    as_json = cli("plan", "--json", *args, f"hydra.run.dir={tmp_path / 'run2'}")
    payload = json.loads(as_json.out)
    assert payload["ok"] is False and payload["plan"]["verdict"]["sentence"] == line
    doctor = cli("doctor", *args)
    assert f"- fit: {line}" in doctor.out


def test_balanced_low_0_says_what_it_did_in_the_rows_numbers(tiny: Anatomy) -> None:
    dep = make_deployment(Strategy.BALANCED_LOW_0, reserve_gib=0.0, max_context_tokens=64)
    gpus = [DeviceSpec(0, 0, "A", GIB // 50), DeviceSpec(1, 1, "B", GIB // 50)]
    plan = plan_placement(dep, tiny, gpus)
    (note,) = [n for n in plan.notes if n.startswith("balanced_low_0")]
    first, second = plan.rows
    assert first.utilisation <= 0.7 + 1e-9
    assert f"{first.utilisation:.0%}" in note and f"{second.utilisation:.0%}" in note
    assert "30%" in note  # the share it keeps free
    assert "70% of its budget" not in note or f"{first.utilisation:.0%}" == "70%"
