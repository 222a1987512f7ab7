"""Check that glmdeploy can write where it was asked to, before it writes anything there.

Run and sweep directories, `--save` files, conversion destinations and the cache are all checked
here first: a path under a regular file, a file where a directory should be, a directory that
cannot be created or written, or a full disk is an `OutputError` (exit 2) naming the path, instead
of a traceback after half of the output was written.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from glmdeploy.problems import OutputError, Problem

MIN_FREE_BYTES = 2**20  # a run record, a plan, a picture: refuse a disk with less than this free
MAX_SIBLINGS = 1000  # `siblings`: DIR, DIR-1, … DIR-999


def output_error(path: Path | str, exc: OSError, what: str, hint: str | None = None) -> OutputError:
    """An OSError met while writing `path`, as the user-facing error."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOSPC:
        hint = hint or "free some space, or write somewhere else"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = hint or "choose a directory you can write"
    return OutputError([Problem(str(path), f"cannot write {what}: {reason}", hint=hint)])


def check_directory(
    path: Path | str, what: str, *, needed_bytes: int = MIN_FREE_BYTES, hint: str | None = None
) -> None:
    """Raise OutputError unless directory `path` exists or can be created, and has room.

    Args:
        path: the directory (it need not exist yet).
        what: what it is for, as the user named it (`hydra.run.dir`, `the run directory`, …).
        needed_bytes: the free space it needs.
        hint: how to choose another location.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise _refuse(path, f"{what} is a file, not a directory", hint)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise _refuse(path, f"cannot create {what}: {existing} is a file, not a directory", hint)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _refuse(path, f"cannot create {what}: {existing} is not writable", hint)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        message = f"cannot create {what}: {existing} is on a read-only file system"
        raise _refuse(path, message, hint)
    usage = shutil.disk_usage(existing)
    if usage.total == 0:
        message = f"cannot create {what}: {existing} is on a virtual file system (no files)"
        raise _refuse(path, message, hint)
    free = usage.free
    if free < needed_bytes:
        message = (
            f"not enough space for {what}: {_size(needed_bytes)} needed, {_size(free)} free "
            f"on the disk holding {existing}"
        )
        raise _refuse(path, message, hint or "free some space, or write somewhere else")


def check_file(
    path: Path | str, what: str, *, hint: str | None = None, create_parents: bool = False
) -> None:
    """Raise OutputError unless file `path` can be (over)written: its directory exists (or, with
    `create_parents`, can be created), etc."""
    path = Path(path)
    if path.is_dir():
        raise _refuse(path, f"{what} is a directory", hint or "give a file name, e.g. plan.json")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise _refuse(path, f"cannot write {what}: {parent} is a file, not a directory", hint)
    if not parent.exists() and not create_parents:
        hint = hint or f"create the directory first: mkdir -p {parent}"
        raise _refuse(path, f"cannot write {what}: the directory {parent} does not exist", hint)
    check_directory(parent, f"the directory of {what}", hint=hint)


def make_directory(path: Path | str, what: str, *, hint: str | None = None) -> Path:
    """`check_directory`, then create it (and its parents). Returns the path."""
    path = Path(path)
    check_directory(path, what, hint=hint)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # root bypasses os.access; read-only mounts, races, quotas
        raise output_error(path, exc, what, hint) from exc
    return path


def siblings(path: Path) -> list[Path]:
    """`path` and the names that replace it when it is taken: `path-1`, … `path-999`."""
    return [path, *(path.with_name(f"{path.name}-{n}") for n in range(1, MAX_SIBLINGS))]


def claim_new_directory(path: Path | str, what: str, *, hint: str | None = None) -> Path:
    """Create `path`, or the first of `path-1`, `path-2`, … that does not exist yet, and return it.

    For directories named by the clock (Hydra's `outputs/DATE/TIME`): two jobs started in the same
    second each get their own, so neither writes over the other's record. The creation is the claim
    (`mkdir` fails if another process made it first), so concurrent jobs cannot pick the same one.
    """
    path = make_directory(Path(path).parent, what, hint=hint) / Path(path).name
    for candidate in siblings(path):
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise output_error(candidate, exc, what, hint) from exc
        return candidate
    message = f"cannot create {what}: {path} and {MAX_SIBLINGS - 1} siblings exist"
    raise _refuse(path, message, hint)


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (as a file or a directory)."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _refuse(path: Path, message: str, hint: str | None) -> OutputError:
    return OutputError([Problem(str(path), message, hint=hint)])


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
