"""Problems as data, the errors that carry them, exit codes, and their rendering for humans.

Every user-facing failure in glmdeploy is a list of `Problem`s inside a `GlmDeployError`
subclass; the CLI renders it at the edge and exits with the error's code. Tests assert on the data.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any


class ExitCode(enum.IntEnum):
    """Exit codes are part of the CLI's interface (documented in the README)."""

    OK = 0
    FAILURE = 1  # an unexpected internal error (a bug: please report it)
    CONFIG = 2  # the deployment config is invalid
    HARDWARE = 3  # the GPUs asked for are not there, or CUDA is in the wrong state
    LOAD = 4  # the checkpoint cannot be read or does not match its config
    DOES_NOT_FIT = 5  # the plan does not fit the devices
    REPLAY_DIFFERS = 6  # `replay` ran, but its plan or tokens differ from the record
    INTERRUPTED = 130


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the user's input.

    Attributes:
        path: where, in override syntax the user can paste back (`placement.strategy`).
        message: what was found.
        expected: what would have been accepted, if that can be said briefly.
        hint: how to fix it.
    """

    path: str
    message: str
    expected: str | None = None
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GlmDeployError(Exception):
    """Base of every error that the CLI reports as problems rather than as a traceback."""

    exit_code: ExitCode = ExitCode.FAILURE
    title: str = "glmdeploy failed"
    ranked: bool = False  # True: the problems' order means something and is kept (else by path)

    def __init__(self, problems: Sequence[Problem], title: str | None = None) -> None:
        self.problems: list[Problem] = list(problems) if self.ranked else sorted(problems)
        if title is not None:
            self.title = title
        super().__init__(render_problems(self.title, self.problems))


class ConfigError(GlmDeployError):
    exit_code = ExitCode.CONFIG
    title = "invalid deployment config"


class HardwareError(GlmDeployError):
    exit_code = ExitCode.HARDWARE
    title = "hardware does not match the config"


class LoadError(GlmDeployError):
    exit_code = ExitCode.LOAD
    title = "cannot load the model"


class OutputError(GlmDeployError):
    exit_code = ExitCode.CONFIG  # the output location given (or its disk) cannot be written
    title = "cannot write the output"


class DoesNotFitError(GlmDeployError):
    exit_code = ExitCode.DOES_NOT_FIT
    title = "the deployment does not fit"


def render_problems(title: str, problems: Sequence[Problem]) -> str:
    """Render problems the way the CLI prints them (see STYLE.md, 'How an error reads')."""
    count = len(problems)
    lines = [f"error: {title} ({count} problem{'s' if count != 1 else ''})"]
    for p in problems:
        lines.append(f"  {p.path}: {p.message}" if p.path else f"  {p.message}")
        if p.expected:
            lines.append(f"    expected: {p.expected}")
        if p.hint:
            lines.append(f"    hint: {p.hint}")
    return "\n".join(lines)


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The closest of `choices` to `word`, as a hint sentence, or None."""
    options = [str(c) for c in choices]
    lowered = {c.lower(): c for c in options}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=cutoff)
    return f"did you mean '{lowered[close[0]]}'?" if close else None


def clip(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters with an ellipsis: user input echoed in a message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_of(choices: Iterable[str], limit: int = 12) -> str:
    """`one of a, b, c` — long lists are cut with an ellipsis."""
    items = sorted(str(c) for c in choices)
    shown = ", ".join(items[:limit])
    return f"one of {shown}{', …' if len(items) > limit else ''}"
