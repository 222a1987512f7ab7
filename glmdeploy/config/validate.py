"""Check a composed config against the JSON Schema and the rules no schema can express.

All problems are reported at once. Validation never imports torch or transformers: `glmdeploy
validate` must answer in well under a second.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from glmdeploy.config.locations import SCHEMA_PATH
from glmdeploy.config.rules import semantic_problems
from glmdeploy.config.settings import Deployment
from glmdeploy.config.typed_view import deployment_from_dict
from glmdeploy.problems import ConfigError, Problem, clip, did_you_mean, one_of

MISSING = "???"
_SIZE_STRING = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?[Bb]|[kmgt]i?b|[KMGT])\s*$")
_TOKEN_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM])\s*$")
_DICT_ENTRY = re.compile(r"^\s*\w+\s*:\s*[^\s:{}\[\],]+\s*$")
_TOO_MANY = ("at most this many items", "at most this many keys")  # then skip each item's own
_BOUNDS = {
    "minimum": ">=",
    "exclusiveMinimum": ">",
    "maximum": "<=",
    "exclusiveMaximum": "<",
    "minItems": "at least this many items:",
    "maxItems": "at most this many items:",
    "minLength": "at least this many characters:",
    "maxLength": "at most this many characters:",
    "maxProperties": "at most this many keys:",
}


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts 512.0 as an integer; transformers does not: integers must be ints.
    strict = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    validator = validators.extend(Draft202012Validator, type_checker=strict)
    schema = json.loads(SCHEMA_PATH.read_text())
    return validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def key_path(parts: Iterable[str | int]) -> str:
    """`('placement', 'map', 0, 'device')` -> `placement.map[0].device` (override syntax)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate_dict(cfg: Mapping[str, Any]) -> Deployment:
    """Validate a composed config and return its typed view.

    Raises:
        ConfigError: with every problem found, sorted by path.
    """
    problems = check(cfg)
    if problems:
        raise ConfigError(problems)
    return deployment_from_dict(normalise(cfg))


def check(cfg: Mapping[str, Any]) -> list[Problem]:
    """Every problem of a composed config: missing values, schema violations, semantic rules."""
    problems = list(_missing(cfg, ()))
    doc = normalise(cfg, problems)
    non_finite = list(_non_finite(doc, ()))
    said = {p.path for p in problems} | {p.path for p in non_finite}
    schema_problems = list(_schema_problems(doc))
    too_long = {p.path for p in schema_problems if (p.expected or "").startswith(_TOO_MANY)}
    said |= {p.path for p in schema_problems if _within(p.path, too_long)}
    problems += non_finite + [p for p in schema_problems if p.path not in said]
    problems += semantic_problems(doc, schema_clean=not schema_problems and not non_finite)
    return sorted(set(problems))


