"""Compose YAML groups and command-line overrides into a plain dict, Hydra's failures as Problems.

This is the one place that passes `version_base` to Hydra; `glmdeploy.config.locations` knows
where the config directories and the schema live.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from glmdeploy.config.locations import GROUPS, SCHEMA_PATH, SHIPPED_CONF_DIR, ConfigSource
from glmdeploy.problems import ConfigError, Problem, did_you_mean, one_of

VERSION_BASE = "1.3"
CONF_DIR = SHIPPED_CONF_DIR

_QUOTING_HINT = (
    "quote the whole override for bash: 'key=[a,b]' or 'key={0: 20, 1: 24}'; "
    "strings with spaces or commas need inner quotes: 'key=\"a, b\"'"
)


def group_options(group: str, source: ConfigSource | None = None) -> list[str]:
    """The options of a config group: the YAML files in its folders, without suffix."""
    return (source or ConfigSource()).group_options(group)


_ACTIVE: list[ConfigSource] = []  # the source being composed (innermost last)


@contextmanager
def search_path(source: ConfigSource) -> Iterator[None]:
    """While active, Hydra (compose API and `hydra.main` alike) searches the user's directories
    before the shipped groups, through a search-path plugin (Hydra's extension point for this)."""
    from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class GlmdeployUserDirs(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            for directory in _ACTIVE[-1].user_dirs if _ACTIVE else ():
                search_path.prepend(
                    "glmdeploy-user", f"file://{directory}", SearchPathQuery(provider="main")
                )

    plugins = Plugins.instance()
    if not any(c.__name__ == "GlmdeployUserDirs" for c in plugins.discover(SearchPathPlugin)):
        plugins.register(GlmdeployUserDirs)
    _ACTIVE.append(source)
    try:
        yield
    finally:
        _ACTIVE.pop()


@contextmanager
def _hydra_context(source: ConfigSource) -> Iterator[None]:
    from hydra import initialize_config_dir

    with (
        search_path(source),
        initialize_config_dir(config_dir=str(source.shipped_dir), version_base=VERSION_BASE),
    ):
        yield


def compose_dict(overrides: Sequence[str], source: ConfigSource | None = None) -> dict[str, Any]:
    """Compose the deployment config and return it as a plain, resolved dict.

    Mandatory values left unset stay as the string `"???"`; validation reports them with the rest.

    Raises:
        ConfigError: with every override that cannot be parsed or applied.
    """
    composed = compose_tolerant(overrides, source)
    if composed.problems or composed.config is None:
        raise ConfigError(composed.problems)
    return composed.config


@dataclass(frozen=True)
class RunFacts:
    """What Hydra's own config says about running a composed job (the `hydra` node, resolved).

    Attributes:
        run_dir: `hydra.run.dir` (default `outputs/DATE/TIME`), where a single job records; None
            when it cannot be resolved outside Hydra's own runner (it names run-time values).
        sweep_dir: `hydra.sweep.dir` (default `multirun/DATE/TIME`), likewise.
        task_overrides: the overrides that are not Hydra's own (`hydra.…`), as records keep them.
        env_set: `hydra.job.env_set`, environment variables a job sets before it runs.
        chdir: `hydra.job.chdir`, whether a job runs in its run directory.
    """

    run_dir: str | None = None
    sweep_dir: str | None = None
    task_overrides: tuple[str, ...] = ()
    env_set: dict[str, str] = field(default_factory=dict)
    chdir: bool = False


@dataclass
class Composition:
    """What `compose_tolerant` made of the overrides.

    Attributes:
        config: the config composed from the acceptable overrides (None if even that failed).
        problems: the problems of the rejected overrides (or of a broken config file).
        choices: group -> the option chosen (`gpus` -> `2x24gib`), as Hydra reports them.
        run: where and how a job of this config runs (Hydra's run and sweep directories).
    """

    config: dict[str, Any] | None
    problems: list[Problem] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    run: RunFacts = field(default_factory=RunFacts)


def compose_tolerant(overrides: Sequence[str], source: ConfigSource | None = None) -> Composition:
    """Compose, setting aside each override Hydra rejects, so that all of them are reported.

    Hydra stops at the first bad override; this retries without it until the rest composes.
    """
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    source = source or ConfigSource()
    remaining = list(overrides)
    problems = [p for p in map(_listed_options, remaining) if p is not None]
    remaining = [o for o in remaining if _listed_options(o) is None]
    while True:
        try:
            config, choices, run = _compose(remaining, source)
            return Composition(config, problems, choices, run)
        except yaml.MarkedYAMLError as exc:
            return Composition(None, [*problems, _yaml_problem(exc, source)])
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            problems += translate_hydra_error(exc, remaining, source)
            culprit = _culprit(exc, remaining)
            if culprit is None:
                return Composition(None, problems)
            remaining.remove(culprit)


def _listed_options(override: str) -> Problem | None:
    """`gpus=[0,1]`: a list or dict for a group, which takes one option (Hydra fails with a
    TypeError there)."""
    key, _, value = override.partition("=")
    group = key.lstrip("+~")
    if group not in GROUPS or not value.strip().startswith(("[", "{")):
        return None
    hint = f"{group}=OPTION; to try several, sweep them: glmdeploy plan -m {group}=a,b"
    return Problem(group, f"a list or dict for the group '{group}'", "one option name", hint)


def _yaml_problem(exc: Any, source: ConfigSource) -> Problem:
    """A YAML syntax error in a config file, located by group path, file, line and column."""
    mark = exc.problem_mark or exc.context_mark
    file = Path(mark.name) if mark is not None else None
    found = source.relative_name(file) if file is not None else None
    where = found[1].replace("/", "=", 1) if found is not None else ""
    at = f"{file}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
    return Problem(
        where,
        f"YAML syntax error in {at}: {exc.problem}",
        "valid YAML",
        "look for an unclosed bracket or quote, or a tab for indentation",
    )


def _compose(
    overrides: list[str], source: ConfigSource
) -> tuple[dict[str, Any], dict[str, str], RunFacts]:
    """The resolved config as a plain dict, the option chosen in each group, and the run facts."""
    from hydra import compose
    from omegaconf import OmegaConf, open_dict

    with _hydra_context(source):
        cfg = compose(config_name=source.config_name, overrides=overrides, return_hydra_config=True)
    hc = cfg.hydra
    choices = {str(k): str(v) for k, v in hc.runtime.choices.items()
               if not str(k).startswith("hydra")}  # fmt: skip
    run = RunFacts(
        run_dir=_resolved(cfg, "hydra.run.dir"),
        sweep_dir=_resolved(cfg, "hydra.sweep.dir"),
        task_overrides=tuple(map(str, _unresolved_list(hc.overrides.task))),
        env_set={str(k): str(v) for k, v in (hc.job.env_set or {}).items()},
        chdir=bool(hc.job.chdir),
    )
    with open_dict(cfg):
        del cfg["hydra"]
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}, choices, run


def _unresolved_list(node: Any) -> list[Any]:
    """A ListConfig's items as given (an override `key=${x}` is text here, not interpolated)."""
    from omegaconf import OmegaConf

    items = OmegaConf.to_container(node, resolve=False)
    return items if isinstance(items, list) else []


def _resolved(cfg: Any, key: str) -> str | None:
    """`key` resolved, or None when it names a value only Hydra's runner sets."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException:
        return None
    return None if value is None else str(value)


def _culprit(exc: BaseException, overrides: list[str]) -> str | None:
    """The override that made composition fail, if it can be told."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, OverrideParseException):
        return exc.override if exc.override in overrides else None
    text = str(exc)
    names = re.findall(r"'([^']+)'", text)
    group = re.search(r"Could not find '([^/']+)/", text)
    if isinstance(exc, MissingConfigException) and group:
        key = group.group(1)
    elif getattr(exc, "full_key", None):
        key = str(exc.full_key)  # type: ignore[attr-defined]
    elif names:
        key = names[0]
    else:
        return None
    for override in overrides:
        if override == key or override.lstrip("+~").split("=", 1)[0] == key:
            return override
    return None


@lru_cache(maxsize=1)
def schema_keys() -> dict[str, list[str]]:
    """Each object path of the schema (`placement`, `model.source`, …) -> its property names."""
    import json

    schema = json.loads(SCHEMA_PATH.read_text())
    found: dict[str, list[str]] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        for variant in node.get("oneOf", []):
            walk(variant, path)
        props = node.get("properties")
        if props:
            found[path] = sorted(props)
            for key, sub in props.items():
                walk(sub, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], path)

    walk(schema, "")
    return found


