"""Interrupted conversions: atomic replacement, rollback and cleanup of what killed runs left."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.loading.convert import MARKER, convert_checkpoint, ensure_native
from glmdeploy.loading.embedded import materialize
from glmdeploy.staging import JOURNAL_FORMAT, process_token, recover, staging

FIXTURE = Path(__file__).parent / "fixtures" / "chatglm3-tiny"

# The child converts FIXTURE into DST (replacing it) and is killed (os._exit) at one point.
KILLED = """
import os, shutil, sys
from pathlib import Path
from glmdeploy import staging
from glmdeploy.loading import convert
where, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if where == "between-renames":  # no RENAME_EXCHANGE here: the two-rename fallback
    staging._exchange = lambda a, b: False
    first = os.rename
    calls = []
    def rename(a, b):
        calls.append(a)
        if len(calls) == 2:
            os._exit(9)
        first(a, b)
    staging.os.rename = rename
elif where == "after-exchange":
    staging.shutil.rmtree = lambda *a, **k: os._exit(9)
elif where == "while-writing":
    convert.save_file = lambda *a, **k: os._exit(9)
convert.convert_checkpoint(src, dst, progress=False, overwrite=True)
"""


def killed_convert(where: str, src: Path, dst: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED, where, str(src), str(dst)])
    assert proc.returncode == 9


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def old_dst(tmp_path: Path) -> Path:
    dst = tmp_path / "out" / "dst"
    dst.mkdir(parents=True)
    (dst / "old-contents").write_text("keep me")
    return dst


def test_replace_is_atomic_and_leaves_nothing_beside(old_dst: Path) -> None:
    inode = old_dst.stat().st_ino
    result = convert_checkpoint(FIXTURE, old_dst, progress=False, overwrite=True)
    assert not (old_dst / "old-contents").exists() and (old_dst / "config.json").is_file()
    assert old_dst.stat().st_ino != inode and result.notes == ()
    assert hidden(old_dst.parent) == []


def test_a_replace_killed_between_its_two_renames_is_rolled_back(cli: Any, old_dst: Path) -> None:
    killed_convert("between-renames", FIXTURE, old_dst)
    assert not old_dst.exists()  # what the kill left: the old contents only under a hidden name
    assert any(name.endswith(".old") for name in hidden(old_dst.parent))
    notes = recover(old_dst.parent)
    assert (old_dst / "old-contents").read_text() == "keep me"
    assert hidden(old_dst.parent) == []
    assert len(notes) == 1 and f"restored {old_dst}" in notes[0] and "is gone" in notes[0]


def test_the_next_convert_cleans_up_and_says_so(cli: Any, old_dst: Path) -> None:
    killed_convert("while-writing", FIXTURE, old_dst)
    assert (old_dst / "old-contents").is_file()  # untouched
    assert any(name.endswith(".tmp") for name in hidden(old_dst.parent))
    result = cli("convert", "--overwrite", str(FIXTURE), str(old_dst))
    assert result.code == 0, result.err
    assert "note: removed" in result.err and "left over" in result.err
    assert hidden(old_dst.parent) == [] and (old_dst / "config.json").is_file()


def test_killed_after_the_exchange_keeps_the_new_contents(old_dst: Path) -> None:
    killed_convert("after-exchange", FIXTURE, old_dst)
    assert (old_dst / "config.json").is_file()  # the exchange happened: new contents in place
    notes = recover(old_dst.parent)
    assert hidden(old_dst.parent) == [] and len(notes) == 1
    assert (old_dst / "config.json").is_file() and not (old_dst / "old-contents").exists()


def test_a_killed_load_time_conversion_is_removed_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    killed_convert("while-writing", FIXTURE, cache / "0123456789abcdef0123")
    assert len(hidden(cache)) == 2  # the staging directory and its journal
    native = ensure_native(FIXTURE, cache, progress=False)
    assert (native.path / MARKER).is_file()
    assert any("left over" in note for note in native.notes)
    assert [p for p in hidden(cache) if not p.endswith(".lock")] == []


def write_journal(dst: Path, pid: int, *, host: str | None = None, token: str | None) -> Path:
    tmp = dst.with_name(f".{dst.name}.glmdeploy-{pid}.tmp")
    tmp.mkdir()
    (tmp / "shard").write_bytes(b"x" * 1000)
    journal = {"format": JOURNAL_FORMAT, "pid": pid, "process": token,
               "host": host or socket.gethostname(), "dst": dst.name}  # fmt: skip
    dst.with_name(f".{dst.name}.glmdeploy-{pid}.json").write_text(json.dumps(journal))
    return tmp


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_leftovers_of_dead_local_glmdeploy_processes_are_touched(tmp_path: Path) -> None:
    me = os.getpid()
    alive = write_journal(tmp_path / "a", me, token=process_token(me))
    elsewhere = write_journal(tmp_path / "b", dead_pid(), host="another-host", token=None)
    reused = write_journal(tmp_path / "c", me, token="another-boot:1")  # my pid, older process
    dead = write_journal(tmp_path / "d", dead_pid(), token=None)
    (tmp_path / ".e.glmdeploy-1.json").write_text("[]")  # not a journal: not ours to judge
    (tmp_path / ".e.glmdeploy-1.tmp").mkdir()
    (tmp_path / ".f.tmp").mkdir()  # no journal at all
    notes = recover(tmp_path)
    assert alive.exists() and elsewhere.exists()
    assert not reused.exists() and not dead.exists()
    assert len(notes) == 2 and all("left over" in n for n in notes)
    assert (tmp_path / ".e.glmdeploy-1.tmp").exists() and (tmp_path / ".f.tmp").exists()


def test_a_staging_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    with staging(tmp_path / "dst") as staged:
        assert recover(tmp_path) == [] and staged.tmp.is_dir()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def umask() -> Iterator[Any]:
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def modes(directory: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in (directory, *directory.rglob("*"))}


@pytest.mark.parametrize(("mask", "expected"), [(0o022, {0o755, 0o644}), (0o077, {0o700, 0o600})])
def test_converted_and_materialised_checkpoints_honour_the_umask(
    umask: Any, tmp_path: Path, mask: int, expected: set[int]
) -> None:
    umask(mask)
    convert_checkpoint(FIXTURE, tmp_path / "native", progress=False)
    assert modes(tmp_path / "native") == expected
    from builders import TINY_ARCH

    materialised = materialize(TINY_ARCH, seed=0, root=tmp_path / "embedded")
    assert modes(materialised) == expected
    shutil.rmtree(tmp_path / "native")


def test_concurrent_load_time_conversions_of_one_checkpoint_convert_once(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from glmdeploy.loading.convert import ensure_native;"
        " print(ensure_native(Path(sys.argv[1]), Path(sys.argv[2]), progress=False).path)"
    )
    argv = [sys.executable, "-c", script, str(FIXTURE), str(tmp_path / "cache")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    converted = Path(paths.pop())
    assert (converted / MARKER).is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        converted.name
    ]
