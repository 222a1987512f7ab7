"""Hydra's and YAML's failures during composition, as glmdeploy Problems with a path and a hint.

`translate_hydra_error` turns one exception into Problems; `find_culprit` tells which override
caused it (so that composition can go on without it and report every problem at once).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from glmdeploy.config.locations import GROUPS, SCHEMA_PATH, ConfigSource
from glmdeploy.config.overrides import QUOTING_HINT
from glmdeploy.problems import Problem, clip, did_you_mean, one_of


def yaml_problem(exc: Any, source: ConfigSource) -> Problem:
    """A YAML syntax error in a config file, located by group path, file, line and column."""
    mark = exc.problem_mark or exc.context_mark
    file = Path(mark.name) if mark is not None else None
    found = source.relative_name(file) if file is not None else None
    where = found[1].replace("/", "=", 1) if found is not None else ""
    at = f"{file}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
    hint = "look for an unclosed bracket or quote, or a tab for indentation"
    if "constructor for the tag" in str(exc.problem):
        hint = "tags such as !!python/… are not allowed: config files are plain data"
    return Problem(where, f"YAML syntax error in {at}: {exc.problem}", "valid YAML", hint)


def find_culprit(exc: BaseException, overrides: list[str]) -> str | None:
    """The override that made composition fail, if it can be told."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, OverrideParseException):
        return exc.override if exc.override in overrides else None
    text = str(exc)
    merging = re.match(r"Error merging override (.+)$", text.split("\n", 1)[0])
    if merging and merging.group(1) in overrides:
        return merging.group(1)
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
        hint = QUOTING_HINT
        if split_by_shell:
            message = f"cannot parse override `{clip(bad)}`: split by bash brace expansion?"
        elif not bad.isascii():
            message = f"cannot parse override `{clip(bad)}`: unquoted non-ASCII characters"
            hint = "quote such a value inside the override: 'runtime.prompt=\"héllo ✓\"'"
        else:
            message = f"cannot parse override `{clip(bad)}`: {clip(why, 120)}"
        return [Problem(key, message, "key=value, group=option, +key=value or ~key", hint)]
    if isinstance(exc, MissingConfigException):
        match = re.search(r"Could not find '([^/']+)/([^']+)'", text)
        if match:
            group, option = match.groups()
            options = source.group_options(group)
            odd = [f for d in source.search_dirs
                   if (f := d / group / f"{option}.yaml").exists() and not f.is_file()]  # fmt: skip
            if odd:  # a device, fifo or socket: Hydra does not read it, nor should it
                message = f"{odd[0]} is not a regular file (a device, fifo or socket?)"
                hint = "make the option a YAML file"
                return [Problem(group, message, "a YAML file per option", hint)]
            folders = " ".join(f"{d / group}/" for d in source.search_dirs if (d / group).is_dir())
            hint = did_you_mean(option, options) or f"list them: ls {folders}"
            return [Problem(group, f"unknown option '{option}'", one_of(options, 20), hint)]
        listed = re.search(r"In '([^']+)': Could not load '([^/']+)/([^']+)'", text)
        if listed:  # a defaults list in a config file names an option that does not exist
            where, group, option = listed.groups()
            options = source.group_options(group)
            message = f"its defaults list names {group}/{option}, which does not exist"
            hint = did_you_mean(option, options) or f"choose one of the {group} options"
            return [Problem(where.replace("/", "=", 1), message, one_of(options, 20), hint)]
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
    value_differs = re.match(
        r"Could not delete from config\. The value of '([^']+)' is (.*) and not (.*)\.$", text
    )
    if value_differs:
        key, actual, given = value_differs.groups()
        return [
            Problem(
                key,
                f"is {clip(actual)}, not {clip(given)}: `~{key}=V` deletes it only if it is V",
                None,
                f"~{key} deletes it whatever its value",
            )
        ]
    if text.startswith("Could not delete from config"):
        return [no_such_key(text.split("'")[1])]
    must_choose = re.match(r"You must specify '([^']+)'", text)
    if must_choose:
        group = must_choose.group(1)
        options = source.group_options(group)
        return [
            Problem(group, "no option chosen", one_of(options, 20), f"choose an option: {group}=…")
        ]
    if isinstance(exc, OSError):
        name = clip(str(exc.filename or ""), 120)
        return [Problem("", f"cannot read a config file: {exc.strerror}: {name}")]
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
    if first.startswith("Error merging override") and exc.__cause__ is not None:
        first = f"{first}: {str(exc.__cause__).splitlines()[0]}"
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


def no_such_key(key: str) -> Problem:
    return Problem(key, "cannot delete: no such key", None, "check the path with `glmdeploy show`")
