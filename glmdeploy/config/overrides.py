"""Screen command-line overrides before Hydra sees them: what bash made of them, what they may set.

Hydra applies whatever it is given, including settings that instantiate Python objects
(`hydra.callbacks`, launchers, logging handlers, `_target_`). glmdeploy configs are data: only the
output-directory settings it documents pass, and `hydra.job.env_set` (the job's environment) from
the user's own command line (never from a config file: `glmdeploy.config.user_dirs`). The screen
also catches what bash brace expansion makes of unquoted `{…}` (the same key given several times
in a row), `???` given as a value, over-long keys and group options that are paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from glmdeploy.config.locations import GROUPS
from glmdeploy.problems import Problem, clip

# Hydra settings a user may set (README, "Run records"); all else under `hydra` is refused.
ALLOWED_HYDRA_KEYS = (
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.job.chdir",
    "hydra.job.name",
    "hydra.output_subdir",
    "hydra.verbose",
)
ENV_SET = "hydra.job.env_set"  # variables the job sets for itself: allowed on the command line
# Variables through which a job's environment would run code it does not otherwise run.
EXECUTING_VARIABLES = frozenset(
    ("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")
)
MAX_KEY_CHARS = 200
MAX_ITEMS = 1024  # Hydra's override parser takes seconds beyond a few thousand items
MAX_WORD_CHARS = 1 << 20
MISSING = "???"
QUOTING_HINT = (
    "quote the whole override for bash: 'key=[a,b]' or 'key={0: 20, 1: 24}'; "
    "strings with spaces or commas need inner quotes: 'key=\"a, b\"'"
)
_PREFIX = re.compile(r"^(~|\+\+|\+)?")
_DICT_PIECE = re.compile(r"^[\w.-]+:[^\[\]{},:]+$")  # `2:20`: one entry of an expanded dict


def word_key(override: str) -> str:
    """The key an override names, without its `+`/`++`/`~` prefix: `+a.b=1` -> `a.b`."""
    return _PREFIX.sub("", override.split("=", 1)[0])


def screen_overrides(
    overrides: Sequence[str], *, sweep: bool = False
) -> tuple[list[str], list[Problem]]:
    """The overrides that may go on to Hydra, and one Problem per refused override (or run of them).

    Refused: runs of words that bash brace expansion made of an unquoted dict or list (the same
    key several times in a row, with `key:value` or bracket pieces), and in a sweep any run of
    one key (`-m precision={bf16,fp16}` would collapse to one job); over-long keys; `???` values;
    group options that are paths; Hydra settings outside ALLOWED_HYDRA_KEYS, package overrides
    (`group@package=…`) and `_target_` anywhere. Outside a sweep, a plain key given again keeps
    Hydra's rule, the last one wins (scripts append overrides); `repeated_keys` says so.
    """
    kept: list[str] = []
    problems: list[Problem] = []
    for run in _runs(overrides):
        if len(run) > 1 and (sweep or _pieces(run)):
            problems.append(_brace_problem(run))
            continue
        for word in run:
            problem = _word_problem(word)
            if problem is None:
                kept.append(word)
            else:
                problems.append(problem)
    return kept, problems


def repeated_keys(overrides: Sequence[str]) -> list[str]:
    """Notes for plain keys given several times in a row outside a sweep (the last one wins)."""
    notes = []
    for run in _runs(overrides):
        values = [w.split("=", 1)[1] for w in run if "=" in w]
        if len(set(values)) > 1 and not _pieces(run):
            key = word_key(run[0])
            notes.append(
                f"{key} given {len(run)} times in a row: {key}={clip(values[-1], 60)} is used "
                f"(bash makes this of an unquoted {key}={{{clip(','.join(values), 60)}}}; "
                f"to sweep the values write -m {key}={clip(','.join(values), 60)})"
            )
    return notes


def _pieces(run: list[str]) -> bool:
    """Whether the words of a run look like the pieces of an expanded dict or list."""
    return any(re.search(r"[:\[\]{}]", w.split("=", 1)[1]) for w in run)


def _runs(overrides: Sequence[str]) -> Iterator[list[str]]:
    """Adjacent overrides grouped by the exact text before their `=` (one group per word else)."""
    run: list[str] = []
    for word in overrides:
        head = word.split("=", 1)[0] if "=" in word else None
        if run and head is not None and run[-1].split("=", 1)[0] == head and "=" in run[-1]:
            run.append(word)
            continue
        if run:
            yield run
        run = [word]
    if run:
        yield run


def _brace_problem(run: list[str]) -> Problem:
    """Bash expands an unquoted `key={a,b}` into `key=a key=b`: one key, several times in a row."""
    head = run[0].split("=", 1)[0]
    key = word_key(run[0])
    values = [w.split("=", 1)[1] for w in run]
    shown = ", ".join(f"`{clip(w, 60)}`" for w in run[:4]) + (", …" if len(run) > 4 else "")
    message = (
        f"given {len(run)} times in a row ({shown}): split by bash brace expansion "
        "of an unquoted `{…}`?"
    )
    if all(_DICT_PIECE.match(v) for v in values):
        hint = f"quote the whole override: '{head}={{{','.join(values)}}}'"
    elif all(re.fullmatch(r"[\w.-]+", v) for v in values):
        hint = (
            f"to sweep them write {key}={','.join(values)} with -m (no braces); "
            "quote dict and list values: 'key={0: 20, 1: 24}'"
        )
    else:
        hint = QUOTING_HINT
    return Problem(key, message, "each key once", hint)


def _word_problem(word: str) -> Problem | None:
    """The problem of one override that must not reach Hydra, or None."""
    head = word.split("=", 1)[0]
    key = word_key(word)
    if "=" in word and not key:
        return Problem(
            clip(word, 60), "no key before '='", "key=value", "e.g. runtime.batch_size=4"
        )
    items = _items(word.split("=", 1)[1]) if "=" in word else 0
    if items > MAX_ITEMS or len(word) > MAX_WORD_CHARS:
        return Problem(
            clip(key, 60),
            f"a value of {len(word)} characters and {items} items",
            f"at most {MAX_ITEMS} items and {MAX_WORD_CHARS} characters in one override",
            "glmdeploy's lists are short (at most 64 GPUs, 1024 map entries); "
            "name layers by ranges: model.layers.0-13",
        )
    if len(key) > MAX_KEY_CHARS:
        return Problem(
            clip(key, 40),
            f"a key of {len(key)} characters",
            f"a config key (at most {MAX_KEY_CHARS} characters)",
            "check the override; `glmdeploy show` prints every key",
        )
    refused = _refused_setting(key.split("@", 1)[0], "@" in head)
    if refused is not None:
        return refused
    if "=" not in word:
        return None
    parsed = _parse(word)
    if parsed is None:  # Hydra reports what it cannot parse, with the rest
        return None
    value = parsed.value()
    if value == MISSING:
        if key in GROUPS:
            return Problem(key, "`???` is not an option", None, f"choose an option: {key}=<option>")
        return Problem(
            key,
            "`???` is not a value: it marks a mandatory value in config files",
            "a value",
            f"give it a value: {key}=…; `~{key}` removes an optional key",
        )
    raw = word.split("=", 1)[1]
    if key in GROUPS and (value is None or isinstance(value, bool | int | float)):
        kinds = {bool: "a boolean", int: "an integer", float: "a number"}
        kind = "null" if value is None else kinds[type(value)]
        return Problem(
            key,
            f"'{clip(raw, 60)}' reads as {kind}, not an option name",
            f"the name of a file in {key}/, without .yaml",
            f"quote it: {key}='{clip(raw, 60)}'",
        )
    if key in GROUPS and isinstance(value, list | dict):
        return Problem(
            key,
            f"'{clip(raw, 60)}' is a {type(value).__name__}: a group takes one option",
            f"the name of a file in {key}/, without .yaml",
            f"to sweep options write -m {key}=a,b",
        )
    if key in GROUPS and isinstance(value, str) and _not_an_option(value):
        return Problem(
            key,
            f"'{clip(value, 60)}' is not an option name",
            f"the name of a file in {key}/, without .yaml",
            f"options are file names in the {key}/ folders of the config directories; "
            f"put a file of your own in DIR/{key}/NAME.yaml and pass --config-dir DIR",
        )
    if _has_target(value):
        return Problem(
            key,
            "`_target_` is not allowed: glmdeploy configs are data, nothing is instantiated",
            None,
            "remove the `_target_` entry",
        )
    return None


def _refused_setting(key: str, package: bool) -> Problem | None:
    """A Problem for a Hydra setting, package override or `_target_` key a user may not set."""
    if "_target_" in key.split("."):
        return Problem(
            key,
            "`_target_` is not allowed: glmdeploy configs are data, nothing is instantiated",
            None,
            "remove the override",
        )
    if package:
        return Problem(
            key,
            "package overrides (group@package=option) are not allowed",
            "group=option",
            "each group has its fixed place in the config",
        )
    root = re.split(r"[./]", key, maxsplit=1)[0]
    variable = key.removeprefix(f"{ENV_SET}.") if key.startswith(f"{ENV_SET}.") else None
    if variable in EXECUTING_VARIABLES:
        return Problem(
            key,
            f"not allowed: {variable} makes the dynamic loader or Python run code of its choosing",
            f"{ENV_SET}.NAME for other variables",
            f"set {variable} in your own shell if you mean it",
        )
    allowed = key in ALLOWED_HYDRA_KEYS or variable is not None
    if root == "hydra" and not allowed:
        return Problem(
            key,
            "not allowed: Hydra settings other than the output directories can run code "
            "(callbacks, launcher, sweeper, logging handlers) or change the environment",
            f"one of {', '.join(ALLOWED_HYDRA_KEYS)}, {ENV_SET}.NAME",
            "glmdeploy runs no Python objects named in configs",
        )
    return None


def _parse(word: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(word)
    except HydraException:
        return None


def _not_an_option(value: str) -> bool:
    """Group options are file names (nested ones with `/`): never absolute, never `..`, short."""
    return (
        value.startswith(("/", "~"))
        or ".." in value.split("/")
        or len(value) > MAX_KEY_CHARS
        or "\\" in value
    )


def _items(value: str) -> int:
    """Roughly how many list or dict items a value holds: its commas outside quotes."""
    count, quote = 0, ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ",":
            count += 1
    return count


def _has_target(value: Any) -> bool:
    if isinstance(value, dict):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_target(v) for v in value)
    return False
