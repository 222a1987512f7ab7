"""Checks a user's explicit device map against the real module tree and the selected devices.

All problems are collected before anything is reported. One-device maps are checked exactly like
multi-device ones (transformers checks neither names nor coverage for those). For a ChatGLM2/3
checkpoint, maps may use the checkpoint's own module names: they are translated here, once, and the
rest of the planner sees native names only.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from glmdeploy.config.settings import MapEntry, Offload
from glmdeploy.model.anatomy import Anatomy, Unit
from glmdeploy.model.chatglm_names import checkpoint_module_to_native, module_name_hint
from glmdeploy.planning.types import DeviceKey, device_label, summarise
from glmdeploy.problems import Problem, did_you_mean

_RANGE = re.compile(r"^(.*?)(\d+)-(\d+)(.*)$")
_SENTINEL = "987654321"


@dataclass(frozen=True)
class MapCheck:
    """The outcome: the resolved unit -> device map (forward order), or the problems (not both)."""

    device_map: dict[str, DeviceKey]
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()  # e.g. the native names of a map written in checkpoint names

    @property
    def ok(self) -> bool:
        return not self.problems


def expand(pattern: str) -> list[str] | None:
    """`model.layers.0-2` -> the three names; a name without a range -> itself; None: bad range."""
    match = _RANGE.match(pattern)
    if not match:
        return [pattern]
    head, first, last, tail = match.groups()
    if int(first) > int(last):
        return None
    return [f"{head}{i}{tail}" for i in range(int(first), int(last) + 1)]


def _by_name(pattern: str, translate: Callable[[str], str | None]) -> str | None:
    """`translate` applied to a pattern, a range kept as a range."""
    match = _RANGE.match(pattern)
    if not match:
        return translate(pattern)
    head, first, last, tail = match.groups()
    found = translate(f"{head}{_SENTINEL}{tail}")
    return found.replace(_SENTINEL, f"{first}-{last}") if found else None


def legacy_hint(pattern: str, checkpoint_names: bool = False) -> str | None:
    """`glmdeploy.model.chatglm_names.module_name_hint` for a pattern, ranges kept as ranges."""
    return _by_name(pattern, partial(module_name_hint, legacy_checkpoint=checkpoint_names))


def native_pattern(pattern: str) -> str | None:
    """The native pattern for one in a ChatGLM2/3 checkpoint's own names, or None."""
    return _by_name(pattern, checkpoint_module_to_native)


def check_explicit_map(
    entries: Sequence[MapEntry],
    anatomy: Anatomy,
    selected: Sequence[DeviceKey],
    offload: Offload = Offload.NONE,
    *,
    checkpoint_names: bool = False,
) -> MapCheck:
    """Validate `placement.map` and resolve it to one device per unit.

    Args:
        entries: `placement.map`.
        anatomy: the model (native names).
        selected: the selected GPUs' physical ids, in selection order.
        offload: `placement.offload`; maps may name cpu (offload=cpu|disk) and disk (offload=disk).
        checkpoint_names: the model is a ChatGLM2/3 checkpoint, whose own module names
            (`transformer.encoder.layers.0-13`, …) are accepted and noted with their native names.
    """
    problems: list[Problem] = []
    gpus = [k for k in selected if isinstance(k, int)]
    allowed = offload.devices
    for i, entry in enumerate(entries):
        problems += _device_problems(i, entry.device, gpus, allowed)

    by_name = {u.name: u for u in anatomy.units}
    owner = {m: u for u in anatomy.units for m in (*u.modules, *u.tensors)}
    whole: dict[str, list[tuple[int, DeviceKey]]] = defaultdict(list)  # unit -> entries naming it
    parts: dict[str, list[tuple[int, DeviceKey]]] = defaultdict(list)  # tensor -> entries
    translated: dict[str, str] = {}  # checkpoint name -> native name
    for i, entry in enumerate(entries):
        path = f"placement.map[{i}].modules"
        if not entry.modules:
            problems.append(Problem(path, "no modules listed", expected="module names or ranges"))
        for written in entry.modules:
            pattern = native_pattern(written) if checkpoint_names else None
            if pattern is not None:
                translated[written] = pattern
            pattern = pattern or written
            names = expand(pattern)
            if names is None:
                problems.append(Problem(path, f"{written!r}: the range runs backwards"))
                continue
            unknown = [n for n in names if n not in owner and n not in anatomy.containers]
            if unknown:
                problems.append(_unknown(path, written, names, unknown, anatomy, checkpoint_names))
            for name in (n for n in names if n not in unknown):
                if name in by_name or name in anatomy.containers:
                    for unit in anatomy.units:
                        if unit.name == name or unit.name.startswith(name + "."):
                            whole[unit.name].append((i, entry.device))
                else:
                    for tensor in _tensors(owner[name]):
                        if tensor == name or tensor.startswith(name + "."):
                            parts[tensor].append((i, entry.device))

    resolved: dict[str, DeviceKey] = {}
    uncovered: list[str] = []
    for unit in anatomy.units:
        cover = {t: whole[unit.name] + parts.get(t, []) for t in _tensors(unit)}
        missing = [t for t, c in cover.items() if not c]
        devices = {d for c in cover.values() for _, d in c}
        overlaps = {
            (entries_[0], tuple(entries_[1:]))
            for entries_ in (sorted({i for i, _ in claims}) for claims in cover.values())
            if len(entries_) > 1
        }
        problems += [_overlap(unit, first, list(others)) for first, others in overlaps]
        if missing and len(missing) == len(cover):
            uncovered.append(unit.name)
        elif missing:
            problems.append(_partial(unit, missing, devices))
        elif overlaps:
            continue  # reported above; a split would only repeat it
        elif len(devices) > 1:
            problems.append(_split(unit, cover, devices))
        elif devices:
            resolved[unit.name] = next(iter(devices))
    if uncovered:
        problems.append(_uncovered(uncovered))
    for group in anatomy.tied_groups:
        where = {u: resolved[u] for u in group.units if u in resolved}
        if len(set(where.values())) > 1:
            problems.append(_tied(group.units, where))
    unique = sorted(set(problems))
    notes: tuple[str, ...] = ()
    if translated:
        pairs = ", ".join(f"{old} = {new}" for old, new in translated.items())
        notes = (f"placement.map uses the checkpoint's ChatGLM2/3 names; planned as {pairs}",)
    return MapCheck({} if unique else resolved, tuple(unique), notes)