def _key_problem(key: str, value: str | None, source: ConfigSource) -> Problem:
    """A Problem for an override that names a key the config does not have."""
    parent, _, leaf = key.rpartition(".")
    groups = [g for g in GROUPS if any((d / g).is_dir() for d in source.search_dirs)]
    if not parent and leaf not in schema_keys()[""]:
        hint = did_you_mean(leaf, [*schema_keys()[""], *groups])
        return Problem(key, "unknown config group or key", one_of(groups), hint)
    known = schema_keys().get(parent)
    if known is None:
        return Problem(
            key, f"'{parent}' has no sub-keys", None, "check the path with `glmdeploy show`"
        )
    if leaf in known:
        # A real key that this group option does not set (e.g. placement.map without explicit).
        owner = {
            "map": "placement=explicit",
            "plan_file": "placement=plan_file",
            "ids": "gpus=ids",
            "count": "gpus=least_used",
            **dict.fromkeys(
                ("gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "block_size",
                 "enforce_eager"),
                "engine=vllm",
            ),
        }  # fmt: skip
        choose = owner.get(leaf)
        hint = f"choose {choose} first" if choose else f"add it with +{key}={value or '…'}"
        if parent == "gpus" and choose:  # a declared fleet of the user's may lack the key
            hint += f", or add it with +{key}={value or '…'}"
        return Problem(key, "not set by the selected option", None, hint)
    hint = did_you_mean(leaf, known)
    return Problem(key, "unknown key", one_of(known), hint)


