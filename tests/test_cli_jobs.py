"""The job commands end to end on CPU: run, load, generate, bench, doctor, convert, sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest


def test_main_job_plans_loads_verifies_generates_and_records(cli: Any, tmp_path: Path) -> None:
    result = cli("run", "gpus=cpu", f"hydra.run.dir={tmp_path}")
    assert result.code == 0, result.err
    assert "glmdeploy run: tiny-glm on CPU" in result.out
    assert "verified: every parameter and buffer is where the plan put it" in result.out
    assert "generated 32 tokens" in result.out
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "ok"
    assert record["command"] == "run"
    assert record["results"]["generate"]["new_tokens"] == 32
    assert (tmp_path / "plan.json").is_file()


def test_cpu_disk_profile_loads_through_offload_hooks(cli: Any, tmp_path: Path) -> None:
    result = cli("load", "--json", "profile=tiny-glm-cpu-disk", f"hydra.run.dir={tmp_path}")
    assert result.code == 0, result.err
    payload = json.loads(result.out)
    rows = {r["device"]: r for r in payload["results"]["load"]["device_bytes"]}
    assert set(rows) == {"cpu", "disk"}
    assert all(r["predicted_bytes"] == r["actual_bytes"] > 0 for r in rows.values())


def test_generate_gives_the_same_tokens_on_cpu_disk_as_on_cpu(cli: Any, tmp_path: Path) -> None:
    plain = cli("generate", "--json", "gpus=cpu", "precision=fp32", f"hydra.run.dir={tmp_path}/a")
    spread = cli("generate", "--json", "profile=tiny-glm-cpu-disk", f"hydra.run.dir={tmp_path}/b")
    assert plain.code == spread.code == 0, plain.err + spread.err
    ids = [json.loads(r.out)["results"]["generate"]["new_ids"] for r in (plain, spread)]
    assert ids[0] == ids[1]


def test_bench_prints_its_table(cli: Any, tmp_path: Path) -> None:
    result = cli("bench", "gpus=cpu", "runtime.max_new_tokens=8", f"hydra.run.dir={tmp_path}")
    assert result.code == 0, result.err
    assert "time to first token" in result.out and "tokens/s" in result.out
    assert "planned MiB" in result.out


def test_failed_job_leaves_a_failed_record(cli: Any, tmp_path: Path) -> None:
    result = cli("plan", "model=llama-3-70b", "gpus=2x24gib", f"hydra.run.dir={tmp_path}")
    assert result.code == 5
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["error"]["exit_code"] == 5


def test_gpus_that_are_not_there_exit_3(cli: Any, tmp_path: Path) -> None:
    result = cli("plan", "gpus=ids", "gpus.ids=[3]", f"hydra.run.dir={tmp_path}")
    assert result.code == 3
    assert "gpus.ids: GPU 3 is not on this machine" in result.err
    assert "Traceback" not in result.err


def test_doctor_on_a_cpu_only_machine(cli: Any) -> None:
    result = cli("doctor")
    assert result.code == 0
    assert "CUDA" in result.out
    fit = cli("doctor", "--json", "profile=glm-4-9b-4x24gib")
    assert "fits" in json.loads(fit.out)["fit"]


def test_convert_then_plan_the_converted_checkpoint(
    cli: Any, chatglm3_tiny: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "native"
    result = cli("convert", str(chatglm3_tiny), str(dst))
    assert result.code == 0, result.err
    assert (dst / "config.json").is_file()
    again = cli("convert", str(chatglm3_tiny), str(dst))
    assert again.code == 2 and "--overwrite" in again.err  # an output problem, not a load one
    onto_source = cli("convert", str(chatglm3_tiny), str(chatglm3_tiny))
    assert onto_source.code == 2 and "would overwrite the source checkpoint" in onto_source.err
    plan = cli(
        "plan",
        "model=local",
        f"model.source.path={dst}",
        "gpus=cpu",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert plan.code == 0, plan.err


def test_legacy_checkpoint_on_the_fly_equals_converted(
    cli: Any, chatglm3_tiny: Path, tmp_path: Path
) -> None:
    # Exact reference logits/tokens are checked in test_loader; here the CLI path must agree
    # whether the legacy checkpoint is converted on the fly or by `glmdeploy convert` first.
    native = tmp_path / "native"
    assert cli("convert", str(chatglm3_tiny), str(native)).code == 0
    common = [
        "gpus=cpu",
        "precision=fp32",
        "runtime.max_new_tokens=8",
        "runtime.max_context_tokens=64",
        "model=local",
    ]
    ids = []
    for i, path in enumerate((chatglm3_tiny, native)):
        result = cli(
            "generate",
            "--json",
            *common,
            f"model.source.path={path}",
            f"hydra.run.dir={tmp_path}/{i}",
        )
        assert result.code == 0, result.err
        ids.append(json.loads(result.out)["results"]["generate"]["new_ids"])
    assert ids[0] == ids[1] and len(ids[0][0]) == 8


def test_a_plan_sweep_from_the_command_line_records_every_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "glmdeploy",
            "plan",
            "-m",
            "gpus=2x24gib,4x24gib",
            "precision=bf16,fp16",
            "runtime=chat,batch",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    records = sorted(sweep.glob("*/run.json"))
    assert len(records) == 8
    assert {json.loads(r.read_text())["status"] for r in records} == {"ok"}


@pytest.mark.parametrize("command", ["load", "generate", "bench", "run"])
def test_job_commands_take_help(cli: Any, command: str) -> None:
    result = cli(command, "--help")
    assert result.code == 0 and f"usage: glmdeploy {command}" in result.out


def test_a_job_records_into_outputs_date_time_by_default(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("plan", "gpus=2x24gib", "runtime.batch_size=2")
    assert result.code == 0, result.err
    (run_json,) = tmp_path.glob("outputs/*-*-*/*-*-*/run.json")
    assert f"record: {run_json}" in result.out
    record = json.loads(run_json.read_text())
    assert record["overrides"] == ["gpus=2x24gib", "runtime.batch_size=2"]
    assert record["choices"]["gpus"] == "2x24gib" and record["choices"]["model"] == "tiny-glm"
    assert {p.name for p in run_json.parent.iterdir()} == {
        "run.json",
        "plan.json",
        "plan.png",
        "resolved.yaml",
    }


@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--info"]])
def test_hydra_flags_still_reach_hydra(cli: Any, flags: list[str]) -> None:
    result = cli("plan", *flags, "gpus=2x24gib")
    assert result.code == 0, result.err
    assert "2x24gib" in result.out or "gpus" in result.out


def test_hydra_job_settings_apply_to_the_job_only(cli: Any, tmp_path: Path) -> None:
    before_cwd, before_env = Path.cwd(), dict(os.environ)
    run = tmp_path / "run"
    result = cli("plan", "gpus=2x24gib", "hydra.job.chdir=true",
                 "+hydra.job.env_set.GLMDEPLOY_TEST_SET=1", f"hydra.run.dir={run}")  # fmt: skip
    assert result.code == 0, result.err
    assert {p.name for p in run.iterdir()} == {"run.json", "plan.json", "plan.png", "resolved.yaml"}
    assert Path.cwd() == before_cwd and dict(os.environ) == before_env


@pytest.mark.slow
def test_sigterm_stops_a_job_as_ctrl_c_does_and_the_record_says_interrupted(
    tmp_path: Path,
) -> None:
    """`kill`, `timeout` and schedulers send SIGTERM: the record must not stay `running`."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmdeploy", "generate", "gpus=cpu", "runtime.max_new_tokens=4000",
         "runtime.max_context_tokens=8192", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    record = run_dir / "run.json"
    deadline = time.monotonic() + 120
    while not (record.is_file() and json.loads(record.read_text())["status"] == "running"):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the job never started")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert json.loads(record.read_text())["status"] == "interrupted"
