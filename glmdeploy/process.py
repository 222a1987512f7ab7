"""How the `glmdeploy` process starts and ends: the cyclic garbage collector tuned at the start and
the interpreter's teardown skipped at the end, so that its import-heavy commands cost no more than
their work; and stdout that may be closed by its reader (`glmdeploy plan | head -3`). Only the
console script and `python -m glmdeploy` do this (`glmdeploy.cli.main.console`);
`glmdeploy.cli.main.main` called in-process (tests, scripts, the API) changes nothing.

A reader that closes stdout early does not stop the job: what it prints from then on is
discarded, and the job finishes and is recorded as it would have been (before, the job's record
said `failed: internal error, SystemExit: 1`, rich's reaction to a broken pipe, and the exit code
was 1). Output that cannot be written for another reason (`> file` on a full disk) is discarded
the same way, and the command ends saying so, with exit code 2 (as for any output that cannot be
written, `glmdeploy.problems.OutputError`) if it had succeeded.
`ReaderMayLeave` wraps `sys.stdout` for that.

Measured on the 2-core development machine (`benchmarks/cli_latency.py`; one cold GLM-4.5-Air-sized
plan, which imports torch, transformers and the model's code, traces one block of each kind and
plans):

- **the collector**: importing torch, transformers and a model's code creates objects that live
  until the process ends (360,000 tracked ones after importing GLM-4.5's modeling code); with
  the default thresholds (700, 10, 10) every full collection walks all of them again: 0.64 s of
  a 3.6 s plan (`gc.callbacks`). `tune_collector` raises the thresholds to `THRESHOLDS`: young
  objects are still collected every 50,000 allocations, full collections are rare. That is for
  the setup (composing, planning, importing, loading); `default_collector` puts the defaults
  back when the model starts running (`generate`, `bench`, `serve`), so that tokens/s and memory
  are measured, and a server runs for days, as in any Python process.
- **the teardown**: after the last output, Python clears every module and collects what torch and
  transformers made: another 0.5–0.9 s. `exit_process` does what a normal exit does that matters:
  it runs the `atexit` handlers (logging flushes and closes its files, multiprocessing reaps its
  children, `weakref.finalize` and `tempfile` clean up), flushes stdout and stderr, and ends with
  `os._exit`. It takes the normal exit (`sys.exit`) instead while a non-daemon thread is still
  running (the normal exit joins it) and under a profiler, tracer or debugger (cProfile prints
  its table, coverage saves its data, after the module returns). Every file glmdeploy writes is
  closed (and renamed into place) before its command returns, so no data depends on finalizers.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from typing import Any, NoReturn, TextIO

from glmdeploy.problems import ExitCode

THRESHOLDS = (50_000, 20, 100)  # gc.set_threshold for the CLI process (see the module docstring)
_DEFAULTS: list[tuple[int, ...]] = []  # the thresholds `tune_collector` replaced


def tune_collector() -> None:
    """Collect young objects every 50,000 allocations and old ones rarely (module docstring)."""
    if not _DEFAULTS:
        _DEFAULTS.append(gc.get_threshold())
    gc.set_threshold(*THRESHOLDS)


def default_collector() -> None:
    """Put back the thresholds `tune_collector` replaced (nothing if it did not run)."""
    if _DEFAULTS:
        gc.set_threshold(*_DEFAULTS.pop())


class ReaderMayLeave:
    """`sys.stdout` whose reader may close it: once a write or flush fails (a broken pipe, or
    any other error such as a full disk behind `> file`), the file descriptor is pointed at
    /dev/null and the rest is discarded, so the job still finishes and is recorded. A broken
    pipe is the reader's choice and is not an error; any other failure is kept in `error`, for
    `exit_process` to report. Everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._discard_the_rest(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._discard_the_rest(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _discard_the_rest(self, exc: OSError) -> None:
        if not isinstance(exc, BrokenPipeError) and self.error is None:
            self.error = exc
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):  # what was still buffered now goes to /dev/null
            self._stream.flush()


def guard_stdout() -> None:
    """Let stdout's reader leave early (see the module docstring); only a stdout with a file
    descriptor (one that can be pointed at /dev/null) is wrapped."""
    if sys.stdout is None or isinstance(sys.stdout, ReaderMayLeave):
        return
    try:
        sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation: e.g. a StringIO
        return
    sys.stdout = ReaderMayLeave(sys.stdout)


def exit_process(code: int) -> NoReturn:
    """End the process with `code`, skipping the interpreter's teardown (module docstring)."""
    main = threading.main_thread()
    running = any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())
    watched = sys.getprofile() is not None or sys.gettrace() is not None  # cProfile, a debugger
    if not (running or watched):
        atexit._run_exitfuncs()  # what the interpreter runs at exit; it prints their exceptions
    lost = _flush_error(sys.stdout) or getattr(sys.stdout, "error", None)
    if lost is not None:  # what was printed did not all arrive: as `OutputError`, exit code 2
        print(f"error: cannot write the output: stdout: {lost}", file=sys.stderr)
        code = code or ExitCode.CONFIG
    if running or watched:
        sys.exit(code)  # the normal exit: it joins the threads; the profiler reports after it
    _flush_error(sys.stderr)
    os._exit(code)


def _flush_error(stream: object) -> Exception | None:
    """Flush `stream`; the error if that failed (a stream that is not a `ReaderMayLeave`)."""
    flush = getattr(stream, "flush", None)
    try:
        if flush is not None:
            flush()
    except BrokenPipeError:  # the reader left: its choice, as with `ReaderMayLeave`
        return None
    except (OSError, ValueError) as exc:  # a full disk; a closed stream
        return exc
    return None
