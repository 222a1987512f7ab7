"""The parsed command line of one subcommand, and the parser that makes it.

Overrides and Hydra's own flags (`-m`, `--cfg`, `--info`, `hydra.run.dir=…`) pass through;
`--config-dir`/`--config-name` are glmdeploy's (the user's config directories, see
`glmdeploy.config.locations`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glmdeploy.problems import did_you_mean

if TYPE_CHECKING:
    from glmdeploy.config.locations import ConfigSource

# Hydra flags that take a value, and those that do not (see `python app.py --hydra-help`).
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p"}
_HYDRA_BARE_FLAGS = {
    "--multirun", "-m", "--resolve", "--hydra-help", "--run", "-r",
}  # fmt: skip
_CFG_VALUES = ("job", "hydra", "all")
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_PRINT_FLAGS = ("--cfg", "-c", "--info", "--hydra-help")
_CONFIG_DIR_FLAGS = {"--config-dir", "-cd"}
_CONFIG_NAME_FLAGS = {"--config-name", "-cn"}


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
    out: str | None = None  # export: where to write the config as well
    positional: list[str] = field(default_factory=list)  # convert SRC DST, replay DIR, …
    config_dirs: list[str] = field(default_factory=list)
    config_name: str | None = None

    @property
    def multirun(self) -> bool:
        return "-m" in self.hydra_flags or "--multirun" in self.hydra_flags

    @property
    def hydra_mode(self) -> bool:
        """Whether Hydra's own runner must handle the command line (--cfg, --info, …)."""
        return bool(self.hydra_flags)

    def source(self) -> ConfigSource:
        """The config directories to compose from (raises ConfigError for a missing one)."""
        from glmdeploy.config.locations import config_source

        return config_source(self.config_dirs, self.config_name)


@dataclass(frozen=True)
class Command:
    summary: str
    run: Callable[[Args], int]
    positional: tuple[str, ...] = ()  # names of positional arguments (not overrides)
    options: tuple[str, ...] = ()  # extra flags it takes


