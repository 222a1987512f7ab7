"""A sweep directory claimed by one sweep: locked against concurrent sweeps, never over old records.

A sweep writes `sweep.json` and one numbered job directory per job (`0/`, `1/`, … each with its
`run.json`). Before any job runs, the sweep claims its directory:

- an exclusive lock, `.glmdeploy-sweep.lock` holding the owner's pid: a second sweep into the same
  directory is refused while the first runs. The lock is an advisory `flock` on that file, which
  the operating system drops when its process ends, however it ends, so the lock of a dead sweep
  is recovered by the next one without anyone cleaning up.
- a directory that already holds records (`sweep.json`, `run.json`, numbered job directories with
  a `run.json` or `output.log`) is refused, unless the user asked to replace them (`--overwrite`,
  which deletes the old job directories and sweep files first), or the directory was not named by
  the user (Hydra's default `multirun/DATE/TIME`): then the next free `…-1`, `…-2` beside it is
  used.
- numbered directories that hold files but no job record, and folders named like a sweep file,
  are the user's: such a directory is refused even with `--overwrite` (nothing of theirs is
  deleted or written into).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from glmdeploy.outputs import siblings
from glmdeploy.problems import ConfigError, Problem

LOCK_NAME = ".glmdeploy-sweep.lock"
SWEEP_FILES = ("sweep.json", "report.md", "report.csv", "report.png", "run.json")
JOB_FILES = ("run.json", "output.log")  # what makes a numbered directory a job's


@dataclass
class SweepLock:
    """The claim on a sweep directory; `release` it when the sweep ends (the OS does, at exit)."""

    root: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            (self.root / LOCK_NAME).unlink()  # while still holding it: see `_try_lock`
        os.close(self.fd)
        self.fd = None


def claim_sweep_dir(root: Path, *, named: bool, overwrite: bool) -> SweepLock:
    """Lock `root` (or, when not `named` by the user, the first free sibling) for one sweep.

    Args:
        root: the sweep directory (`hydra.sweep.dir`).
        named: the user chose it; if it is taken, that is an error rather than a new directory.
        overwrite: replace the records it holds.

    Raises:
        ConfigError: another sweep holds the directory, or it holds records (and not overwrite),
            or it cannot be created.
    """
    candidates = [root] if named or overwrite else siblings(root)
    for candidate in candidates:
        lock = _try_lock(candidate)
        if isinstance(lock, int | str):
            if candidate is candidates[-1] or named:
                raise ConfigError([_locked(candidate, lock)], "the sweep directory is in use")
            continue
        foreign = foreign_entries(candidate)
        if foreign:  # the user's own folders: never deleted, never written into
            lock.release()
            if named:
                raise ConfigError([_foreign(candidate, foreign)], "the sweep directory is taken")
            continue
        records = existing_records(candidate)
        if records and overwrite:
            clear_records(candidate)
        elif records:
            lock.release()
            if named:
                raise ConfigError([_taken(candidate, records)], "the sweep directory is taken")
            continue
        return lock
    raise ConfigError([Problem("hydra.sweep.dir", f"no free directory beside {root}")])


def existing_records(root: Path) -> list[str]:
    """The record files and job directories in `root` that a sweep would overwrite."""
    if not root.is_dir():
        return []
    found = [name for name in SWEEP_FILES if (root / name).is_file()]
    jobs = sorted((p for p in root.iterdir() if p.name.isdigit() and p.is_dir()),
                  key=lambda p: int(p.name))  # fmt: skip
    return found + [f"{p.name}/" for p in jobs if _is_job_dir(p)]


def foreign_entries(root: Path) -> list[str]:
    """What in `root` has the name of a sweep's record but is not one: numbered directories that
    hold files but no job record, and folders named like a sweep file. A sweep must neither delete
    them (--overwrite) nor write into them."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.isdigit() and p.is_dir()
             and any(p.iterdir()) and not _is_job_dir(p)]  # fmt: skip
    jobs = [f"{p.name}/" for p in sorted(found, key=lambda p: int(p.name))]
    named = [f"{n}/" for n in SWEEP_FILES if (root / n).exists() and not (root / n).is_file()]
    return named + jobs


def clear_records(root: Path) -> None:
    """Delete the sweep files and numbered job directories of an earlier sweep (--overwrite)."""
    for name in SWEEP_FILES:
        if (root / name).is_file():
            (root / name).unlink()
    for path in root.iterdir():
        if path.name.isdigit() and path.is_dir() and _is_job_dir(path):
            shutil.rmtree(path)


def _is_job_dir(path: Path) -> bool:
    """A job's directory: its run record, or the output the sweep kept of it."""
    return any((path / name).is_file() for name in JOB_FILES)


def _try_lock(root: Path) -> SweepLock | int | str:
    """The lock, or the pid (text if unreadable) of the sweep that holds it.

    A lock file is removed by its holder on release; a process that opened it just before must not
    then hold a lock on a file no longer there, so the inode is checked after locking.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([Problem("hydra.sweep.dir", f"cannot create {root}: {exc}")]) from exc
    path = root / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _owner(path)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and removed between our open and our lock: try again
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return SweepLock(root, fd)


def _owner(path: Path) -> int | str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"
    return int(text) if text.isdigit() else "unknown"


def _some_of(names: list[str], most: int = 6) -> str:
    """The names, comma-separated; past `most` of them, the first `most` and `… (N in all)`."""
    more = f", … ({len(names)} in all)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _locked(root: Path, owner: int | str) -> Problem:
    return Problem(
        "hydra.sweep.dir",
        f"another sweep (pid {owner}) is writing into {root}",
        "a directory no running sweep writes into",
        "wait for that sweep to finish, or choose another: hydra.sweep.dir=DIR",
    )


def _foreign(root: Path, folders: list[str]) -> Problem:
    shown = _some_of(folders)
    return Problem(
        "hydra.sweep.dir",
        f"{root} holds folders that are not a sweep's records (no run.json): {shown}; a sweep "
        "writes its jobs and files there (0/, 1/, …, sweep.json) and --overwrite deletes them",
        "an empty or new directory",
        "move those folders away, or choose another: hydra.sweep.dir=DIR",
    )


def _taken(root: Path, records: list[str]) -> Problem:
    shown = _some_of(records)
    return Problem(
        "hydra.sweep.dir",
        f"{root} already holds the records of a sweep ({shown})",
        "an empty or new directory",
        "choose another: hydra.sweep.dir=DIR, or replace them: --overwrite",
    )
