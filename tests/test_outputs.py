"""Output locations that cannot be written: a clear error naming the path, exit 2, nothing written;
and a run record that can no longer be written never goes on saying `running`."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glmdeploy import atomic
from glmdeploy.outputs import check_directory, make_directory
from glmdeploy.problems import ConfigError, ExitCode, OutputError, Problem
from glmdeploy.records.record import RUN_JSON, RecordWriter, RunRecord, read_record

FIXTURE = Path(__file__).parent / "fixtures" / "chatglm3-tiny"

# (argv with {file}, {dir} and {tmp} placeholders, the path the error names, a phrase of it)
CASES: list[tuple[list[str], str, str]] = [
    (["plan", "hydra.run.dir={file}"], "{file}", "is a file, not a directory"),
    (["plan", "hydra.run.dir={file}/run"], "{file}/run", "{file} is a file, not a directory"),
    (["plan", "hydra.run.dir=/proc/glmdeploy/run"], "/proc/glmdeploy/run", "virtual file system"),
    (["plan", "-m", "precision=bf16,fp32", "hydra.sweep.dir={file}"], "{file}", "sweep directory"),
    (["plan", "-m", "precision=bf16,fp32", "hydra.sweep.dir={file}/x"], "{file}/x", "is a file"),
    (["plan", "--save", "{dir}"], "{dir}", "the plan file (--save) is a directory"),
    (["plan", "--save", "{tmp}/missing/p.json"], "{tmp}/missing/p.json", "does not exist"),
    (["plan", "--save", "{file}/p.json"], "{file}/p.json", "{file} is a file"),
    (["convert", str(FIXTURE), "{file}/native"], "{file}/native", "{file} is a file"),
    (["convert", str(FIXTURE), "{file}"], "{file}", "the destination is a file"),
]


@pytest.mark.parametrize(("argv", "path", "phrase"), CASES)
def test_unwritable_outputs_are_named_and_nothing_is_written(
    cli: Any, tmp_path: Path, argv: list[str], path: str, phrase: str
) -> None:
    places = {
        "file": str(tmp_path / "a-file"),
        "dir": str(tmp_path / "a-dir"),
        "tmp": str(tmp_path),
    }
    (tmp_path / "a-file").write_text("mine\n")
    (tmp_path / "a-dir").mkdir()
    before = sorted(tmp_path.rglob("*"))
    args = [a.format(**places) for a in argv]
    if args[0] == "plan":
        args += ["gpus=cpu", f"hydra.run.dir={tmp_path}/run"] * ("hydra.run.dir" not in argv[1])
    result = cli(*args)
    assert result.code == ExitCode.CONFIG, result.err
    assert f"  {path.format(**places)}: " in result.err
    assert phrase.format(**places) in result.err
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert sorted(tmp_path.rglob("*")) == before  # no run directory, no temp file, nothing
    assert (tmp_path / "a-file").read_text() == "mine\n"


def test_a_read_only_directory_is_refused() -> None:
    base = Path(tempfile.mkdtemp())
    try:
        os.chmod(base, 0o755)
        (base / "ro").mkdir(mode=0o555)
        message = _as_nobody(lambda: _refusal(base / "ro" / "run"))  # root may write anywhere
        assert (
            message == f"{base}/ro/run: cannot create the run directory: {base}/ro is not writable"
        )
        assert list((base / "ro").iterdir()) == []
    finally:
        shutil.rmtree(base)


def _refusal(path: Path) -> str:
    try:
        make_directory(path, "the run directory")
    except OutputError as exc:
        (problem,) = exc.problems
        return f"{problem.path}: {problem.message}"
    return "no error"


def _as_nobody(fn: Callable[[], str]) -> str:
    """`fn()` in a forked child running as user nobody (when this process runs as root)."""
    if os.geteuid() != 0:
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, answer through the pipe, exit without cleanup
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, fn().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    return text


def test_a_full_disk_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as info:
        check_directory(tmp_path / "x", "the destination", needed_bytes=2**62)
    (problem,) = info.value.problems
    assert problem.path == str(tmp_path / "x") and "not enough space" in problem.message
    assert "GiB needed" in problem.message and problem.hint


def no_space(fits: int = -1) -> Callable[[Path | str, str], None]:
    """`atomic.write_text` on a disk with room for files of at most `fits` bytes."""
    real = atomic.write_text

    def write_text(path: Path | str, text: str) -> None:
        if len(text.encode()) > fits:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    return write_text


def record() -> RunRecord:
    return RunRecord("plan", {"model": {"name": "tiny"}}, ["gpus=cpu"], environment={"a": 1})


@pytest.fixture
def started(tmp_path: Path) -> Iterator[RecordWriter]:
    yield RecordWriter(tmp_path / "run").start(record())


def test_a_record_that_cannot_be_started_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "write_text", no_space())
    with pytest.raises(OutputError) as info:
        RecordWriter(tmp_path / "run").start(record())
    assert "No space left on device" in info.value.problems[0].message
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.parametrize("name", ["run.json", "resolved.yaml"])
def test_a_directory_in_the_place_of_the_record_is_an_output_error(
    cli: Any, tmp_path: Path, name: str
) -> None:
    (tmp_path / "run" / name).mkdir(parents=True)  # was an internal error (exit 1)
    (tmp_path / "run" / name / "theirs").write_text("mine\n")
    result = cli("plan", "gpus=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.code == ExitCode.CONFIG, result.err
    assert f"run/{name}: cannot write the run record: Is a directory" in result.err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [name]
    assert (tmp_path / "run" / name / "theirs").read_text() == "mine\n"


def test_a_record_that_cannot_be_finished_is_removed(
    started: RecordWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_record(started.run_dir).status == "running"
    monkeypatch.setattr(atomic, "write_text", no_space())
    with pytest.raises(OutputError):
        started.finish("ok", results={"plan": {"fits": True}})
    assert not (started.run_dir / RUN_JSON).exists()  # no record rather than a false one
    assert [p.name for p in started.run_dir.iterdir() if p.name.startswith(".")] == []


def test_a_nearly_full_disk_keeps_a_small_failed_record(
    started: RecordWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "write_text", no_space(fits=2000))
    with pytest.raises(OutputError):
        started.finish("ok", results={"bench": {"numbers": list(range(1000))}})
    saved = read_record(started.run_dir)
    assert saved.status == "failed" and saved.finished_at is not None
    assert saved.error is not None and saved.error["exit_code"] == ExitCode.CONFIG
    assert "No space left on device" in saved.error["problems"][0]["message"]
    assert started.finish("ok").status == "failed"  # it stays what the disk says


def test_the_job_error_wins_over_a_record_that_cannot_be_written(
    started: RecordWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "write_text", no_space())
    error = ConfigError([Problem("runtime.prompt", "empty")])
    with pytest.raises(ConfigError), started:
        raise error
    assert not (started.run_dir / RUN_JSON).exists()
    assert started.lost is not None


def test_a_job_whose_record_fills_the_disk_ends_failed_not_running(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = atomic.write_text
    sizes: list[int] = []

    def fills_up(path: Path | str, text: str) -> None:  # the disk fills while the job runs
        sizes.append(len(text))
        last = Path(path).name == RUN_JSON and '"status": "ok"' in text
        if (len(sizes) > 3 and Path(path).name != RUN_JSON) or last:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(atomic, "write_text", fills_up)
    result = cli("plan", "gpus=cpu", f"hydra.run.dir={tmp_path}")
    assert result.code == ExitCode.CONFIG, result.err
    assert f"{tmp_path}/" in result.err and "No space left on device" in result.err
    assert "Traceback" not in result.err
    saved = json.loads((tmp_path / RUN_JSON).read_text())
    assert saved["status"] == "failed"


def test_a_claimed_directory_is_never_one_that_exists(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from glmdeploy.outputs import claim_new_directory

    (tmp_path / "out" / "12-00-00").mkdir(parents=True)
    first = claim_new_directory(tmp_path / "out" / "12-00-00", "the run directory")
    assert first == tmp_path / "out" / "12-00-00-1" and first.is_dir()
    with ThreadPoolExecutor(8) as pool:  # jobs started in the same second
        claimed = list(pool.map(lambda _: claim_new_directory(first.parent / "x", "d"), range(8)))
    assert len(set(claimed)) == 8 and all(p.is_dir() for p in claimed)


def test_a_job_in_the_same_second_as_another_keeps_its_own_record(
    cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hydra's default run directory is named to the second: it was shared, and the later job
    wrote its run.json, plan.json and plan.png over the earlier one's."""
    import datetime

    monkeypatch.chdir(tmp_path)
    now = datetime.datetime.now()
    theirs = []
    for s in range(-1, 30):  # every name the job can get while this test runs
        when = now + datetime.timedelta(seconds=s)
        run_dir = tmp_path / "outputs" / when.strftime("%Y-%m-%d") / when.strftime("%H-%M-%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_JSON).write_text('{"theirs": true}\n')
        theirs.append(run_dir)
    result = cli("plan", "gpus=2x24gib")
    assert result.code == 0, result.err
    assert all((d / RUN_JSON).read_text() == '{"theirs": true}\n' for d in theirs)
    (mine,) = tmp_path.glob("outputs/*/*-1/run.json")
    assert read_record(mine.parent).status == "ok" and f"record: {mine}" in result.out


def test_only_a_run_directory_named_by_the_clock_is_claimed_anew(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    """A dated `hydra.run.dir` (from the command line or a config file alike) moves on to `-1`
    when taken; a fixed one is the user's choice and is used as given, every time."""
    for _ in range(2):
        assert cli("plan", "gpus=cpu", f"hydra.run.dir={tmp_path}/fixed").code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["fixed"]
    import datetime

    year = datetime.date.today().strftime("%Y")
    (tmp_path / "dated" / year).mkdir(parents=True)  # what ${now:%Y} names, already taken
    result = cli("plan", "gpus=cpu", f"hydra.run.dir={tmp_path}/dated/${{now:%Y}}")
    assert result.code == 0, result.err
    (mine,) = (tmp_path / "dated").glob(f"{year}-1/run.json")
    assert f"record: {mine}" in result.out


@pytest.mark.parametrize("cache", ["{file}", "/proc/glmdeploy-cache"])
def test_a_cache_under_a_file_is_an_output_error_for_the_embedded_model(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    """It was exit 4 ('cannot load the model', hint: free some space)."""
    (tmp_path / "a-file").write_text("mine\n")
    monkeypatch.setenv("GLMDEPLOY_CACHE", cache.format(file=tmp_path / "a-file"))
    result = cli("load", "gpus=cpu", f"hydra.run.dir={tmp_path}/run")
    assert result.code == ExitCode.CONFIG, result.err
    assert "error: cannot write the output" in result.err
    assert "cannot create the cache of built models" in result.err
    assert "GLMDEPLOY_CACHE" in result.err and "Traceback" not in result.err
    assert (tmp_path / "a-file").read_text() == "mine\n"
    assert read_record(tmp_path / "run").status == "failed"
