"""Build a directory beside its destination, swap it into place whole, and clean up after crashes.

`staging(dst)` creates `.{name}.glmdeploy-{pid}.tmp` beside `dst`, after a journal
`.{name}.glmdeploy-{pid}.json` that names the owning process (pid, its start time and boot, the
host). `publish` moves the finished directory into place: onto a missing or empty `dst` by
rename(2); over a non-empty one by renameat2(RENAME_EXCHANGE) on Linux, one atomic step in which the
old contents move to the staging name and are then removed. Where the OS or file system cannot
exchange, the old directory is first renamed to `.{name}.glmdeploy-{pid}.old`, then the new one into
place; a crash between the two renames is rolled back by `recover`. Files get the permissions the
user's umask gives (safetensors and `tempfile` create 0600 files in 0700 directories).

`recover(parent)` settles what dead processes left in `parent` (only names with a journal, only
when its process is gone): an interrupted replace gets its old directory back, staging directories
are removed. It returns what it did, for the user.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmdeploy import atomic

JOURNAL_FORMAT = "glmdeploy.staging/1"
_JOURNAL = re.compile(r"^\.(?P<name>.+)\.glmdeploy-(?P<pid>\d+)\.json$")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@dataclass(frozen=True)
class Staged:
    """A directory being built for `dst`: `tmp` (write here), its `journal`, the `old` name."""

    dst: Path
    tmp: Path
    journal: Path
    old: Path


def _names(dst: Path, pid: int) -> Staged:
    stem = f".{dst.name}.glmdeploy-{pid}"
    return Staged(dst, dst.with_name(f"{stem}.tmp"), dst.with_name(f"{stem}.json"),
                  dst.with_name(f"{stem}.old"))  # fmt: skip


@contextmanager
def staging(dst: Path) -> Iterator[Staged]:
    """A fresh staging directory for `dst`; removed (and `dst` left as it was) on any exception.

    Call `publish` inside the block once the directory is complete; call `recover(dst.parent)`
    before, so that what a dead process left there is settled first.
    """
    staged = _names(Path(dst), os.getpid())
    token = process_token(os.getpid())
    journal = {"format": JOURNAL_FORMAT, "pid": os.getpid(), "process": token,
               "host": socket.gethostname(), "dst": staged.dst.name}  # fmt: skip
    atomic.write_text(staged.journal, json.dumps(journal) + "\n")
    try:
        staged.tmp.mkdir()
        yield staged
    except BaseException:
        settle(staged)
        raise
    settle(staged)


def publish(staged: Staged) -> None:
    """Move the complete `staged.tmp` into place at `staged.dst`, replacing what is there."""
    honour_umask(staged.tmp)
    dst = staged.dst
    if not dst.exists():
        os.rename(staged.tmp, dst)  # a directory created meanwhile makes it fail: never merged
    elif _exchange(staged.tmp, dst):
        pass  # staged.tmp now holds the old contents; `settle` removes them
    elif dst.is_dir() and not any(dst.iterdir()):
        os.replace(staged.tmp, dst)  # rename(2) replaces an empty directory
    else:
        os.rename(dst, staged.old)
        os.rename(staged.tmp, dst)


def settle(staged: Staged) -> str | None:
    """Finish or roll back what `staged` left: restore `old` if `dst` is gone, remove the rest.

    Returns a sentence for the user when something was restored or removed, else None.
    """
    said = []
    if staged.old.exists():
        if not staged.dst.exists():
            os.rename(staged.old, staged.dst)
            said.append(f"restored {staged.dst} (a replace of it was interrupted)")
        else:
            said.append(f"removed {staged.old} ({_size(staged.old)}, the replaced contents)")
            shutil.rmtree(staged.old, ignore_errors=True)
    if staged.tmp.exists():
        said.append(f"removed {staged.tmp} ({_size(staged.tmp)} left over)")
        shutil.rmtree(staged.tmp, ignore_errors=True)
    staged.journal.unlink(missing_ok=True)
    return "; ".join(said) or None


def recover(parent: Path) -> list[str]:
    """Settle every staging in `parent` whose process is gone; what was done, as sentences."""
    notes: list[str] = []
    with suppress(OSError):
        for journal in sorted(Path(parent).iterdir()):
            match = _JOURNAL.match(journal.name)
            data = _read_journal(journal) if match else None
            if match is None or data is None or data["pid"] != int(match["pid"]):
                continue
            if data["host"] != socket.gethostname() or owner_alive(data["pid"], data["process"]):
                continue  # another machine's (cannot tell), or still at work
            staged = _names(journal.with_name(match["name"]), data["pid"])
            note = settle(staged)
            if note:
                notes.append(f"{note}: left by process {data['pid']}, which is gone")
    return notes


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` while the block runs (waits for other holders).

    POSIX `flock`: the kernel releases it when its process dies, so it is never stale. Where
    there is no `fcntl` (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def owner_alive(pid: int, token: str | None) -> bool:
    """Whether process `pid` still runs and is the one that wrote `token` (pids get reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    now = process_token(pid)
    return token is None or now is None or now == token


def process_token(pid: int) -> str | None:
    """The boot and start time of process `pid` (Linux): tells it from a later one with its pid."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None  # field 22: starttime


def current_umask() -> int:
    """This process's umask, read without changing it where the OS allows."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes a plain mkdir/open would have given."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:  # glibc < 2.28, musl
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _read_journal(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = (
        isinstance(data, dict)
        and data.get("format") == JOURNAL_FORMAT
        and type(data.get("pid")) is int
        and isinstance(data.get("host"), str)
        and isinstance(data.get("process"), str | None)
    )
    return data if ok else None


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return f"{total / 1e9:.2f} GB" if total >= 1e8 else f"{total / 1e6:.1f} MB"
