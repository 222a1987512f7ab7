"""Sweep directories: plan sweeps run in-process and record every job; a directory holding records
is refused (or replaced with --overwrite, or a new one chosen); concurrent sweeps are locked out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.problems import ConfigError
from glmdeploy.records.sweep_dir import LOCK_NAME, claim_sweep_dir, existing_records

SWEEP = ["gpus=2x24gib,4x24gib", "precision=bf16,fp16", "runtime=chat,batch"]
RECORD_FILES = {"run.json", "plan.json", "plan.png", "resolved.yaml", "output.log"}


def sweep(cli: Any, root: Path, *args: str) -> Any:
    return cli("plan", "-m", *args, f"hydra.sweep.dir={root}")


def test_a_plan_sweep_runs_here_and_records_every_job(cli: Any, tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    result = sweep(cli, root, *SWEEP)
    assert result.code == 0, result.err
    assert "one process each" not in result.err  # no fresh process per plan job
    listed = json.loads((root / "sweep.json").read_text())
    assert listed["command"] == "plan" and len(listed["jobs"]) == 8
    for job in listed["jobs"]:
        run_dir = root / str(job["num"])
        assert {p.name for p in run_dir.iterdir()} == RECORD_FILES
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "ok" and record["overrides"] == job["overrides"]
        chosen = dict(o.split("=", 1) for o in job["overrides"])
        assert {g: record["choices"][g] for g in chosen} == chosen
        assert "fits" in (run_dir / "output.log").read_text()
    assert not (root / LOCK_NAME).exists()


def test_a_sweep_of_one_job_without_overrides_says_so(cli: Any, tmp_path: Path) -> None:
    result = cli("plan", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.code == 0, result.err
    assert "job 0: (no overrides): ok" in result.err  # was "job 0: : ok"


def test_a_second_sweep_into_a_finished_one_is_refused(cli: Any, tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    assert sweep(cli, root, "precision=bf16,fp16").code == 0
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    again = sweep(cli, root, "precision=fp32,bf16", "gpus=2x24gib")
    assert again.code == 2
    assert "already holds the records of a sweep (sweep.json, 0/, 1/)" in again.err
    assert "--overwrite" in again.err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_every_old_record(cli: Any, tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    assert sweep(cli, root, "runtime.batch_size=1,2,3").code == 0
    result = cli("plan", "-m", "--overwrite", "runtime.batch_size=4", f"hydra.sweep.dir={root}")
    assert result.code == 0, result.err
    assert sorted(p.name for p in root.iterdir()) == ["0", "sweep.json"]
    listed = json.loads((root / "sweep.json").read_text())["jobs"]
    record = json.loads((root / "0" / "run.json").read_text())
    assert listed == [{"num": 0, "overrides": ["runtime.batch_size=4"]}]
    assert record["overrides"] == ["runtime.batch_size=4"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_numbered_folders_of_the_user_are_neither_deleted_nor_written_into(
    cli: Any, tmp_path: Path, overwrite: bool
) -> None:
    root = tmp_path / "sweep"
    (root / "0").mkdir(parents=True)
    (root / "0" / "important.txt").write_text("precious\n")  # not a job: no run.json
    flags = ["--overwrite"] if overwrite else []
    result = cli("plan", "-m", *flags, "precision=bf16,fp16", f"hydra.sweep.dir={root}")
    assert result.code == 2, result.err  # --overwrite deleted 0/ with the user's file in it
    assert "folders that are not a sweep's records (no run.json): 0/" in result.err
    assert sorted(p.name for p in root.rglob("*")) == ["0", "important.txt"]
    assert (root / "0" / "important.txt").read_text() == "precious\n"


@pytest.mark.parametrize("name", ["sweep.json", "report.md"])
def test_a_folder_named_like_a_sweep_file_is_refused_not_an_internal_error(
    cli: Any, tmp_path: Path, name: str
) -> None:
    root = tmp_path / "sweep"
    (root / name).mkdir(parents=True)
    (root / name / "x").write_text("mine\n")
    result = cli("plan", "-m", "--overwrite", "precision=bf16,fp16", f"hydra.sweep.dir={root}")
    assert result.code == 2, result.err  # --overwrite unlinked it: IsADirectoryError, exit 1
    assert f"not a sweep's records (no run.json): {name}/" in result.err
    assert (root / name / "x").read_text() == "mine\n"


def test_overwrite_is_for_sweeps_only(cli: Any, tmp_path: Path) -> None:
    result = cli("plan", "--overwrite", f"hydra.run.dir={tmp_path}")
    assert result.code == 2 and "--overwrite" in result.err


def test_a_taken_default_directory_moves_to_the_next_number(tmp_path: Path) -> None:
    root = tmp_path / "multirun" / "12-00-00"
    (root / "0").mkdir(parents=True)
    (root / "0" / "run.json").write_text("{}")
    lock = claim_sweep_dir(root, named=False, overwrite=False)
    try:
        assert lock.root == root.with_name("12-00-00-1")
        assert (lock.root / LOCK_NAME).read_text().strip() == str(os.getpid())
    finally:
        lock.release()
    assert existing_records(root) == ["0/"] and not (lock.root / LOCK_NAME).exists()


def test_a_running_sweep_locks_out_another_and_its_lock_dies_with_it(
    cli: Any, tmp_path: Path
) -> None:
    root = tmp_path / "sweep"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; "
         "from glmdeploy.records.sweep_dir import claim_sweep_dir; "
         f"claim_sweep_dir(Path({str(root)!r}), named=True, overwrite=False); "
         "print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        blocked = sweep(cli, root, "precision=bf16,fp16")
        assert blocked.code == 2
        assert f"another sweep (pid {holder.pid}) is writing into {root}" in blocked.err
        assert not (root / "sweep.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without cleaning up: its lock file stays
        holder.wait()
    assert (root / LOCK_NAME).read_text().strip() == str(holder.pid)
    result = sweep(cli, root, "precision=bf16,fp16")  # the dead sweep's lock is recovered
    assert result.code == 0, result.err
    assert len(list(root.glob("*/run.json"))) == 2


def test_a_sweep_directory_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError) as err:
        claim_sweep_dir(tmp_path / "f", named=True, overwrite=False)
    assert err.value.problems[0].path == "hydra.sweep.dir"