def _missing(node: Any, path: tuple[str | int, ...]) -> Iterator[Problem]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _missing(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _missing(value, (*path, i))
    elif node == MISSING:
        where = key_path(path)
        yield Problem(
            where, "missing mandatory value", None, f"set it on the command line: {where}=…"
        )


def _within(path: str, parents: Iterable[str]) -> bool:
    """Whether `path` is inside one of `parents` (`gpus.ids[3]` is within `gpus.ids`)."""
    return any(path.startswith((f"{p}.", f"{p}[")) for p in parents)


def _non_finite(node: Any, path: tuple[str | int, ...]) -> Iterator[Problem]:
    """nan and inf anywhere (JSON Schema has no notion of them; YAML reads 1e400 as inf)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _non_finite(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _non_finite(value, (*path, i))
    elif isinstance(node, float) and not math.isfinite(node):
        hint = "nan is not a number" if math.isnan(node) else "1e309 and beyond overflow to inf"
        yield Problem(key_path(path), f"found {node}", "a finite number", hint)


def normalise(cfg: Mapping[str, Any], problems: list[Problem] | None = None) -> dict[str, Any]:
    """A JSON-shaped copy: `???` values dropped, GPU-id keys as strings (int keys skip JSON Schema).

    Keys that arrive as strings where GPU ids belong (`+gpus.max_memory_gib.0=20` adds `'0'`) are
    reported into `problems` when given.
    """

    def strip(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: strip(v) for k, v in node.items() if v != MISSING}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    doc: dict[str, Any] = strip(cfg)
    caps = doc.get("gpus", {}).get("max_memory_gib") if isinstance(doc.get("gpus"), dict) else None
    if isinstance(caps, dict):
        fixed: dict[str, Any] = {}
        for key, value in caps.items():
            if isinstance(key, str) and problems is not None:
                problems.append(
                    Problem(
                        f"gpus.max_memory_gib.{key}",
                        "GPU id given as a string key",
                        "integer GPU ids",
                        "`+gpus.max_memory_gib.0=…` adds the string key '0'; "
                        "write the whole dict: 'gpus.max_memory_gib={0: 20, 1: 24}'",
                    )
                )
            fixed[str(key)] = value
        doc["gpus"]["max_memory_gib"] = fixed
    return doc


def _schema_problems(doc: Mapping[str, Any]) -> Iterator[Problem]:
    for error in _validator().iter_errors(doc):
        yield from _translate(error)


def _leaf_errors(error: Any) -> list[Any]:
    """For oneOf/anyOf, the sub-errors of the branch that got furthest (deepest path)."""
    if error.validator not in ("oneOf", "anyOf") or not error.context:
        return [error]
    deepest = max(len(e.absolute_path) for e in error.context)
    if deepest == len(error.absolute_path):
        # All branches failed at this level: prefer the branch whose type matched.
        typed = [e for e in error.context if e.validator not in ("type", "enum", "oneOf")]
        return typed or [error]
    return [e for e in error.context if len(e.absolute_path) == deepest]


def _translate(error: Any) -> Iterator[Problem]:
    for err in _leaf_errors(error):
        path = key_path(err.absolute_path)
        value = err.instance
        schema = err.schema
        kind = err.validator
        if kind == "additionalProperties" and isinstance(value, dict):
            known = sorted(schema.get("properties", {}))
            for extra in sorted({str(k) for k in value} - set(known)):
                where = f"{path}.{extra}" if path else extra
                yield Problem(where, "unknown key", one_of(known), did_you_mean(extra, known))
        elif kind == "required":
            for name in err.validator_value:
                if name not in value:
                    where = f"{path}.{name}" if path else name
                    yield Problem(where, "missing required key", None, f"set it: +{where}=…")
        elif isinstance(value, str) and _TOKEN_COUNT.match(value) and _counts_tokens(path):
            yield _token_problem(path, value)
        elif isinstance(value, str) and _SIZE_STRING.match(value):
            yield _size_problem(path, value)
        elif "propertyNames" in err.schema_path and path.endswith("max_memory_gib"):
            yield Problem(
                f"{path}.{value}",
                "not a GPU id",
                "physical GPU ids (integers)",
                "write the whole dict: 'gpus.max_memory_gib={0: 20, 1: 24}'",
            )
        elif "propertyNames" in err.schema_path:
            where = f"{path}.{value}" if path else str(value)
            yield Problem(where, "not a valid name", err.message)
        elif kind == "enum":
            choices = [str(c) for c in err.validator_value]
            yield Problem(
                path,
                f"'{value}' is not a valid choice",
                one_of(choices),
                did_you_mean(str(value), choices),
            )
        elif kind in ("type", "oneOf", "anyOf"):
            expected = _describe_type(schema)
            hint = None
            if isinstance(value, str) and value.startswith(("cuda", "gpu", "GPU")):
                hint = "name GPUs by their physical id as an integer, e.g. 0"
            elif isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                hint = f"write {int(value)}"
            elif isinstance(value, str) and "object" in expected and _DICT_ENTRY.match(value):
                key, entry = (part.strip() for part in value.split(":", 1))
                hint = f"quote the whole override for bash: '{path}={{{key}: {entry}}}'"
            yield Problem(path, f"found {_describe_value(value)}", expected, hint)
        elif kind in _BOUNDS:
            yield Problem(
                path,
                f"found {_describe_value(value)}",
                f"{_BOUNDS[kind]} {err.validator_value}",
                schema.get("description"),
            )
        elif kind == "pattern":
            yield Problem(
                path,
                f"'{clip(str(value))}' is not well-formed",
                schema.get("description"),
                _pattern_hint(path, value),
            )
        else:
            yield Problem(path, err.message, schema.get("description"))


def _pattern_hint(path: str, value: Any) -> str | None:
    if "modules" in path:
        return "module names like model.layers.3 or a range model.layers.0-13; no spaces or regexes"
    if path.endswith("hub_id"):
        return _hub_id_hint(str(value))
    return None


def _hub_id_hint(value: str) -> str:
    """Why a hub id is refused, by huggingface_hub's rules (`validate_repo_id`)."""
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or ".." in value.split("/"):
        return (
            "a repository id is owner/name, never a path (no '..', no leading '/' or '.'): "
            "for a checkpoint directory use model.source.kind=local model.source.path=…"
        )
    if "--" in value or ".." in value:
        return "no '..' or '--' inside a repository id"
    if value.endswith(".git"):
        return "a repository id does not end in .git"
    return "owner/name, e.g. THUDM/chatglm3-6b"


def _counts_tokens(path: str) -> bool:
    return path.endswith(("_tokens", "max_position_embeddings"))


def _token_problem(path: str, value: str) -> Problem:
    """`128k` where a token count belongs: the integer it most likely means (k = 1024 tokens)."""
    number, unit = _TOKEN_COUNT.match(value).groups()  # type: ignore[union-attr]
    scale = 1024 if unit in "kK" else 1024**2
    tokens = round(float(number) * scale)
    return Problem(
        path,
        f"found string {json.dumps(value)}",
        "integer",
        f"write {path}={tokens} ({value} tokens = {number} × {scale})",
    )


def _size_problem(path: str, value: str) -> Problem:
    """A size string where glmdeploy wants a number of GiB, with the number it most likely means."""
    number, unit = _SIZE_STRING.match(value).groups()  # type: ignore[union-attr]
    power = "kmgt".index(unit[0].lower()) + 1
    base = 1024 if "i" in unit else 1000
    bits = unit.endswith("b")
    gib = float(number) * base**power / (8 if bits else 1) / 2**30
    if bits:
        note = f"accelerate reads '{value}' as gigabits: {gib:.2f} GiB"
    elif not unit.endswith("B"):
        note = f"'{value}' names no unit of bytes"
    else:
        note = f"= {gib:.2f} GiB"
    meant = float(number) if bits or "i" in unit or not unit.endswith("B") else round(gib, 2)
    parent, _, leaf = path.rpartition(".")
    if parent.endswith("max_memory_gib") and leaf.isdigit():
        fix = f"'{parent}={{{leaf}: {meant:g}}}'"
    else:
        fix = f"{path}={meant:g}"
    return Problem(
        path, f"size string '{value}' ({note})", "a number of GiB, e.g. 24 or 23.5", f"write {fix}"
    )


def _describe_type(schema: Mapping[str, Any]) -> str:
    variants = schema.get("oneOf") or schema.get("anyOf")
    if variants:
        return " or ".join(_describe_type(v) for v in variants)
    if "enum" in schema:
        return one_of(str(c) for c in schema["enum"])
    kind = schema.get("type", "value")
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def _describe_value(value: Any) -> str:
    names = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "mapping",
        type(None): "null",
    }
    if value is None:
        return "null"  # not "null null"
    shown = clip(json.dumps(value), 60)
    return f"{names.get(type(value), type(value).__name__)} {shown}"


def schema_error_problems(error: Any) -> list[Problem]:
    """The problems of one jsonschema error, for any of glmdeploy's schemas (paths as overrides)."""
    return list(_translate(error))
