"""Files of the wrong shape (plan files, run records, sweep records, config.json): a clear error
naming the file and the place in it, exit 2 (4 for checkpoints); and the schemas of glmdeploy's own
file formats stay in step with the dataclasses that write them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.config.locations import SCHEMA_PATH
from glmdeploy.planning.types import BudgetRow, Fingerprint, Hop, Plan
from glmdeploy.records.record import RunRecord

FIXTURE = Path(__file__).parent / "fixtures" / "chatglm3-tiny"
Edit = Callable[[dict[str, Any]], Any]


def drop_unit(plan: dict[str, Any]) -> Any:
    return {**plan, "device_map": [e for e in plan["device_map"] if e[0] != "model.layers.2"]}


def move_unit(device: Any) -> Edit:
    def edit(plan: dict[str, Any]) -> Any:
        entries = [[n, device if n == "model.layers.1" else d] for n, d in plan["device_map"]]
        return {**plan, "device_map": entries}

    return edit


def set_key(key: str, value: Any) -> Edit:
    return lambda doc: {**doc, key: value}


def without(key: str) -> Edit:
    return lambda doc: {k: v for k, v in doc.items() if k != key}


# (how to spoil a good plan file, where the error points (after the file name), a phrase)
PLAN_CASES: list[tuple[Edit, str, str]] = [
    (lambda plan: [plan], "", "holds a list, not a JSON object"),
    (lambda plan: 3, "", "holds a number, not a JSON object"),
    (lambda plan: None, "", "holds null, not a JSON object"),
    (set_key("format", "glmdeploy.run/1"), "", "not a glmdeploy.plan/1 file"),
    (without("device_map"), ":device_map", "missing required key"),
    (set_key("device_map", {"model.norm": "cpu"}), ":device_map", "found mapping"),
    (set_key("fits", "yes"), ":fits", "found string"),
    (set_key("rows", [{"device": "cpu"}]), ":rows[0].units", "missing required key"),
    (move_unit("cuda"), ":device_map[3][1]", 'found string "cuda"'),
    (move_unit("cuda:0"), ":device_map[3][1]", "name GPUs by their physical id"),
    (move_unit(-1), ":device_map[3][1]", "found integer -1"),
    (move_unit(0), ":device_map[3]", "GPU 0 is not selected (selected: none)"),
    (move_unit("disk"), ":device_map[3]", "disk offload is not enabled"),
    (drop_unit, ":device_map", "not mapped to any device: model.layers.2"),
    (
        lambda plan: {**plan, "device_map": [*plan["device_map"], ["model.layers.9", "cpu"]]},
        ":device_map[8]",
        "model.layers.9 do not exist",
    ),
    (
        lambda plan: {**plan, "device_map": [*plan["device_map"], ["transformer.x", "cpu"]]},
        ":device_map[8]",
        "'transformer.x' is not a module of GlmForCausalLM",
    ),
]


@pytest.fixture(scope="module")
def cpu_plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from glmdeploy.config.deployments import load_deployment
    from glmdeploy.planning.deployment_plan import plan_deployment

    plan = plan_deployment(load_deployment(["gpus=cpu"]).deployment).plan
    return plan.to_dict()


@pytest.mark.parametrize(("edit", "where", "phrase"), PLAN_CASES)
def test_a_spoilt_plan_file_is_refused_with_the_place_and_reason(
    cli: Any, tmp_path: Path, cpu_plan: dict[str, Any], edit: Edit, where: str, phrase: str
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(edit(json.loads(json.dumps(cpu_plan)))))
    result = cli("plan", "gpus=cpu", "placement=plan_file", f"placement.plan_file={path}",
                 f"hydra.run.dir={tmp_path}/run")  # fmt: skip
    assert result.code == 2, result.err
    assert f"  {path}{where}: " in result.err and phrase in result.err
    assert "Traceback" not in result.err and "internal error" not in result.err


def test_an_unedited_plan_file_is_accepted(
    cli: Any, tmp_path: Path, cpu_plan: dict[str, Any]
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(cpu_plan))
    result = cli("plan", "--json", "gpus=cpu", "placement=plan_file",
                 f"placement.plan_file={path}", f"hydra.run.dir={tmp_path}/run")  # fmt: skip
    assert result.code == 0, result.err
    assert json.loads(result.out)["plan"]["device_map"] == cpu_plan["device_map"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glmdeploy.cli.main import main

    run = tmp_path_factory.mktemp("good") / "run"
    assert main(["plan", "gpus=cpu", f"hydra.run.dir={run}"]) == 0
    return run


# (how to spoil a good run.json, where the error points (after the file name), a phrase)
RECORD_CASES: list[tuple[Edit, str, str]] = [
    (lambda record: [record], "", "holds a list, not a JSON object"),
    (lambda record: "ok", "", "holds a string, not a JSON object"),
    (set_key("format", "glmdeploy.plan/1"), "", "not a glmdeploy.run/1 file"),
    (set_key("command", "frobnicate"), ":command", "'frobnicate' is not a job glmdeploy can"),
    (without("command"), ":command", "missing required key"),
    (set_key("command", 3), ":command", "found integer 3"),
    (set_key("config", [1]), ":config", "found list"),
    (set_key("status", "done"), ":status", "'done' is not a valid choice"),
    (set_key("overrides", "gpus=cpu"), ":overrides", "found string"),
]


@pytest.mark.parametrize(("edit", "where", "phrase"), RECORD_CASES)
def test_a_spoilt_run_record_is_refused_by_replay(
    cli: Any, tmp_path: Path, good_run: Path, edit: Edit, where: str, phrase: str
) -> None:
    run = tmp_path / "0"
    shutil.copytree(good_run, run)
    (run / "run.json").write_text(json.dumps(edit(json.loads((run / "run.json").read_text()))))
    result = cli("replay", str(run))
    assert result.code == 2, result.err
    assert f"  {run / 'run.json'}{where}: " in result.err and phrase in result.err
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert not (run / "replays").exists()


@pytest.mark.parametrize(("edit", "where", "phrase"), RECORD_CASES[:3])
def test_report_names_a_spoilt_run_record_in_its_row(
    cli: Any, tmp_path: Path, good_run: Path, edit: Edit, where: str, phrase: str
) -> None:
    shutil.copytree(good_run, tmp_path / "0")
    shutil.copytree(good_run, tmp_path / "1")
    record = json.loads((tmp_path / "1" / "run.json").read_text())
    (tmp_path / "1" / "run.json").write_text(json.dumps(edit(record)))
    result = cli("report", str(tmp_path))
    assert result.code == 0, result.err
    assert "| 0 | ok |" in result.out and "| 1 | unreadable |" in result.out
    assert phrase in result.out


@pytest.mark.parametrize(
    ("content", "where", "phrase"),
    [
        ("[]", "", "holds a list, not a JSON object"),
        ("{", "", "cannot read the sweep record"),
        ('{"command": "plan"}', ":jobs", "missing required key"),
        ('{"command": "plan", "jobs": [{"num": "0", "overrides": []}]}', ":jobs[0].num", "found"),
        ('{"command": "plan", "jobs": {"0": []}}', ":jobs", "found mapping"),
    ],
)
def test_a_spoilt_sweep_record_is_refused_by_report(
    cli: Any, tmp_path: Path, good_run: Path, content: str, where: str, phrase: str
) -> None:
    shutil.copytree(good_run, tmp_path / "0")
    (tmp_path / "sweep.json").write_text(content)
    result = cli("report", str(tmp_path))
    assert result.code == 2, result.err
    assert f"  {tmp_path / 'sweep.json'}{where}: " in result.err and phrase in result.err
    assert not (tmp_path / "report.md").exists()


def test_report_lists_the_jobs_a_sweep_never_started(
    cli: Any, tmp_path: Path, good_run: Path
) -> None:
    shutil.copytree(good_run, tmp_path / "0")
    jobs = [{"num": 0, "overrides": ["gpus=cpu"]}, {"num": 1, "overrides": ["gpus=2x24gib"]}]
    (tmp_path / "sweep.json").write_text(json.dumps({"command": "plan", "jobs": jobs}))
    result = cli("report", str(tmp_path))
    assert result.code == 0, result.err
    assert "| 1 | not started | 2x24gib |" in result.out


@pytest.mark.parametrize("content", ["[]", '"x"', "3", "null"])
def test_a_config_json_that_is_not_an_object_is_a_checkpoint_error(
    cli: Any, tmp_path: Path, content: str
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    (ckpt / "config.json").write_text(content)
    for argv in (
        ["plan", "model=local", f"model.source.path={ckpt}", f"hydra.run.dir={tmp_path}/r"],
        ["convert", str(ckpt), str(tmp_path / "native")],
    ):
        result = cli(*argv)
        assert result.code == 4, result.err
        assert f"  {ckpt / 'config.json'}: not a JSON object" in result.err


def _schema(name: str) -> dict[str, Any]:
    return dict(json.loads((SCHEMA_PATH.parent / f"{name}.schema.json").read_text()))


def test_the_plan_schema_describes_what_plans_write() -> None:
    schema = _schema("plan")
    # `fits` and `max_utilisation` repeat the verdict's for readers (Plan.to_dict)
    names = {f.name for f in dataclasses.fields(Plan)} | {"format", "fits", "max_utilisation"}
    assert set(schema["properties"]) == names
    optional = {"row": {"rank"}}  # fields newer than plan files written before them
    for cls, key in ((BudgetRow, "row"), (Hop, "hop"), (Fingerprint, "fingerprint")):
        node = schema["$defs"][key]
        assert (
            set(node["properties"])
            == set(node["required"]) | optional.get(key, set())
            == {f.name for f in dataclasses.fields(cls)}
        ), cls.__name__


def test_the_run_schema_describes_what_records_write() -> None:
    schema = _schema("run")
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(RunRecord)}
    assert set(schema["required"]) <= set(schema["properties"])
