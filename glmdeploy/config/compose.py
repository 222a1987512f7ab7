"""Compose YAML groups and command-line overrides into a plain dict, Hydra's failures as Problems.

This is the one place that passes `version_base` to Hydra and the one place that knows where the
config tree and the schema live.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from glmdeploy.problems import ConfigError, Problem, did_you_mean, one_of

VERSION_BASE = "1.3"
ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
SCHEMA_PATH = ROOT / "schemas" / "deployment.schema.json"
GROUPS = ("model", "gpus", "precision", "placement", "runtime", "profile")

_QUOTING_HINT = (
    "quote the whole override for bash: 'key=[a,b]' or 'key={0: 20, 1: 24}'; "
    "strings with spaces or commas need inner quotes: 'key=\"a, b\"'"
)


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group: the YAML files in its folder, without suffix."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


@contextmanager
def _hydra_context(config_dir: Path) -> Iterator[None]:
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=VERSION_BASE):
        yield


def compose_dict(overrides: Sequence[str], config_dir: Path = CONF_DIR) -> dict[str, Any]:
    """Compose the deployment config and return it as a plain, resolved dict.

    Mandatory values left unset stay as the string `"???"`; validation reports them with the rest.

    Raises:
        ConfigError: with every override that cannot be parsed or applied.
    """
    cfg, problems = compose_tolerant(overrides, config_dir)
    if problems or cfg is None:
        raise ConfigError(problems)
    return cfg


def compose_tolerant(
    overrides: Sequence[str], config_dir: Path = CONF_DIR
) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Compose, setting aside each override Hydra rejects, so that all of them are reported.

    Hydra stops at the first bad override; this retries without it until the rest composes.
    Returns the config composed from the acceptable overrides (None if even that fails) and the
    problems of the rejected ones.
    """
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    remaining = list(overrides)
    problems: list[Problem] = []
    while True:
        try:
            return _compose(remaining, config_dir), problems
        except yaml.MarkedYAMLError as exc:
            return None, [*problems, _yaml_problem(exc, config_dir)]
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            problems += translate_hydra_error(exc, remaining, config_dir)
            culprit = _culprit(exc, remaining)
            if culprit is None:
                return None, problems
            remaining.remove(culprit)


def _yaml_problem(exc: Any, config_dir: Path) -> Problem:
    """A YAML syntax error in a config file, located by group path, file, line and column."""
    mark = exc.problem_mark or exc.context_mark
    file = Path(mark.name) if mark is not None else None
    where = ""
    if file is not None and file.is_relative_to(config_dir):
        where = file.relative_to(config_dir).with_suffix("").as_posix().replace("/", "=", 1)
    at = f"{file}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
    return Problem(
        where,
        f"YAML syntax error in {at}: {exc.problem}",
        "valid YAML",
        "look for an unclosed bracket or quote, or a tab for indentation",
    )


def _compose(overrides: list[str], config_dir: Path) -> dict[str, Any]:
    from hydra import compose
    from omegaconf import OmegaConf

    with _hydra_context(config_dir):
        cfg = compose(config_name="config", overrides=overrides)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


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


def _key_problem(key: str, value: str | None, config_dir: Path) -> Problem:
    """A Problem for an override that names a key the config does not have."""
    parent, _, leaf = key.rpartition(".")
    groups = [g for g in GROUPS if (config_dir / g).is_dir()]
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
            "declared": "gpus=declared",
        }
        choose = owner.get(leaf)
        hint = f"choose {choose} first" if choose else f"add it with +{key}={value or '…'}"
        return Problem(key, "not set by the selected option", None, hint)
    hint = did_you_mean(leaf, known)
    return Problem(key, "unknown key", one_of(known), hint)


_OVERRIDE_KEY = re.compile(r"Could not (?:override|append to) '([^']+)'")


def translate_hydra_error(
    exc: BaseException, overrides: Sequence[str], config_dir: Path = CONF_DIR
) -> list[Problem]:
    """Turn an exception from Hydra/OmegaConf composition into glmdeploy Problems."""
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
            options = group_options(group, config_dir)
            hint = did_you_mean(option, options) or f"list them: ls conf/{group}/"
            return [Problem(group, f"unknown option '{option}'", one_of(options, 20), hint)]
        return [Problem("", text.splitlines()[0])]
    match = _OVERRIDE_KEY.search(text)
    if match:
        key = match.group(1)
        value = next(
            (o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(key + "=")), None
        )
        return [_key_problem(key, value, config_dir)]
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
