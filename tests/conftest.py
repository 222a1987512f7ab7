"""Shared fixtures: the repository layout, the legacy ChatGLM fixture, a CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from glmdeploy.cli.main import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run `glmdeploy ARGS…` in-process and capture its exit code, stdout and stderr."""

    def run(*argv: str) -> CliResult:
        code = main(list(argv))
        captured = capsys.readouterr()
        return CliResult(int(code), captured.out, captured.err)

    return run


@pytest.fixture
def chatglm3_tiny() -> Path:
    """The tiny legacy ChatGLM3 checkpoint with the original implementation's logits."""
    return FIXTURES / "chatglm3-tiny"
