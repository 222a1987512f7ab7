"""Read glmdeploy's own JSON files (plans, run records, sweep records) and check their shape.

Each format has a JSON Schema in `schemas/` (`plan`, `run`, `sweep`). A file that is missing, not
JSON, not an object, or not of its format's shape is a `ConfigError` whose problems name the file
and, inside it, the JSON path (`plan.json:device_map[3][1]`), never an internal error later on.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from glmdeploy.config.locations import SCHEMA_PATH
from glmdeploy.config.validate import schema_error_problems
from glmdeploy.problems import ConfigError, Problem

FORMATS = {  # kind -> (what the file is called, what it should be)
    "plan": ("plan", "a plan written by `glmdeploy plan --save FILE` (or a run's plan.json)"),
    "run": ("run record", "a run record (run.json) written by glmdeploy plan/load/generate/…"),
    "sweep": ("sweep record", "a sweep record (sweep.json) written by `glmdeploy COMMAND -m …`"),
}


@cache
def _validator(kind: str) -> Any:
    from jsonschema import Draft202012Validator

    schema = json.loads((SCHEMA_PATH.parent / f"{kind}.schema.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema)


def read_document(path: Path | str, kind: str, *, title: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`, checked against `schemas/<kind>.schema.json`.

    Args:
        path: the file.
        kind: `plan`, `run` or `sweep`.
        title: the error's title (default: `invalid <kind> file`).

    Raises:
        ConfigError: every problem found, each naming the file (and where in it).
    """
    path = Path(path)
    noun, expected = FORMATS[kind]
    title = title or f"invalid {kind} file"
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_nan)
    except FileNotFoundError as exc:
        raise ConfigError([Problem(str(path), "no such file", expected)], title) from exc
    except IsADirectoryError as exc:
        raise ConfigError([Problem(str(path), "is a directory", expected)], title) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problem = Problem(str(path), f"cannot read the {noun}: {exc}", expected)
        raise ConfigError([problem], title) from exc
    if not isinstance(data, dict):
        json_names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
        found = json_names.get(type(data), "a number")  # JSON's names, not Python's
        problem = Problem(str(path), f"holds {found}, not a JSON object", expected)
        raise ConfigError([problem], title)
    tag = _validator(kind).schema["properties"].get("format", {}).get("const")
    if tag is not None and data.get("format") != tag:  # another file: its other keys do not matter
        found = f"not a {tag} file (format: {data.get('format')!r})"
        raise ConfigError([Problem(str(path), found, expected)], title)
    problems = {
        Problem(f"{path}:{p.path}" if p.path else str(path), p.message, p.expected,
                None if p.message == "missing required key" else p.hint)  # no `+key=` hints
        for error in _validator(kind).iter_errors(data)
        for p in schema_error_problems(error)
    }  # fmt: skip
    if problems:
        raise ConfigError(sorted(problems), title)
    return data


def _no_nan(token: str) -> float:
    raise ValueError(f"{token} is not a number glmdeploy writes")
