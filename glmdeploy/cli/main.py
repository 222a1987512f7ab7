"""The `glmdeploy` command: parse arguments, call the library, print, return an exit code.

Each subcommand is a row of `COMMANDS`. Overrides and Hydra's own flags (`-m`, `--cfg`, `--info`,
`hydra.run.dir=…`) pass through to Hydra; glmdeploy validates every job before Hydra runs any.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from glmdeploy import __version__
from glmdeploy.cli import commands
from glmdeploy.problems import ExitCode, GlmDeployError

# Hydra flags that take a value, and those that do not (see `python app.py --hydra-help`).
_HYDRA_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--experimental-rerun",
}
_HYDRA_BARE_FLAGS = {
    "--multirun",
    "-m",
    "--resolve",
    "--hydra-help",
    "--run",
    "-r",
    "--shell-completion",
    "-sc",
}


@dataclass
class Args:
    """The parsed command line of one subcommand."""

    command: str
    overrides: list[str] = field(default_factory=list)
    hydra_flags: list[str] = field(default_factory=list)
    json: bool = False
    debug: bool = False
    dry_run: bool = False
    overwrite: bool = False
    save: str | None = None
    positional: list[str] = field(default_factory=list)  # convert SRC DST, replay DIR, …

    @property
    def multirun(self) -> bool:
        return "-m" in self.hydra_flags or "--multirun" in self.hydra_flags

    @property
    def hydra_mode(self) -> bool:
        """Whether Hydra's own runner must handle the command line (--cfg, --info, …)."""
        return bool(self.hydra_flags)


@dataclass(frozen=True)
class Command:
    summary: str
    run: Callable[[Args], int]
    positional: tuple[str, ...] = ()  # names of positional arguments (not overrides)
    options: tuple[str, ...] = ()  # extra flags it takes


def _parse(argv: Sequence[str]) -> Args:
    items = list(argv)
    if not items or items[0].startswith("-") or "=" in items[0]:
        items.insert(0, "run")  # `glmdeploy` alone, or with overrides only, is the main job
    name, rest = items[0], items[1:]
    if name not in COMMANDS:
        raise _UsageError(f"unknown command '{name}'", _did_you_mean_command(name))
    args = Args(command=name, debug=os.environ.get("HYDRA_FULL_ERROR") == "1")
    spec = COMMANDS[name]
    i = 0
    while i < len(rest):
        item = rest[i]
        flag, _, inline = item.partition("=") if item.startswith("--") else (item, "", "")
        if flag in ("-h", "--help"):
            raise _HelpRequested(name)
        if flag == "--json":
            args.json = True
        elif flag == "--debug":
            args.debug = True
        elif flag == "--dry-run" and "--dry-run" in spec.options:
            args.dry_run = True
        elif flag == "--overwrite" and "--overwrite" in spec.options:
            args.overwrite = True
        elif flag == "--save" and "--save" in spec.options:
            args.save = inline or (rest[i + 1] if i + 1 < len(rest) else "")
            i += 0 if inline else 1
            if not args.save:
                raise _UsageError("--save needs a file name", "glmdeploy plan --save plan.json")
        elif flag == "--info":
            args.hydra_flags.append(item)
            if i + 1 < len(rest) and not rest[i + 1].startswith("-") and "=" not in rest[i + 1]:
                args.hydra_flags.append(rest[i + 1])
                i += 1
        elif flag in _HYDRA_VALUE_FLAGS:
            args.hydra_flags.append(item)
            if not inline:
                if i + 1 >= len(rest):
                    raise _UsageError(f"{flag} needs a value", "e.g. --cfg job")
                args.hydra_flags.append(rest[i + 1])
                i += 1
        elif flag in _HYDRA_BARE_FLAGS:
            args.hydra_flags.append(item)
        elif item.startswith("-") and not item.startswith(("~", "+")):
            raise _UsageError(
                f"unknown option '{item}' for `glmdeploy {name}`", f"see `glmdeploy {name} --help`"
            )
        elif len(args.positional) < len(spec.positional) and "=" not in item:
            args.positional.append(item)
        else:
            args.overrides.append(item)
        i += 1
    if len(args.positional) < len(spec.positional):
        missing = " ".join(p.upper() for p in spec.positional[len(args.positional) :])
        raise _UsageError(
            f"`glmdeploy {name}` needs {missing}",
            f"glmdeploy {name} {' '.join(p.upper() for p in spec.positional)}",
        )
    return args


