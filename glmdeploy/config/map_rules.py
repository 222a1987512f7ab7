"""Rules of an explicit map: devices selected and allowed, each module once, ranges bounded.

Ranges are checked arithmetically, never expanded: a range past the model's layers (when known)
or past any model's is refused before the planner would list its names.
"""

from __future__ import annotations

import bisect
import itertools
import re
from typing import Any

from glmdeploy.problems import Problem, clip

_RANGE = re.compile(r"^(?P<prefix>.*\.)(?P<start>\d+)(?:-(?P<end>\d+))?$")
MAX_RANGE_INDEX = 65535  # no model has more layers or experts; bounds a range before any work
MAX_MAP_NAMES = 4096  # module names in one explicit map


def map_problems(
    entries: list[Any], offload: str, mode: str, allowed: set[int] | None, layers: int | None
) -> list[Problem]:
    """Problems of an explicit map (schema-valid entries).

    Args:
        entries: `placement.map`.
        offload: `placement.offload`.
        mode: `gpus.mode`.
        allowed: the physical GPU ids the config selects, or None where only the hardware knows.
        layers: the model's decoder layers, when its architecture is given.
    """
    total = sum(1 if isinstance(e["modules"], str) else len(e["modules"]) for e in entries)
    if total > MAX_MAP_NAMES:
        hint = "name layers by ranges: model.layers.0-13"
        return [Problem("placement.map", f"{total} module names", f"at most {MAX_MAP_NAMES}", hint)]
    out: list[Problem] = []
    spans: dict[str, list[tuple[int, int, int]]] = {}  # prefix -> (start, end, entry) of ranges
    names: dict[str, int] = {}  # plain module name -> entry
    for i, entry in enumerate(entries):
        device = entry["device"]
        where = f"placement.map[{i}].device"
        if isinstance(device, int) and allowed is not None and device not in allowed:
            shown = ", ".join(map(str, sorted(allowed))) or "none (gpus=cpu)"
            out.append(
                Problem(
                    where,
                    f"GPU {device} is not selected (selected: {shown})",
                    "a selected physical GPU id, cpu or disk",
                    "maps name physical GPU ids, the same ids as gpus.ids",
                )
            )
        if device == "disk" and offload != "disk":
            out.append(
                Problem(
                    where,
                    "disk, but placement.offload is not disk",
                    None,
                    "allow it: placement.offload=disk",
                )
            )
        if device == "cpu" and offload == "none" and mode != "cpu":
            out.append(
                Problem(
                    where,
                    "cpu, but placement.offload=none",
                    None,
                    "allow it: placement.offload=cpu",
                )
            )
        modules = [entry["modules"]] if isinstance(entry["modules"], str) else entry["modules"]
        for name in modules:
            too_far = _range_beyond(name, i, layers)
            out += [too_far] if too_far else _overlaps(name, i, spans, names)
    return out


def _range_beyond(name: str, entry: int, layers: int | None) -> Problem | None:
    """A range past the model's layers (when known) or any model's, before anything expands it."""
    match = _RANGE.match(name)
    if not match or match["end"] is None:
        return None
    prefix, end = match["prefix"], int(match["end"])
    where = f"placement.map[{entry}].modules"
    if layers is not None and prefix.endswith("layers.") and end >= layers:
        start = int(match["start"])
        hint = f"write {prefix}{start}-{layers - 1}" if start < layers else None
        message = f"'{clip(name)}' reaches layer {end}, but the model has {layers} layers"
        return Problem(where, message, f"layers 0-{layers - 1}", hint)
    if end > MAX_RANGE_INDEX:
        message = f"'{clip(name)}' reaches index {end}: no model has that many layers or experts"
        return Problem(where, message, f"indices at most {MAX_RANGE_INDEX}", None)
    return None


def _overlaps(
    name: str, entry: int, spans: dict[str, list[tuple[int, int, int]]], names: dict[str, int]
) -> list[Problem]:
    """Record one module pattern; Problems if it repeats or overlaps an earlier one."""
    where = f"placement.map[{entry}].modules"
    match = _RANGE.match(name)
    if not match:
        if name in names:
            return [
                Problem(
                    where,
                    f"'{name}' is already placed by placement.map[{names[name]}]",
                    "each module once",
                    "remove one of the two entries",
                )
            ]
        names[name] = entry
        return []
    prefix, start = match["prefix"], int(match["start"])
    end = int(match["end"]) if match["end"] is not None else start
    if end < start:
        return [
            Problem(where, f"empty range '{name}'", "start <= end", f"write {prefix}{end}-{start}")
        ]
    placed = spans.setdefault(prefix, [])  # disjoint (start, end, entry), sorted: ends sorted too
    after = bisect.bisect_right(placed, (end, end, entry))
    earlier = (placed[j] for j in range(after - 1, -1, -1))
    clashes = list(itertools.takewhile(lambda span: span[1] >= start, earlier))
    if not clashes:
        placed.insert(after, (start, end, entry))
    return [
        Problem(
            where,
            f"'{name}' overlaps {prefix}{s}-{e} in placement.map[{j}]",
            "each layer once",
            "make the ranges disjoint",
        )
        for s, e, j in reversed(clashes)
    ]
