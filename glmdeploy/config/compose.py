"""Compose YAML groups and command-line overrides into a plain dict, every failure as a Problem.

This is the one place that passes `version_base` to Hydra; `glmdeploy.config.locations` knows
where the config directories and the schema live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from glmdeploy.config.hydra_errors import (
    find_culprit,
    no_such_key,
    translate_hydra_error,
    yaml_problem,
)
from glmdeploy.config.hydra_errors import schema_keys as schema_keys  # importable from here too
from glmdeploy.config.locations import DEFAULT_CONFIG_NAME, SHIPPED_CONF_DIR, ConfigSource
from glmdeploy.config.locations import GROUPS as GROUPS
from glmdeploy.config.locations import SCHEMA_PATH as SCHEMA_PATH
from glmdeploy.config.overrides import screen_overrides, word_key
from glmdeploy.config.user_dirs import hydra_changes, search_path
from glmdeploy.problems import ConfigError, Problem

VERSION_BASE = "1.3"
CONF_DIR = SHIPPED_CONF_DIR


def group_options(group: str, source: ConfigSource | None = None) -> list[str]:
    """The options of a config group: the YAML files in its folders, without suffix."""
    return (source or ConfigSource()).group_options(group)


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
        run_dir_dated: `hydra.run.dir` names the clock (`${now:…}`, as the default does): two jobs
            started in the same second would share it, so each claims its own (`TIME-1`, …).
    """

    run_dir: str | None = None
    sweep_dir: str | None = None
    task_overrides: tuple[str, ...] = ()
    env_set: dict[str, str] = field(default_factory=dict)
    chdir: bool = False
    run_dir_dated: bool = False


@dataclass
class Composition:
    """What `compose_tolerant` made of the overrides.

    Attributes:
        config: the config composed from the acceptable overrides (None if even that failed).
        problems: the problems of the rejected overrides (or of a broken config file).
        choices: group -> the option chosen (`gpus` -> `2x24gib`), as Hydra reports them.
        applied: the overrides as Hydra must be given them to compose `config` (a `~key` of a
            key whose value is null becomes `key=null`: Hydra cannot delete a null key).
        run: where and how a job of this config runs (Hydra's run and sweep directories).
    """

    config: dict[str, Any] | None
    problems: list[Problem] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    run: RunFacts = field(default_factory=RunFacts)


def compose_tolerant(overrides: Sequence[str], source: ConfigSource | None = None) -> Composition:
    """Compose, setting aside each override Hydra rejects, so that all of them are reported.

    Overrides refused by `screen_overrides` never reach Hydra. Hydra stops at the first bad
    override; this retries without it until the rest composes. Deleting a key whose value is null
    (`~gpus.max_memory_gib`) means "unset": it is null already, and stays so.
    """
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    source = source or ConfigSource()
    remaining, problems = screen_overrides(overrides)
    shadowing = _shadowing_root(source)
    if shadowing is not None:
        return Composition(None, [*problems, shadowing])
    null_deletes: list[str] = []  # `~key` overrides Hydra could not apply: null key, or none
    while True:
        try:
            config, choices, run, hydra = _compose(
                remaining, source, with_hydra=bool(source.user_dirs)
            )
        except yaml.MarkedYAMLError as exc:
            return Composition(None, [*problems, yaml_problem(exc, source)])
        except ConfigError as exc:  # a user's file refused before Hydra parsed it
            return Composition(None, [*problems, *exc.problems])
        except (HydraException, OmegaConfBaseException, ValueError, OSError) as exc:
            culprit = find_culprit(exc, remaining)
            if culprit is not None and _is_missing_delete(exc, culprit):
                null_deletes.append(culprit)
            else:
                where = word_key(culprit) if culprit is not None else ""
                problems += [p if p.path else dataclasses.replace(p, path=where)
                             for p in translate_hydra_error(exc, remaining, source)]  # fmt: skip
            if culprit is None:
                return Composition(None, problems)
            remaining.remove(culprit)
            continue
        unset = {o for o in null_deletes if _is_null(config, word_key(o))}
        problems += [no_such_key(word_key(o)) for o in null_deletes if o not in unset]
        if hydra is not None:
            problems += hydra_changes(hydra, _shipped_hydra())
        applied = [f"{word_key(o)}=null" if o in unset else o
                   for o in overrides if o in remaining or o in unset]  # fmt: skip
        return Composition(config, problems, choices, applied, run)


def _shadowing_root(source: ConfigSource) -> Problem | None:
    """A user's `config.yaml` would replace glmdeploy's root config (every default, the Hydra
    settings) instead of adding to it: refused, with the way to do what it was meant for."""
    name = f"{DEFAULT_CONFIG_NAME}.yaml"
    found = next((d / name for d in source.user_dirs if (d / name).is_file()), None)
    if found is None:
        return None
    return Problem(
        str(found),
        f"has the name of glmdeploy's root config ({name}), which it would replace whole",
        "group options (gpus/NAME.yaml, profile/NAME.yaml, …) or a primary config of another name",
        f"rename it, e.g. to {found.parent / 'mine.yaml'} starting with `defaults: [config, "
        "_self_]`, and pass --config-name mine; or make it a profile (profile=NAME)",
    )


def _is_missing_delete(exc: BaseException, culprit: str) -> bool:
    return (
        culprit.startswith("~")
        and str(exc).startswith("Could not delete from config.")
        and (str(exc).rstrip().endswith("does not exist."))
    )


def _is_null(config: dict[str, Any], key: str) -> bool:
    node: Any = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict) and leaf in node and node[leaf] is None


@lru_cache(maxsize=1)
def _shipped_hydra() -> dict[str, Any]:
    """The `hydra` node of glmdeploy's own config, unresolved (what user files may not change)."""
    hydra = _compose([], ConfigSource(), with_hydra=True)[3]
    assert hydra is not None
    return hydra


def _compose(
    overrides: list[str], source: ConfigSource, *, with_hydra: bool = False
) -> tuple[dict[str, Any], dict[str, str], RunFacts, dict[str, Any] | None]:
    """The resolved config as a plain dict, the option chosen in each group, the run facts and
    (when asked) the unresolved `hydra` node."""
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
        run_dir_dated="${now:" in _unresolved_text(hc.run, "dir"),
    )
    hydra = OmegaConf.to_container(hc, resolve=False) if with_hydra else None
    with open_dict(cfg):
        del cfg["hydra"]
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    config = {str(k): v for k, v in container.items()}
    hydra_node = {str(k): v for k, v in hydra.items()} if isinstance(hydra, dict) else None
    return config, choices, run, hydra_node


def _unresolved_list(node: Any) -> list[Any]:
    """A ListConfig's items as given (an override `key=${x}` is text here, not interpolated)."""
    from omegaconf import OmegaConf

    items = OmegaConf.to_container(node, resolve=False)
    return items if isinstance(items, list) else []


def _unresolved_text(node: Any, key: str) -> str:
    """`node[key]` as written (interpolations not resolved), as text."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(node, resolve=False)
    return str(container.get(key)) if isinstance(container, dict) else ""


def _resolved(cfg: Any, key: str) -> str | None:
    """`key` resolved, or None when it names a value only Hydra's runner sets."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException:
        return None
    return None if value is None else str(value)
