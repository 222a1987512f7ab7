"""The `glmdeploy` command: parse arguments, call the library, print, return an exit code.

Each subcommand is a row of `COMMANDS`. Overrides and Hydra's own flags (`-m`, `--cfg`, `--info`,
`hydra.run.dir=…`) pass through to Hydra; glmdeploy validates every job before Hydra runs any.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from glmdeploy import __version__
from glmdeploy.cli import commands
from glmdeploy.cli.args import Args, Command, HelpRequested, UsageError, parse
from glmdeploy.cli.output import guarded
from glmdeploy.interrupts import sigterm_as_interrupt
from glmdeploy.problems import ExitCode
from glmdeploy.process import exit_process, guard_stdout, tune_collector


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
            "         --config-dir DIR (your own group options; also GLMDEPLOY_CONFIG_PATH)  "
            "--config-name NAME\n"
            "exit codes: 0 ok, 1 internal error, 2 config, 3 hardware, 4 load, 5 does not fit, "
            "6 replay differs, 130 interrupted\n"
            "`glmdeploy` with no command runs the main job (`glmdeploy run`)."
        )
    spec = COMMANDS[command]
    pos = " ".join(p.upper() for p in spec.positional)
    opts = " ".join(f"[{o}]" for o in ("--json", "--debug", *spec.options))
    return (
        f"usage: glmdeploy {command} {pos + ' ' if pos else ''}{opts} [overrides…]\n\n"
        f"{spec.summary}\n\nConfig groups: model, gpus, precision, placement, runtime, parallel, "
        "launch, engine, profile (`ls conf/GROUP`). Hydra flags pass through: -m, --cfg job, "
        "--info, --hydra-help."
    )


def console() -> NoReturn:
    """The `glmdeploy` console script and `python -m glmdeploy`: `main` in a process set up for
    it (`glmdeploy.process`: the collector's thresholds, a stdout whose reader may leave early,
    no teardown at the end)."""
    tune_collector()
    guard_stdout()
    exit_process(main())


def main(argv: Sequence[str] | None = None) -> int:
    """The `glmdeploy` command on `argv` (default: `sys.argv[1:]`); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return ExitCode.OK
    if argv and argv[0] == "--version":
        print(f"glmdeploy {__version__}")
        return ExitCode.OK
    try:
        args = parse(argv, COMMANDS)
    except HelpRequested as req:
        print(_usage(str(req)))
        return ExitCode.OK
    except UsageError as exc:
        return _usage_error(exc)
    try:
        with sigterm_as_interrupt():  # `kill`/`timeout` stop a job as Ctrl-C does: recorded
            code = guarded(lambda: COMMANDS[args.command].run(args), as_json=args.json,
                           debug=args.debug)  # fmt: skip
    except UsageError as exc:
        return _usage_error(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    _repeated_key_notes(args)
    return code


def _repeated_key_notes(args: Args) -> None:
    """After a command that ran: keys given again (in a sweep that is an error already)."""
    from glmdeploy.config.overrides import repeated_keys

    for note in [] if args.multirun else repeated_keys(args.overrides):
        print(f"note: {note}", file=sys.stderr)


def _usage_error(exc: UsageError) -> int:
    print(f"error: {exc}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
    return ExitCode.CONFIG


COMMANDS: dict[str, Command] = {
    "validate": Command(
        "check a deployment config (and every job of a -m sweep); no torch", commands.cmd_validate
    ),
    "show": Command("print the resolved deployment config", commands.cmd_show),
    "plan": Command(
        "plan the placement and per-device memory budget (no weights, no GPU needed)",
        commands.cmd_job,
        options=("--save", "--dry-run", "--overwrite"),
    ),
    "load": Command(
        "plan, load the model exactly as planned and verify every tensor",
        commands.cmd_job,
        options=("--dry-run", "--overwrite"),
    ),
    "generate": Command(
        "plan, load, verify, then generate from runtime.prompt",
        commands.cmd_job,
        options=("--dry-run", "--overwrite"),
    ),
    "bench": Command(
        "plan, load, verify, then time generation: TTFT, tokens/s, peak memory",
        commands.cmd_job,
        options=("--dry-run", "--overwrite"),
    ),
    "run": Command(
        "the main job: plan, load, verify and generate a few tokens",
        commands.cmd_job,
        options=("--dry-run", "--overwrite"),
    ),
    "export": Command(
        "write vLLM's config, environment and per-node commands after a fit check with vLLM's "
        "memory rules",
        commands.cmd_export,
        positional=("target",),
        options=("--out", "--dry-run"),
    ),
    "serve": Command(
        "plan, load, verify, then serve an OpenAI-compatible HTTP API (engine=vllm: vLLM's)",
        commands.cmd_serve,
        options=("--host", "--port"),
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