class _UsageError(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class _HelpRequested(Exception):
    pass


def _did_you_mean_command(name: str) -> str:
    from glmdeploy.problems import did_you_mean

    return did_you_mean(name, COMMANDS) or "see `glmdeploy --help`"


def _usage(command: str | None = None) -> str:
    if command is None:
        width = max(map(len, COMMANDS))
        rows = "\n".join(f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items())
        return (
            f"glmdeploy {__version__}: plan, check and run multi-GPU deployments of LLMs\n\n"
            "usage: glmdeploy COMMAND [options] [overrides…]\n\n"
            f"commands:\n{rows}\n\n"
            "overrides: group=option (gpus=4x24gib), key=value (runtime.batch_size=4), "
            "+key=value, ~key\n"
            "options: --json  --debug (tracebacks)  -m/--multirun  --cfg job  --info\n"
            "exit codes: 0 ok, 1 internal error, 2 config, 3 hardware, 4 load, 5 does not fit, "
            "6 replay differs, 130 interrupted\n"
            "`glmdeploy` with no command runs the main job (`glmdeploy run`)."
        )
    spec = COMMANDS[command]
    pos = " ".join(p.upper() for p in spec.positional)
    opts = " ".join(f"[{o}]" for o in ("--json", "--debug", *spec.options))
    return (
        f"usage: glmdeploy {command} {pos + ' ' if pos else ''}{opts} [overrides…]\n\n"
        f"{spec.summary}\n\nConfig groups: model, gpus, precision, placement, runtime, profile "
        "(`ls conf/GROUP`). Hydra flags pass through: -m, --cfg job, --info, --hydra-help."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `glmdeploy` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return ExitCode.OK
    if argv and argv[0] == "--version":
        print(f"glmdeploy {__version__}")
        return ExitCode.OK
    try:
        args = _parse(argv)
    except _HelpRequested as req:
        print(_usage(str(req)))
        return ExitCode.OK
    except _UsageError as exc:
        print(f"error: {exc}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return ExitCode.CONFIG
    try:
        return COMMANDS[args.command].run(args)
    except GlmDeployError as exc:
        if args.debug:
            raise
        commands.report_error(exc, args)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # a bug in glmdeploy: say so plainly, traceback only with --debug
        if args.debug:
            raise
        commands.report_internal_error(exc)
        return ExitCode.FAILURE


COMMANDS: dict[str, Command] = {
    "validate": Command(
        "check a deployment config (and every job of a -m sweep); no torch", commands.cmd_validate
    ),
    "show": Command("print the resolved deployment config", commands.cmd_show),
    "plan": Command(
        "plan the placement and per-device memory budget (no weights, no GPU needed)",
        commands.cmd_job,
        options=("--save", "--dry-run"),
    ),
    "load": Command(
        "plan, load the model exactly as planned and verify every tensor",
        commands.cmd_job,
        options=("--dry-run",),
    ),
    "generate": Command(
        "plan, load, verify, then generate from runtime.prompt",
        commands.cmd_job,
        options=("--dry-run",),
    ),
    "bench": Command(
        "plan, load, verify, then time generation: TTFT, tokens/s, peak memory",
        commands.cmd_job,
        options=("--dry-run",),
    ),
    "run": Command(
        "the main job: plan, load, verify and generate a few tokens",
        commands.cmd_job,
        options=("--dry-run",),
    ),
    "doctor": Command(
        "report GPUs, drivers, CUDA, versions; with overrides, whether the config fits",
        commands.cmd_doctor,
    ),
    "replay": Command(
        "re-run a recorded job with its config and plan; report every difference",
        commands.cmd_replay,
        positional=("run_dir",),
    ),
    "report": Command(
        "tabulate a sweep directory (Markdown, CSV, plot)",
        commands.cmd_report,
        positional=("sweep_dir",),
    ),
    "convert": Command(
        "convert a legacy ChatGLM2/3 checkpoint to native safetensors",
        commands.cmd_convert,
        positional=("src", "dst"),
        options=("--overwrite",),
    ),
}
