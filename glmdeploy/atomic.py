"""Write files atomically: into a temporary file beside the target, then renamed over it.

A reader (or a crash) never sees a half-written file: the target holds its old contents or its new
ones. New files get the permissions the umask gives (the temporary file is created like any other).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed over `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    # pid and thread: concurrent writers of one target (processes or threads) never share a file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, flushed to disk before the rename."""
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