class UsageError(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class HelpRequested(Exception):
    pass


def parse(argv: Sequence[str], commands: Mapping[str, Command]) -> Args:
    """Parse `glmdeploy COMMAND [options] [overrides…]`; no command means `run`.

    Raises:
        UsageError: an unknown command or option, or a missing value or argument.
        HelpRequested: `-h`/`--help` (its argument is the command).
    """
    items = list(argv)
    if not items or items[0].startswith("-") or "=" in items[0]:
        items.insert(0, "run")  # `glmdeploy` alone, or with overrides only, is the main job
    name, rest = items[0], items[1:]
    if name not in commands:
        raise UsageError(
            f"unknown command '{name}'", did_you_mean(name, commands) or "see `glmdeploy --help`"
        )
    args = Args(command=name, debug=os.environ.get("HYDRA_FULL_ERROR") == "1")
    spec = commands[name]
    i = 0
    while i < len(rest):
        item = rest[i]
        flag, _, inline = item.partition("=") if item.startswith("-") else (item, "", "")
        if flag in _VALUE_FLAGS and not inline:  # `--flag VALUE`: take the next item
            if i + 1 >= len(rest) or not rest[i + 1]:
                raise UsageError(f"{flag} needs a value", _FLAG_EXAMPLES.get(flag))
            i += 1
            inline = rest[i]
        if flag in ("-h", "--help"):
            raise HelpRequested(name)
        if flag == "--json":
            args.json = True
        elif flag == "--debug":
            args.debug = True
        elif flag == "--dry-run" and "--dry-run" in spec.options:
            args.dry_run = True
        elif flag == "--overwrite" and "--overwrite" in spec.options:
            args.overwrite = True
        elif flag == "--save" and "--save" in spec.options:
            args.save = inline
        elif flag == "--out" and "--out" in spec.options:
            args.out = inline
        elif flag in ("--host", "--port") and flag in spec.options:  # serve: sugar for overrides
            args.overrides.append(f"serve.{flag[2:]}={inline}")
        elif flag in _CONFIG_DIR_FLAGS:
            args.config_dirs.append(inline)
        elif flag in _CONFIG_NAME_FLAGS:
            args.config_name = inline
        elif flag in ("--config-path", "-cp"):
            raise UsageError(
                f"{flag} is not supported: glmdeploy's own groups are always used",
                "add your directory of group options with --config-dir DIR",
            )
        elif flag in ("--shell-completion", "-sc"):
            raise UsageError(
                f"{flag} is not supported: Hydra's completion script does not know glmdeploy's "
                "commands",
                "`glmdeploy --help` lists the commands, `ls conf/GROUP` the options",
            )
        elif flag == "--experimental-rerun":
            raise UsageError(
                f"{flag} is not supported: it unpickles a file, which can run any code",
                "re-run a recorded job with `glmdeploy replay RUN_DIR`",
            )
        elif flag == "--info":
            args.hydra_flags.append(item)
            if i + 1 < len(rest) and not rest[i + 1].startswith("-") and "=" not in rest[i + 1]:
                args.hydra_flags.append(rest[i + 1])
                i += 1
            elif not inline:  # Hydra's optional value would swallow the first override
                args.hydra_flags.append("all")
        elif flag in _HYDRA_VALUE_FLAGS:
            args.hydra_flags += [flag, inline]
        elif flag in _HYDRA_BARE_FLAGS:
            args.hydra_flags.append(item)
        elif item.startswith("-") and not item.startswith(("~", "+")):
            raise UsageError(
                f"unknown option '{item}' for `glmdeploy {name}`", f"see `glmdeploy {name} --help`"
            )
        elif len(args.positional) < len(spec.positional) and "=" not in item:
            args.positional.append(item)
        elif spec.positional and "=" not in item and not item.startswith(("~", "+")):
            usage = " ".join(p.upper() for p in spec.positional)
            raise UsageError(f"unexpected argument '{item}'", f"glmdeploy {name} {usage}")
        else:
            args.overrides.append(item)
        i += 1
    _check_hydra_flags(args.hydra_flags)
    if len(args.positional) < len(spec.positional):
        missing = " ".join(p.upper() for p in spec.positional[len(args.positional) :])
        raise UsageError(
            f"`glmdeploy {name}` needs {missing}",
            f"glmdeploy {name} {' '.join(p.upper() for p in spec.positional)}",
        )
    return args


_VALUE_FLAGS = {
    "--save",
    "--out",
    "--host",
    "--port",
    *_CONFIG_DIR_FLAGS,
    *_CONFIG_NAME_FLAGS,
    *_HYDRA_VALUE_FLAGS,
}
_FLAG_EXAMPLES = {
    "--cfg": "--cfg job",
    "--save": "glmdeploy plan --save plan.json",
    "--out": "glmdeploy export vllm --out vllm.yaml",
    "--host": "glmdeploy serve --host 0.0.0.0",
    "--port": "glmdeploy serve --port 8000",
    "--config-dir": "glmdeploy plan --config-dir ./deploy profile=prod",
    "-cd": "glmdeploy plan -cd ./deploy profile=prod",
    "--config-name": "glmdeploy plan --config-dir ./deploy --config-name prod",
    "-cn": "glmdeploy plan -cd ./deploy -cn prod",
}


def _check_hydra_flags(flags: list[str]) -> None:
    """Hydra's flags, checked here so that Hydra's own usage text never reaches the user."""
    values = {flag: flags[i + 1] if i + 1 < len(flags) else "" for i, flag in enumerate(flags)}
    cfg = values.get("--cfg", values.get("-c"))
    if cfg is not None and cfg not in _CFG_VALUES:
        raise UsageError(f"--cfg: '{cfg}' is not one of {', '.join(_CFG_VALUES)}", "--cfg job")
    info = values.get("--info")
    if info is not None and info not in ("", *_INFO_VALUES) and not info.startswith("-"):
        raise UsageError(
            f"--info: '{info}' is not one of {', '.join(_INFO_VALUES)}", "--info defaults-tree"
        )
    for needs_cfg, name in (("--package", "--package"), ("-p", "--package"), ("--resolve", "")):
        if needs_cfg in flags and cfg is None:
            name = name or needs_cfg
            raise UsageError(f"{name} is used with --cfg only", f"--cfg job {needs_cfg} …")
    printing = [f for f in flags if f in _PRINT_FLAGS]
    if printing and ("-m" in flags or "--multirun" in flags):
        raise UsageError(
            f"{printing[0]} cannot be combined with -m/--multirun: nothing would run",
            "`glmdeploy plan -m --dry-run …` lists the jobs; `glmdeploy validate -m …` checks them",
        )
