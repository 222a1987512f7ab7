"""How Hydra reads the user's config directories: searched first, each file checked before parsing.

A user's directories (`--config-dir`, `GLMDEPLOY_CONFIG_PATH`) are served to Hydra by a config
source of glmdeploy's own, which refuses a file before Hydra parses it when it is too large, not
UTF-8, not a mapping, or holds YAML aliases that expand beyond any config (a "billion laughs" file
hangs OmegaConf). After composition, `hydra_changes` refuses user files that change the Hydra
settings that run code (callbacks, launcher, sweeper, logging handlers, environment, search path).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from glmdeploy.config.locations import ConfigSource
from glmdeploy.problems import ConfigError, Problem

SCHEME = "glmdeploy-user"
MAX_FILE_BYTES = 1 << 20
MAX_NODES = 10_000  # values after YAML alias expansion; shipped files have fewer than 100
# Parts of the `hydra` node that instantiate objects, import code or set the environment.
GUARDED_HYDRA_KEYS = (
    "callbacks",
    "launcher",
    "sweeper",
    "job_logging",
    "hydra_logging",
    "job.env_set",
    "job.env_copy",
    "searchpath",
)

_ACTIVE: list[ConfigSource] = []  # the source being composed (innermost last)


@contextmanager
def search_path(source: ConfigSource) -> Iterator[None]:
    """While active, Hydra (compose API and `hydra.main` alike) searches the user's directories
    before the shipped groups, through a search-path plugin (Hydra's extension point for this),
    and reads their files through the guarded config source."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    for plugin in _plugins():
        plugins.register(plugin)  # idempotent
    _ACTIVE.append(source)
    try:
        yield
    finally:
        _ACTIVE.pop()


@lru_cache(maxsize=1)
def _plugins() -> tuple[type, ...]:
    """The two Hydra plugin classes, made on first use (Hydra is imported lazily)."""
    from hydra._internal.core_plugins.file_config_source import FileConfigSource
    from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
    from hydra.plugins.config_source import ConfigResult
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class GlmdeployUserDirs(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            for directory in _ACTIVE[-1].user_dirs if _ACTIVE else ():
                search_path.prepend(
                    "glmdeploy-user", f"{SCHEME}://{directory}", SearchPathQuery(provider="main")
                )

    class GlmdeployUserFiles(FileConfigSource):
        @staticmethod
        def scheme() -> str:
            return SCHEME

        def load_config(self, config_path: str) -> ConfigResult:
            name = self._normalize_file_name(config_path)
            check_config_file(Path(os.path.realpath(os.path.join(self.path, name))))
            return super().load_config(config_path)

    return GlmdeployUserDirs, GlmdeployUserFiles


def check_config_file(file: Path) -> None:
    """Refuse a user's config file that Hydra must not parse.

    Raises:
        ConfigError: the file is too large, not UTF-8 text, not a mapping, or its YAML aliases
            expand to more than MAX_NODES values.
    """
    import yaml

    def refuse(message: str, hint: str) -> ConfigError:
        return ConfigError([Problem(_where(file), f"{file} {message}", "a YAML mapping", hint)])

    if not file.is_file():
        return  # Hydra says what is missing
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        raise refuse(
            f"is {size / 2**20:.1f} MiB: larger than a config file can be ({MAX_FILE_BYTES >> 20} "
            "MiB)",
            "a config file holds a few keys; check that this is the file you meant",
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        message = f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise refuse(message, "save it as UTF-8") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # Hydra's parser reports the syntax error with its line
    if node is not None and not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {node.value!r}"
        raise refuse(f"holds {kind}, not a mapping of keys", "write key: value lines")
    if _expanded_size(node) > MAX_NODES:
        raise refuse(
            f"has YAML aliases that expand to more than {MAX_NODES} values",
            "remove the anchors (&name) and aliases (*name) that repeat each other",
        )


def _expanded_size(node: Any) -> int:
    """How many values the YAML node graph holds once every alias is expanded (memoised by node)."""
    import yaml

    sizes: dict[int, int] = {}

    def size(n: Any) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = MAX_NODES + 1  # a cycle counts as too large
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(v) for v in n.value)
        sizes[id(n)] = min(total, MAX_NODES + 1)
        return sizes[id(n)]

    return 0 if node is None else size(node)


def _where(file: Path) -> str:
    """`group=option` for a file in one of the active user directories (as YAML errors say it)."""
    for directory in _ACTIVE[-1].user_dirs if _ACTIVE else ():
        if file.is_relative_to(directory):
            return file.relative_to(directory).with_suffix("").as_posix().replace("/", "=", 1)
    return str(file)


def hydra_changes(hydra: Mapping[str, Any], shipped: Mapping[str, Any]) -> list[Problem]:
    """Problems for each guarded Hydra setting that differs from glmdeploy's own (`shipped`)."""
    problems = []
    for dotted in GUARDED_HYDRA_KEYS:
        if _get(hydra, dotted) != _get(shipped, dotted):
            problems.append(
                Problem(
                    f"hydra.{dotted}",
                    "changed by a config file: not allowed, Hydra settings other than the output "
                    "directories can run code or change the environment",
                    "no hydra section, or only hydra.run.dir, hydra.sweep.dir, hydra.job.chdir",
                    "remove it from your files (a `hydra:` section, a `hydra/` folder, or a "
                    "defaults entry that places an option under hydra)",
                )
            )
    return problems


def _get(node: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None  # type: ignore[assignment]
    return node
