"""SIGTERM handled as Ctrl-C, so that a job stopped by `kill`, `timeout` or a scheduler finishes its
run record `interrupted` (exit 130) instead of dying with it `running`."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """A signal handler: raise KeyboardInterrupt, as Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt; the previous handler comes back after.

    Outside the main thread (where handlers cannot be set) SIGTERM is left alone.
    """
    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
