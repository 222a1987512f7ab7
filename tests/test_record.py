"""Run records: round trips, atomic writes, failed/interrupted runs, plan files and pictures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from glmdeploy import atomic
from glmdeploy.config.deployments import load_deployment
from glmdeploy.config.settings import GIB, ModelSource, ModelSpec, SourceKind
from glmdeploy.hardware.environment import environment_facts
from glmdeploy.hardware.nvml import NvmlError
from glmdeploy.planning.deployment_plan import (
    DeploymentDoesNotFit,
    PlannedDeployment,
    plan_deployment,
)
from glmdeploy.planning.types import Plan
from glmdeploy.problems import ConfigError, ExitCode, LoadError, Problem
from glmdeploy.records.pictures import save_plan_picture
from glmdeploy.records.record import (
    RecordWriter,
    RunRecord,
    checkpoint_facts,
    new_record,
    read_record,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OVERRIDES = ["gpus=2x24gib", "precision=bf16"]
ENV: dict[str, Any] = {"python": "3.11.9", "packages": {"torch": "2.13.0"}, "gpus": [], "env": {}}


@pytest.fixture(scope="module")
def planned() -> tuple[dict[str, Any], PlannedDeployment]:
    job = load_deployment(OVERRIDES)
    return job.config, plan_deployment(job.deployment)


def make_record(config: dict[str, Any], command: str = "plan") -> RunRecord:
    return RunRecord(command, config, list(OVERRIDES), {"gpus": "2x24gib"}, environment=dict(ENV))


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") or "tmp" in p.name)


def test_a_planned_run_writes_its_record_plan_picture_and_resolved_config(
    tmp_path: Path, planned: tuple[dict[str, Any], PlannedDeployment]
) -> None:
    config, plan = planned[0], planned[1].plan
    with RecordWriter(tmp_path).start(make_record(config)) as writer:
        assert read_record(tmp_path).status == "running"
        writer.save_plan(plan)
        running = read_record(tmp_path)
        assert running.status == "running" and running.plan is not None  # saved as soon as known
        writer.finish(results={"plan": {"fits": plan.fits}}, timings={"plan": 0.5})
    record = read_record(tmp_path)
    assert record.status == "ok" and record.error is None
    assert record.overrides == OVERRIDES and record.choices == {"gpus": "2x24gib"}
    assert record.config == config and record.environment == ENV
    assert record.plan is not None and Plan.from_dict(record.plan) == plan
    assert record.results == {"plan": {"fits": True}}
    assert record.started_at.endswith("+00:00") and record.finished_at is not None
    assert record.duration_s is not None and record.timings == {"plan": 0.5}
    assert Plan.from_dict(json.loads((tmp_path / "plan.json").read_text())) == plan
    assert (tmp_path / "plan.png").read_bytes().startswith(PNG_MAGIC)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == config
    assert leftovers(tmp_path) == []


def test_the_saved_plan_is_what_placement_plan_file_reads(
    tmp_path: Path, planned: tuple[dict[str, Any], PlannedDeployment]
) -> None:
    writer = RecordWriter(tmp_path).start(make_record(planned[0]))
    writer.finish(plan=planned[1].plan)
    again = load_deployment(
        [*OVERRIDES, "placement=plan_file", f"placement.plan_file={tmp_path / 'plan.json'}"]
    )
    assert plan_deployment(again.deployment).plan == planned[1].plan


def test_an_error_mid_run_leaves_a_failed_record_and_is_reraised(tmp_path: Path) -> None:
    problem = Problem("model.source.path", "no weights found", hint="check the path")
    with pytest.raises(LoadError), RecordWriter(tmp_path).start(make_record({"a": 1}, "load")):
        raise LoadError([problem])
    record = read_record(tmp_path)
    assert record.status == "failed" and record.finished_at is not None
    assert record.error == {
        "title": "cannot load the model",
        "exit_code": int(ExitCode.LOAD),
        "problems": [problem.to_dict()],
    }
    assert leftovers(tmp_path) == []


def test_an_unexpected_exception_is_an_internal_error(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), RecordWriter(tmp_path).start(make_record({})):
        _ = 1 / 0
    record = read_record(tmp_path)
    assert record.status == "failed"
    assert record.error == {
        "title": "internal error",
        "exit_code": 1,
        "message": "ZeroDivisionError: division by zero",
    }


def test_ctrl_c_marks_the_run_interrupted(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), RecordWriter(tmp_path).start(make_record({})) as writer:
        writer.record.results["load"] = {"load_seconds": 1.5}
        raise KeyboardInterrupt
    record = read_record(tmp_path)
    assert record.status == "interrupted" and record.error is not None
    assert record.error["exit_code"] == 130
    assert record.results == {"load": {"load_seconds": 1.5}}  # what finished before is kept


def test_a_plan_that_does_not_fit_is_recorded_with_its_best_attempt(tmp_path: Path) -> None:
    caps = ["model=glm-4-9b-chat-hf", "gpus=2x24gib", "gpus.max_memory_gib={0: 4, 1: 4}"]
    job = load_deployment(caps)
    with pytest.raises(DeploymentDoesNotFit), RecordWriter(tmp_path).start(make_record(job.config)):
        plan_deployment(job.deployment)
    record = read_record(tmp_path)
    assert record.status == "failed" and record.error is not None
    assert record.error["exit_code"] == int(ExitCode.DOES_NOT_FIT)
    assert record.plan is not None and record.plan["fits"] is False
    assert (tmp_path / "plan.png").read_bytes().startswith(PNG_MAGIC)
    # JSON has no int keys: GPU ids come back as ints, so the config validates again.
    assert record.config["gpus"]["max_memory_gib"] == {0: 4, 1: 4}


def test_finish_without_a_context_manager(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path).start(make_record({}))
    error = ConfigError([Problem("runtime.prompt", "the prompt is empty")])
    writer.finish("failed", error=error, results={"generate": {"seconds": 0.1}})
    record = read_record(tmp_path)
    assert record.status == "failed" and record.results == {"generate": {"seconds": 0.1}}
    assert record.error is not None and record.error["problems"][0]["path"] == "runtime.prompt"
    with writer:  # already finished: leaving the block changes nothing
        pass
    assert read_record(tmp_path).status == "failed"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "run.json"
    atomic.write_text(target, "old\n")

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no run.json here"), ("{not json", "cannot read"), ('{"format": "x"}', "not a")],
)
def test_read_record_says_what_is_wrong(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    with pytest.raises(ConfigError) as info:
        read_record(tmp_path)
    assert info.value.title == "not a glmdeploy run directory"
    assert message in info.value.problems[0].message
    with pytest.raises(ConfigError, match="no such directory"):
        read_record(tmp_path / "missing")


class OneGpuNvml:
    """A fake NVML with one A100."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str:
        return "550.54.15"

    def cuda_driver_version(self) -> int:
        return 12040

    def device_count(self) -> int:
        return 1

    def name(self, index: int) -> str:
        return "NVIDIA A100-SXM4-80GB"

    def uuid(self, index: int) -> str:
        return "GPU-a100"

    def memory(self, index: int) -> tuple[int, int, int]:
        return 80 * GIB, GIB, 79 * GIB

    def compute_capability(self, index: int) -> tuple[int, int]:
        return (8, 0)

    def processes(self, index: int) -> list[tuple[int, int | None]]:
        raise NvmlError("not supported")

    def process_name(self, pid: int) -> str:
        raise NvmlError("not supported")


