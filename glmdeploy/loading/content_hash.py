"""Content hashes of weight files, computed once and reused while the file is provably unchanged.

A checkpoint's identity must change whenever any byte of its weights does (a fine-tune rewrites
tensors in place, same shapes, same sizes), yet hashing 12–20 GB on every run is too slow. So each
file's sha256 is streamed once and cached in `cache_root()/file-hashes/`, one small JSON entry per
file, keyed by the file's resolved path. An entry is trusted only while the file's size, mtime_ns,
ctime_ns, inode and device are all unchanged (ctime moves on every write, even when a tool puts the
old mtime back); otherwise the file is hashed again. A file whose timestamps are within
`RACY_SECONDS` of its hashing is not cached (a write in the same clock tick could go unseen), and a
file that changes while it is read is read again.

Entries are written atomically (`glmdeploy.atomic`); concurrent writers each write a whole, valid
entry. Unreadable or malformed entries are ignored and rewritten; a cache that cannot be written
only costs the next run a re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from glmdeploy import atomic
from glmdeploy.loading.embedded import cache_root
from glmdeploy.problems import LoadError, Problem

ALGORITHM = "sha256"  # ~1 GB/s per core with SHA-NI (every current x86 and ARMv8.2 server CPU)
ENTRY_FORMAT = "glmdeploy.file-hash/1"
RACY_SECONDS = 2.0
_CHUNK = 8 * 2**20
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode", "device")


def hash_cache_dir() -> Path:
    """Where file hash entries live: `cache_root()/file-hashes`."""
    return cache_root() / "file-hashes"


def file_identity(path: Path) -> dict[str, int]:
    """What must stay the same for a cached hash of `path` to be trusted."""
    st = os.stat(path)
    return dict(zip(_STAT_FIELDS, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                   st.st_dev), strict=True))  # fmt: skip


def cached_digest(path: Path, cache_dir: Path | None = None) -> str | None:
    """The cached hash of `path`, or None when there is none or the file may have changed since."""
    entry = _read_entry(_entry_path(path, cache_dir))
    if entry is None or entry.get("path") != str(Path(path).resolve()):
        return None
    if {k: entry.get(k) for k in _STAT_FIELDS} != file_identity(path):
        return None
    return str(entry["digest"])


def file_digests(
    paths: Sequence[Path], *, cache_dir: Path | None = None, progress: bool = False
) -> list[str]:
    """The content hash (sha256 hex) of each file, from the cache where it can be trusted.

    Files not cached are hashed in parallel (a few threads: hashlib releases the GIL), with a
    progress bar on stderr when `progress`.

    Raises:
        LoadError: a file cannot be read, or it kept changing while it was read.
    """
    digests = [cached_digest(p, cache_dir) for p in paths]
    todo = [i for i, d in enumerate(digests) if d is None]
    if not todo:
        return [str(d) for d in digests]
    total = sum(os.stat(paths[i]).st_size for i in todo)
    workers = max(1, min(len(todo), os.cpu_count() or 1, 4))
    with _progress_bar(progress, total) as advance, ThreadPoolExecutor(workers) as pool:
        hashed = pool.map(lambda i: _hash_and_cache(paths[i], cache_dir, advance), todo)
        for i, digest in zip(todo, hashed, strict=True):
            digests[i] = digest
    return [str(d) for d in digests]


def _hash_and_cache(path: Path, cache_dir: Path | None, advance: Callable[[int], None]) -> str:
    for _ in range(3):
        started = time.time_ns()
        before = file_identity(path)
        digest = _stream(path, advance)
        after = file_identity(path)
        if before == after:
            newest = max(after["mtime_ns"], after["ctime_ns"])
            if started - newest > RACY_SECONDS * 1e9:
                _write_entry(path, cache_dir, after, digest)
            return digest
    hint = "wait until whatever writes it has finished, then run again"
    raise LoadError([Problem(str(path), "the file kept changing while it was read", hint=hint)])


def _stream(path: Path, advance: Callable[[int], None]) -> str:
    digest = hashlib.new(ALGORITHM)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
                advance(n)
    except OSError as exc:
        raise LoadError([Problem(str(path), f"cannot read it: {exc}")]) from exc
    return digest.hexdigest()


def _entry_path(path: Path, cache_dir: Path | None) -> Path:
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return (cache_dir if cache_dir is not None else hash_cache_dir()) / f"{key}.json"


def _read_entry(entry: Path) -> dict[str, Any] | None:
    """A well-formed entry, or None (missing, unreadable, truncated, another format)."""
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != ENTRY_FORMAT:
        return None
    if data.get("algorithm") != ALGORITHM or not isinstance(data.get("digest"), str):
        return None
    if not all(type(data.get(k)) is int for k in _STAT_FIELDS):
        return None
    return data


def _write_entry(path: Path, cache_dir: Path | None, identity: dict[str, int], digest: str) -> None:
    entry = _entry_path(path, cache_dir)
    record = {"format": ENTRY_FORMAT, "path": str(Path(path).resolve()), **identity,
              "algorithm": ALGORITHM, "digest": digest}  # fmt: skip
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(entry, json.dumps(record, indent=1) + "\n")
    except OSError:
        pass  # a cache that cannot be written costs the next run a re-hash, nothing else


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A bytes progress bar on stderr; yields the function that advances it (no-op: disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("hashing weights (once; cached)", total=total)
        yield lambda n: bar.advance(task, n)