_OVERRIDE_KEY = re.compile(r"Could not (?:override|append to) '([^']+)'")


def translate_hydra_error(
    exc: BaseException, overrides: Sequence[str], source: ConfigSource | None = None
) -> list[Problem]:
    """Turn an exception from Hydra/OmegaConf composition into glmdeploy Problems."""
    source = source or ConfigSource()
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(exc)
    if isinstance(exc, OverrideParseException):
        bad = exc.override
        key = bad.split("=", 1)[0].lstrip("+~") if "=" in bad else bad
        why = exc.message.splitlines()[0]
        split_by_shell = "{" not in bad and (
            "}" in bad or bad.endswith(("=", ":")) or re.search(r"=\[?\w+:", bad) is not None
        )
        if split_by_shell:
            message = f"cannot parse override `{bad}`: split by bash brace expansion?"
        else:
            message = f"cannot parse override `{bad}`: {why}"
        return [Problem(key, message, "key=value, group=option, +key=value or ~key", _QUOTING_HINT)]
    if isinstance(exc, MissingConfigException):
        match = re.search(r"Could not find '([^/']+)/([^']+)'", text)
        if match:
            group, option = match.groups()
            options = source.group_options(group)
            folders = " ".join(f"{d / group}/" for d in source.search_dirs if (d / group).is_dir())
            hint = did_you_mean(option, options) or f"list them: ls {folders}"
            return [Problem(group, f"unknown option '{option}'", one_of(options, 20), hint)]
        return [Problem("", text.splitlines()[0])]
    match = _OVERRIDE_KEY.search(text)
    if match:
        key = match.group(1)
        value = next(
            (o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(key + "=")), None
        )
        return [_key_problem(key, value, source)]
    if text.startswith("Could not append to config. An item is already at"):
        key = text.split("'")[1]
        return [
            Problem(
                key,
                "already set; '+' only adds new keys",
                None,
                f"drop the '+': {key}=…, or use ++{key}=… to add or override",
            )
        ]
    if text.startswith("Could not delete from config"):
        key = text.split("'")[1]
        return [
            Problem(key, "cannot delete: no such key", None, "check the path with `glmdeploy show`")
        ]
    if text.startswith("Ambiguous value for argument"):
        arg = text.split("'")[1]
        return [
            Problem(
                arg,
                "a comma-separated value is ambiguous",
                None,
                "sweep it with --multirun, write a list as key=[a,b], "
                "or quote a string: 'key=\"a,b\"'",
            )
        ]
    full_key = getattr(exc, "full_key", None)
    first = text.splitlines()[0] if text else type(exc).__name__
    if "Interpolation" in type(exc).__name__ or "nterpolation" in first:
        return [
            Problem(
                str(full_key or ""),
                f"interpolation failed: {first}",
                None,
                "interpolations name absolute keys: ${runtime.max_context_tokens}",
            )
        ]
    return [Problem(str(full_key or ""), first)]
