"""Run a glmdeploy command through Hydra's own application runner (run dirs, -m, --cfg, --info)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from glmdeploy.cli.args import Args
from glmdeploy.cli.output import report_error, report_internal_error
from glmdeploy.config.compose import VERSION_BASE, compose_tolerant
from glmdeploy.config.user_dirs import search_path
from glmdeploy.problems import ConfigError, ExitCode, GlmDeployError, Problem, clip

if TYPE_CHECKING:
    from glmdeploy.config.locations import ConfigSource

JobFn = Callable[[dict[str, Any], Args], int]
_PRINT_FLAGS = ("--cfg", "-c", "--info", "--hydra-help")
_REFUSED: list[GlmDeployError] = []  # what `RunDirCheck` found, raised by `run_hydra`


class RunDirCheck:
    """A Hydra callback: check `hydra.run.dir` (as Hydra resolved it) before Hydra creates it.

    Hydra reports its own failures as tracebacks, and turns a callback's exceptions into
    warnings; so the error is kept in `_REFUSED` and the run stopped with SystemExit.
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from glmdeploy.outputs import check_directory

        try:
            check_directory(str(config.hydra.run.dir), "the run directory (hydra.run.dir)",
                            hint="set hydra.run.dir=DIR to a directory you can write")  # fmt: skip
        except GlmDeployError as exc:
            _REFUSED.append(exc)
            raise SystemExit(int(exc.exit_code)) from exc

    def __getattr__(self, name: str) -> Callable[..., None]:  # Hydra's other callback events
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def run_hydra(
    args: Args, source: ConfigSource, job: JobFn | None, applied: Sequence[str] | None = None
) -> int:
    """Hand the command line to Hydra; call `job` once per (multi)run job with the resolved config.

    Hydra only ever sees a command line that glmdeploy composed first: `applied` are the overrides
    of that composition (`Composition.applied`); without them they are composed here, and every
    problem is raised in glmdeploy's format before Hydra runs. Hydra prints `--cfg`/`--info`
    itself and creates run directories; what it prints on a failure of its own is turned into a
    ConfigError. A job's GlmDeployError is printed in glmdeploy's format and becomes that job's
    exit code; the worst code is returned.
    """
    import hydra
    from omegaconf import DictConfig, OmegaConf

    if applied is None:
        composed = compose_tolerant(args.overrides, source)
        if composed.problems or composed.config is None:
            raise ConfigError(composed.problems)
        applied = composed.applied
    codes: list[int] = []

    def task(cfg: DictConfig) -> None:
        if job is None:  # validate/show with Hydra flags: Hydra printed what was asked
            return
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        assert isinstance(resolved, dict)
        try:
            codes.append(job({str(k): v for k, v in resolved.items()}, args))
        except GlmDeployError as exc:
            if args.debug:
                raise
            report_error(exc, as_json=args.json)
            codes.append(int(exc.exit_code))
        except Exception as exc:  # Hydra would print a bare traceback and exit 1
            if args.debug:
                raise
            report_internal_error(exc)
            codes.append(int(ExitCode.FAILURE))

    flags = list(args.hydra_flags)
    if "--cfg" in flags or "-c" in flags:
        flags.append("--resolve")  # print what `glmdeploy show` prints: the resolved config
    app = hydra.main(
        config_path=str(source.shipped_dir), config_name=source.config_name,
        version_base=VERSION_BASE,
    )(task)  # fmt: skip
    if job is not None:
        target = f"{RunDirCheck.__module__}.{RunDirCheck.__qualname__}"
        flags.append(f"+hydra.callbacks.glmdeploy_run_dir._target_={target}")
    printing = job is None or any(f in flags for f in _PRINT_FLAGS)
    said = io.StringIO()  # what Hydra says on stderr when it only prints: checked, then passed on
    saved, root = sys.argv, logging.getLogger()
    saved_logging = (root.level, root.handlers[:])  # Hydra sets the root logger (--info: DEBUG)
    sys.argv = [f"glmdeploy {args.command}", *flags, *applied]
    _REFUSED.clear()
    if args.debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # the whole traceback, not Hydra's abridged one
    try:
        with (
            search_path(source),
            _logging_kept(),
            contextlib.redirect_stderr(said) if printing else _nothing(),
        ):
            app()
    except SystemExit as exc:  # Hydra reports its own failures with sys.exit(1)
        if _REFUSED:
            raise _REFUSED[0] from None
        if exc.code not in (0, None) and printing:
            raise ConfigError([_hydra_said(said.getvalue())]) from None
        return ExitCode.CONFIG if exc.code not in (0, None) else ExitCode.OK
    except ValueError as exc:  # Hydra's own argument checks, e.g. --resolve without --cfg
        raise ConfigError(
            [Problem("command line", str(exc), None, "see `glmdeploy --help`")]
        ) from exc
    finally:
        sys.argv = saved
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()  # let later compose() calls in this process initialise
    sys.stderr.write(said.getvalue())
    return max(codes, default=ExitCode.OK)


@contextmanager
def _logging_kept() -> Iterator[None]:
    """Undo the logging configuration Hydra's runner installs (its handlers hold the streams of the
    moment, which a later command in the same process may find closed)."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger(), *(g for g in manager.loggerDict.values()
                                      if isinstance(g, logging.Logger))]  # fmt: skip
    saved = {id(g): (g.level, list(g.handlers), g.propagate, g.disabled) for g in loggers}
    try:
        yield
    finally:
        for logger in [logging.getLogger(), *manager.loggerDict.values()]:
            if not isinstance(logger, logging.Logger):
                continue
            level, handlers, propagate, disabled = saved.get(id(logger), (0, [], True, False))
            for handler in set(logger.handlers) - set(handlers):
                handler.close()
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate, logger.disabled = propagate, disabled


@contextlib.contextmanager
def _nothing() -> Any:
    yield


def _hydra_said(text: str) -> Problem:
    """A Problem from Hydra's own failure message (its usage text and traceback dropped)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    lines = [line for line in lines if not line.startswith(("Traceback", "usage:", "Set the"))]
    message = re.sub(r"^glmdeploy \w+: error: ", "", lines[-1] if lines else "Hydra failed")
    flag = re.search(r"(--[a-z-]+)", message)
    path = "--package" if "package" in message else flag.group(1) if flag else "command line"
    return Problem(path, clip(message, 200), None, "see `glmdeploy --help`")
