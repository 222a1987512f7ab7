"""Sweeps end to end: a record per job, report, replay, and Ctrl-C leaving honest records."""

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


def _glmdeploy(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "glmdeploy", *args], capture_output=True,
                          text=True, **kwargs)  # fmt: skip


@pytest.mark.slow
def test_three_dimensional_sweep_report_and_replay(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = _glmdeploy("generate", "-m", "precision=fp32,bf16", "placement=auto,sequential",
                     "runtime.batch_size=1,2", "gpus=cpu", "runtime.max_new_tokens=4",
                     f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    records = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(8)]
    assert [r["status"] for r in records] == ["ok"] * 8
    assert records[5]["overrides"][:3] == ["precision=bf16", "placement=auto",
                                           "runtime.batch_size=2"]  # fmt: skip

    report = _glmdeploy("report", str(sweep))
    assert report.returncode == 0, report.stderr
    header = report.stdout.splitlines()[0]
    for column in ("precision", "placement", "runtime.batch_size", "status", "load_s"):
        assert column in header
    assert len([line for line in report.stdout.splitlines() if line.startswith("| ")]) == 9
    assert (sweep / "report.csv").is_file() and (sweep / "report.png").stat().st_size > 1000

    replay = _glmdeploy("replay", str(sweep / "5"))
    assert replay.returncode == 0, replay.stderr
    assert "reproduced: same plan, same tokens" in replay.stdout
    again = json.loads(next((sweep / "5" / "replays").glob("*/run.json")).read_text())
    assert again["results"]["generate"]["new_ids"] == records[5]["results"]["generate"]["new_ids"]


def test_replay_reports_environment_differences(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _glmdeploy("plan", "gpus=2x24gib", f"hydra.run.dir={run}").returncode == 0
    record = json.loads((run / "run.json").read_text())
    record["environment"]["packages"]["torch"] = "1.0.0"
    (run / "run.json").write_text(json.dumps(record))
    replay = _glmdeploy("replay", str(run))
    assert replay.returncode == 0, replay.stderr
    assert "differs: torch 1.0.0 →" in replay.stdout


@pytest.mark.slow
def test_ctrl_c_keeps_finished_records_and_marks_the_running_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmdeploy", "generate", "-m", "runtime.max_new_tokens=2,4000",
         "gpus=cpu", "runtime.max_context_tokens=8192", f"hydra.sweep.dir={sweep}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    second = sweep / "1" / "run.json"
    while time.monotonic() < deadline:
        if second.is_file() and json.loads(second.read_text())["status"] == "running":
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the second job never started")
    time.sleep(0.5)  # well inside its 4000-token generation
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "sweep interrupted: 1 of 2 job(s) finished ok" in err
    assert json.loads((sweep / "0" / "run.json").read_text())["status"] == "ok"
    interrupted = json.loads(second.read_text())
    assert interrupted["status"] == "interrupted"
    assert interrupted["finished_at"]
