"""How the `glmdeploy` process starts and ends (`glmdeploy.process`), in real processes: atexit
handlers run, all output arrives, threads are waited for, a reader that left is not an error and
a full disk is, and the job is recorded either way."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glmdeploy import process


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "script.py"
    path.write_text("from glmdeploy.process import exit_process\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_atexit_handlers_run_and_all_output_arrives(tmp_path: Path) -> None:
    marker = tmp_path / "atexit-ran"
    argv = script(
        tmp_path,
        f"""
        import atexit, pathlib, sys
        atexit.register(pathlib.Path({str(marker)!r}).write_text, "yes")
        sys.stdout.write("x" * 3_000_000)  # more than any buffer: partly still buffered
        print("to stderr", file=sys.stderr, end="")
        exit_process(3)
    """,
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "x" * 3_000_000 and proc.stderr == "to stderr"
    assert marker.read_text() == "yes"


def test_a_running_thread_is_waited_for(tmp_path: Path) -> None:
    marker = tmp_path / "thread-finished"
    argv = script(
        tmp_path,
        f"""
        import pathlib, threading, time
        def work():
            time.sleep(0.5)
            pathlib.Path({str(marker)!r}).write_text("done")
        threading.Thread(target=work).start()
        exit_process(0)
    """,
    )
    assert subprocess.run(argv, timeout=60).returncode == 0
    assert marker.read_text() == "done"


def test_a_reader_that_left_is_not_an_error(tmp_path: Path) -> None:
    argv = script(
        tmp_path,
        """
        import sys
        sys.stdin.readline()  # the reader has gone when this returns
        print("a plan nobody reads")
        exit_process(0)
    """,
    )
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=buffered)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_the_console_script_tunes_the_collector_and_main_does_not() -> None:
    before = gc.get_threshold()
    from glmdeploy.cli.main import main

    assert main(["--version"]) == 0
    assert gc.get_threshold() == before  # in-process callers keep their own settings
    code = "import gc; from glmdeploy.cli.main import main; main(['--version']); " \
           "print(gc.get_threshold())"  # fmt: skip
    inside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert inside.stdout.splitlines()[-1] == str(before)
    try:
        process.tune_collector()
        assert gc.get_threshold() == process.THRESHOLDS
    finally:
        process.default_collector()
    assert gc.get_threshold() == before
    console = [sys.executable, "-c", "import gc, atexit; from glmdeploy.cli.main import console; "
               "atexit.register(lambda: print(gc.get_threshold())); console()",
               "--version"]  # fmt: skip
    out = subprocess.run(console, capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert out[0].startswith("glmdeploy ") and out[-1] == str(process.THRESHOLDS)


def a_plan(tmp_path: Path, unbuffered: str | None) -> tuple[list[str], dict[str, str], Path]:
    """`glmdeploy plan` as a command line, its environment (stdout buffered or not) and run dir."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({"PYTHONUNBUFFERED": unbuffered} if unbuffered else {})
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "glmdeploy", "plan", "gpus=2x24gib", f"hydra.run.dir={run_dir}"]
    return argv, env, run_dir


@pytest.mark.parametrize("unbuffered", ["1", None])
def test_a_plan_whose_reader_left_finishes_and_is_recorded(
    tmp_path: Path, unbuffered: str | None
) -> None:
    argv, env, run_dir = a_plan(tmp_path, unbuffered)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `glmdeploy plan | head -0`: the reader is gone before the first line
    assert proc.wait(timeout=120) == 0
    assert b"error" not in proc.stderr.read()
    proc.stderr.close()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok" and (run_dir / "plan.json").is_file()


def test_a_profiler_still_gets_its_table() -> None:
    argv = [sys.executable, "-m", "cProfile", "-m", "glmdeploy", "--version"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "function calls" in proc.stdout


def test_the_model_runs_with_the_default_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import glmdeploy

    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path))
    defaults = gc.get_threshold()
    loaded = glmdeploy.load(["gpus=cpu", "runtime.max_new_tokens=2"])
    try:
        for run in (lambda: glmdeploy.generate(loaded), lambda: glmdeploy.bench(loaded, repeats=1)):
            process.tune_collector()  # as the console script does: planning and loading tuned
            run()  # then the model runs as in any process
            assert gc.get_threshold() == defaults
    finally:
        process.default_collector()
        gc.set_threshold(*defaults)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("unbuffered", ["1", None])
def test_output_to_a_full_disk_is_an_error_but_the_job_is_recorded(
    tmp_path: Path, unbuffered: str | None
) -> None:
    argv, env, run_dir = a_plan(tmp_path, unbuffered)
    with open("/dev/full", "w") as full:  # every write fails: no space left on device
        proc = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=120)  # fmt: skip
    assert proc.returncode == 2  # as any output that cannot be written
    assert proc.stderr.strip().endswith(
        "error: cannot write the output: stdout: [Errno 28] No space left on device"
    )
    assert "Traceback" not in proc.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok"