def _tensors(unit: Unit) -> tuple[str, ...]:
    """What must be covered: parameters and persistent buffers (else the unit itself)."""
    return unit.tensors or (unit.name,)


def _device_problems(
    i: int, device: object, gpus: list[int], allowed: tuple[str, ...]
) -> list[Problem]:
    path = f"placement.map[{i}].device"
    shown = ", ".join(map(str, gpus)) or "none"
    expected = f"one of the selected GPUs ({shown}){''.join(f', {a}' for a in allowed)}"
    if isinstance(device, int) and not isinstance(device, bool):
        if device in gpus:
            return []
        ids_hint = "maps name physical GPU ids, as in gpus.ids"
        if 0 <= device < len(gpus):
            ids_hint += f" (logical id {device} is GPU {gpus[device]} here)"
        return [Problem(path, f"GPU {device} is not selected (selected: {shown})", hint=ids_hint)]
    if device in ("cpu", "disk"):
        if device in allowed:
            return []
        return [
            Problem(
                path,
                f"{device} offload is not enabled",
                expected=expected,
                hint=f"set placement.offload={device} to allow it",
            )
        ]
    text = str(device)
    match = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    hint = f"write {match.group(1)} (a number, the physical GPU id)" if match else None
    return [Problem(path, f"{text!r} is not a device", expected=expected, hint=hint)]


def _unknown(
    path: str,
    pattern: str,
    names: list[str],
    unknown: list[str],
    anatomy: Anatomy,
    checkpoint_names: bool = False,
) -> Problem:
    native = native_pattern(pattern) if checkpoint_names else None  # accepted, but too far
    legacy = legacy_hint(pattern, checkpoint_names)
    if legacy is not None and len(unknown) == len(names) and native is None:
        return Problem(
            path,
            f"{pattern!r} is a legacy ChatGLM module name; this model is planned in transformers' "
            f"native {anatomy.model_class} layout",
            hint=legacy,
        )
    stem = re.fullmatch(r"(.*)\.\d+", names[0])
    if len(unknown) < len(names) or (stem and stem.group(1) in anatomy.containers):
        blocks = summarise(u.name for u in anatomy.blocks)
        return Problem(
            path,
            (f"{pattern!r} is {native}: " if native else "") + f"{summarise(unknown)} do not exist",
            expected=f"this model has {blocks}" if blocks else None,
        )
    candidates = [*anatomy.containers, *(m for u in anatomy.units for m in u.modules)]
    hint = did_you_mean(names[0], candidates)
    match = _RANGE.match(pattern)
    if hint and match:  # suggest the range, not its first name
        _, first, last, tail = match.groups()
        hint = re.sub(rf"\.{first}{re.escape(tail)}'", f".{first}-{last}{tail}'", hint)
    return Problem(
        path,
        f"{pattern!r} is not a module of {anatomy.model_class}",
        expected=f"top-level units: {summarise(anatomy.names)}",
        hint=hint,
    )


def _overlap(unit: Unit, first: int, others: list[int]) -> Problem:
    where = ", ".join(f"placement.map[{i}]" for i in others)
    return Problem(
        f"placement.map[{first}].modules",
        f"{unit.name} is also mapped by {where}",
        hint="name each module in one entry only",
    )


def _partial(unit: Unit, missing: list[str], devices: set[DeviceKey]) -> Problem:
    shown = ", ".join(missing[:4]) + (", …" if len(missing) > 4 else "")
    return Problem(
        "placement.map",
        f"{unit.name} is only partly mapped: {shown} not mapped",
        hint=f"map the whole unit '{unit.name}' (to {device_label(min(devices, key=str))})",
    )


def _split(
    unit: Unit, cover: dict[str, list[tuple[int, DeviceKey]]], devices: set[DeviceKey]
) -> Problem:
    entries = sorted({i for claims in cover.values() for i, _ in claims})
    shown = " and ".join(sorted(map(device_label, devices)))
    return Problem(
        f"placement.map[{entries[0]}].modules",
        f"{unit.name} ({unit.class_name}) must stay on one device, but its parts map to {shown}",
        hint=f"map the whole block: '{unit.name}'",
    )


def _uncovered(names: list[str]) -> Problem:
    return Problem(
        "placement.map",
        f"not mapped to any device: {summarise(names)}",
        hint=f"add them to an entry, e.g. {{modules: [{summarise(names)}], device: …}}",
    )


def _tied(units: tuple[str, ...], where: dict[str, DeviceKey]) -> Problem:
    leader, *followers = units
    shown = ", ".join(f"{u} on {device_label(d)}" for u, d in where.items())
    return Problem(
        "placement.map",
        f"{', '.join(followers)} shares its weight with {leader} (tied), but they map apart: "
        f"{shown}",
        hint=f"put {', '.join(followers)} on {device_label(where.get(leader, ''))} with {leader}",
    )
