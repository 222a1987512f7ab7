"""How the CLI reports: JSON on stdout, problems and internal errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from glmdeploy.problems import ExitCode, GlmDeployError, render_problems


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def report_error(exc: GlmDeployError, *, as_json: bool) -> None:
    """Print an error's problems to stderr (and as JSON on stdout with --json)."""
    if as_json:
        from glmdeploy.planning.types import PlanDoesNotFit

        payload = {"ok": False, "exit_code": int(exc.exit_code), "error": exc.title,
                   "problems": [p.to_dict() for p in exc.problems]}  # fmt: skip
        if isinstance(exc, PlanDoesNotFit):  # the best plan, with its verdict
            payload["plan"] = exc.plan.to_dict()
        print_json(payload)
    print(render_problems(exc.title, exc.problems), file=sys.stderr)


def report_internal_error(exc: BaseException) -> None:
    """A bug in glmdeploy: say so plainly; the traceback only with --debug."""
    print(
        f"internal error: {type(exc).__name__}: {exc}\n  hint: rerun with --debug for the "
        "traceback and report it with the output of `glmdeploy doctor`",
        file=sys.stderr,
    )


def guarded(call: Callable[[], int], *, as_json: bool, debug: bool) -> int:
    """`call()`'s exit code; a GlmDeployError reported as problems and an unexpected exception as
    an internal error (both re-raised with `debug`). KeyboardInterrupt passes through."""
    from glmdeploy.cli.args import UsageError

    try:
        return call()
    except UsageError:  # the command line itself: reported as a usage error by `main`
        raise
    except GlmDeployError as exc:
        if debug:
            raise
        report_error(exc, as_json=as_json)
        return exc.exit_code
    except Exception as exc:  # a bug in glmdeploy: say so plainly, traceback only with --debug
        if debug:
            raise
        report_internal_error(exc)
        return ExitCode.FAILURE
