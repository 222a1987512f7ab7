"""Where configs come from: the groups shipped with glmdeploy and the user's own directories.

The shipped groups and the schema live at the repository root (`conf/`, `schemas/`); the package
links to them (`glmdeploy/conf`, `glmdeploy/schemas`), so a built wheel carries real copies inside
the installed package. A user adds directories of their own, laid out like `conf/`
(`deploy/gpus/our-server.yaml`, `deploy/profile/prod.yaml`), with `--config-dir DIR` (repeatable)
or `GLMDEPLOY_CONFIG_PATH=DIR1:DIR2`. They are searched before the shipped groups, so a user option
adds to a group, or replaces a shipped option of the same name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from glmdeploy.problems import ConfigError, Problem

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SHIPPED_CONF_DIR = (PACKAGE_DIR / "conf").resolve()
SCHEMA_PATH = (PACKAGE_DIR / "schemas" / "deployment.schema.json").resolve()
CONFIG_PATH_ENV = "GLMDEPLOY_CONFIG_PATH"
DEFAULT_CONFIG_NAME = "config"
GROUPS = (
    "model", "gpus", "precision", "placement", "runtime", "parallel", "launch", "engine", "profile",
)  # fmt: skip


@dataclass(frozen=True)
class ConfigSource:
    """The directories a deployment is composed from, in search order, and the primary config.

    Attributes:
        user_dirs: the user's directories (absolute), searched first, in order.
        config_name: the primary config (`config` composes the shipped defaults).
        shipped_dir: glmdeploy's own groups, searched last.
    """

    user_dirs: tuple[Path, ...] = ()
    config_name: str = DEFAULT_CONFIG_NAME
    shipped_dir: Path = SHIPPED_CONF_DIR

    @property
    def search_dirs(self) -> tuple[Path, ...]:
        return (*self.user_dirs, self.shipped_dir)

    def group_options(self, group: str) -> list[str]:
        """The options of a config group across every directory (YAML files, without suffix)."""
        return sorted({p.stem for d in self.search_dirs for p in (d / group).glob("*.yaml")
                       if p.is_file()})  # fmt: skip

    def option_file(self, group: str, option: str) -> Path | None:
        """The file Hydra reads for `group=option`: the first directory that has it."""
        return next(
            (d / group / f"{option}.yaml" for d in self.search_dirs
             if (d / group / f"{option}.yaml").is_file()),
            None,
        )  # fmt: skip

    def user_file(self, group: str, option: str) -> Path | None:
        """`option_file` when it is one of the user's files, else None."""
        found = self.option_file(group, option)
        return found if found is not None and found.parent.parent != self.shipped_dir else None

    def relative_name(self, file: Path) -> tuple[Path, str] | None:
        """(directory, `group/option`) for a config file in one of the search directories."""
        for directory in self.search_dirs:
            if file.is_relative_to(directory):
                return directory, file.relative_to(directory).with_suffix("").as_posix()
        return None

    def env(self) -> dict[str, str]:
        """The environment that gives a child process the same user directories."""
        if not self.user_dirs:
            return {}
        return {CONFIG_PATH_ENV: os.pathsep.join(map(str, self.user_dirs))}


def config_source(
    flag_dirs: Sequence[str | Path] = (),
    config_name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConfigSource:
    """The user's directories from `--config-dir` flags, then `GLMDEPLOY_CONFIG_PATH`.

    Raises:
        ConfigError: a directory that does not exist, or a primary config that none of them has.
    """
    env = os.environ if environ is None else environ
    from_env = [p for p in env.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p.strip()]
    problems: list[Problem] = []
    dirs: list[Path] = []
    for origin, raw in [*(("--config-dir", d) for d in flag_dirs),
                        *((CONFIG_PATH_ENV, d) for d in from_env)]:  # fmt: skip
        path = Path(raw).expanduser().resolve()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            problems.append(
                Problem(
                    origin,
                    f"'{raw}' {what}",
                    "a directory laid out like conf/ (e.g. DIR/gpus/our-server.yaml)",
                    "check the path; `glmdeploy show --config-dir DIR` composes with it",
                )
            )
        elif path != SHIPPED_CONF_DIR and path not in dirs:
            dirs.append(path)
    source = ConfigSource(tuple(dirs), config_name or DEFAULT_CONFIG_NAME)
    if config_name is not None and not problems:
        found = [d for d in source.search_dirs if (d / f"{config_name}.yaml").is_file()]
        if not found:
            names = sorted({p.stem for d in source.search_dirs for p in d.glob("*.yaml")})
            problems.append(
                Problem(
                    "--config-name",
                    f"no config '{config_name}.yaml' in {', '.join(map(str, source.search_dirs))}",
                    f"one of {', '.join(names) or 'config'}",
                    "give the file name without .yaml, in a --config-dir directory",
                )
            )
    if problems:
        raise ConfigError(problems)
    return source