def test_environment_facts_name_versions_gpus_and_variables() -> None:
    env = environment_facts(nvml=OneGpuNvml(), environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert env["packages"]["glmdeploy"] != "not installed"
    assert {"torch", "transformers", "accelerate", "safetensors", "hydra-core"} <= set(
        env["packages"]
    )
    assert env["nvidia_driver"] == "550.54.15" and env["cuda_driver"] == "12.4"
    assert env["gpus"] == [
        {
            "physical_id": 0,
            "name": "NVIDIA A100-SXM4-80GB",
            "uuid": "GPU-a100",
            "total_bytes": 80 * GIB,
            "compute_capability": (8, 0),
        }
    ]
    assert env["env"]["CUDA_VISIBLE_DEVICES"] == "0" and env["env"]["HF_HUB_OFFLINE"] is None
    torch = sys.modules.get("torch")  # planning from cached anatomies imports none
    assert torch is None or not torch.cuda.is_initialized()  # torch.version.cuda only


def test_checkpoint_facts_fingerprint_local_dirs_and_name_embedded_models(
    tmp_path: Path, chatglm3_tiny: Path
) -> None:
    local = load_deployment(["model=local", f"model.source.path={chatglm3_tiny}"])
    facts = checkpoint_facts(local.deployment.model)
    assert facts is not None and facts["kind"] == "local" and len(facts["fingerprint"]) == 64
    embedded = checkpoint_facts(load_deployment([]).deployment.model)
    assert embedded is not None and embedded["kind"] == "embedded"
    assert len(embedded["fingerprint"]) == 64
    gone = ModelSpec("gone", ModelSource(SourceKind.LOCAL, path=str(tmp_path / "gone")), None)
    missing = checkpoint_facts(gone)
    assert missing is not None and missing["fingerprint"] is None
    assert "does not exist" in missing["fingerprint_error"]


def test_plan_picture_is_a_png(
    tmp_path: Path, planned: tuple[dict[str, Any], PlannedDeployment]
) -> None:
    save_plan_picture(planned[1].plan, tmp_path / "p.png")
    save_plan_picture(planned[1].plan, tmp_path / "p.pdf")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "p.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match=r"use \.png"):
        save_plan_picture(planned[1].plan, tmp_path / "p.svg")
    assert leftovers(tmp_path) == []


def test_plan_picture_needs_no_matplotlib(tmp_path: Path) -> None:
    """Drawn with Pillow: matplotlib's import alone would cost more than a cached plan."""
    code = (
        "import sys; from glmdeploy.api import plan; "
        "from glmdeploy.records.pictures import save_plan_picture; "
        f"save_plan_picture(plan(['gpus=2x24gib']).plan, {str(tmp_path / 'p.png')!r}); "
        "print([m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_record_replay_report_import_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys; import glmdeploy.records.record, glmdeploy.records.replay, "
        "glmdeploy.records.report, glmdeploy.records.pictures; "
        "print([m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_new_record_starts_now_with_environment_and_checkpoint() -> None:
    job = load_deployment(OVERRIDES)
    record = new_record("plan", OVERRIDES, {"gpus": "2x24gib"}, job.config, job.deployment)
    assert record.status == "running" and record.started_at.endswith("+00:00")
    assert record.environment["packages"]["torch"] != "not installed"
    assert record.checkpoint is not None and record.checkpoint["kind"] == "embedded"
    assert RunRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
