"""Which physical GPUs this process uses, as which logical ids, and the environment for that.

Two questions, answered apart: what exists (`existing_gpus`: a declared fleet, else this machine's
GPUs from NVML) and what to use of it (`select_gpus`: all, physical ids, or the N least used), so
every combination works, a declared fleet with `gpus.ids` or `CUDA_VISIBLE_DEVICES` included.
Configs name GPUs by physical id (nvidia-smi's numbers = NVML indices; GPU i of a declared fleet).
glmdeploy sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` and `CUDA_VISIBLE_DEVICES=<selected ids, ascending>`,
so the process sees them as `cuda:0..k-1` in the same order; `to_logical`/`to_physical` convert. An
existing `CUDA_VISIBLE_DEVICES` (ids or `GPU-` UUIDs; a negative entry ends it, as in CUDA)
restricts the choice; see `select_gpus`. Mode `cpu` leaves the environment alone.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from glmdeploy.config.settings import GIB, GpuMode, GpuSelection
from glmdeploy.hardware.nvml import (
    HardwareSnapshot,
    SnapshotSource,
    cuda_devices_in_use,
    declared_snapshot,
    probe,
    uuid_key,
)
from glmdeploy.problems import ConfigError, HardwareError, Problem

VISIBLE = "CUDA_VISIBLE_DEVICES"
ORDER = "CUDA_DEVICE_ORDER"
_DOCTOR_HINT = "run `glmdeploy doctor` to see each GPU's id and UUID"
_ORDER_CONFLICT = "integer ids are read in the order CUDA_DEVICE_ORDER={}, not nvidia-smi's"
_UUID_EXPECTED = "a GPU UUID (or a unique prefix) from `nvidia-smi -L`"
_VISIBLE_SYNTAX = "comma-separated physical ids (0,1) or GPU UUIDs (GPU-…); MIG is not supported"


@dataclass(frozen=True)
class AssignedGpu:
    """One selected GPU: its physical id, the logical id this process sees, and its memory."""

    physical_id: int
    logical_id: int  # cuda:<logical_id> in this process, once the environment is applied
    name: str
    uuid: str
    capacity_bytes: int  # min(total memory, gpus.max_memory_gib cap)
    free_bytes: int  # free when the snapshot was taken
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class GpuAssignment:
    """The GPUs this process uses and the variables that make it see exactly them.

    The dict properties are keyed by physical id.
    """

    mode: GpuMode
    devices: tuple[AssignedGpu, ...]  # ascending physical id = ascending logical id
    env: Mapping[str, str] = field(default_factory=dict)  # empty: leave the environment alone
    source: SnapshotSource = "nvml"

    @property
    def declared(self) -> bool:
        """The GPUs are a declared fleet: plannable, never loadable."""
        return self.source == "declared"

    @property
    def physical_ids(self) -> tuple[int, ...]:
        return tuple(d.physical_id for d in self.devices)

    @property
    def capacity_bytes(self) -> dict[int, int]:
        return {d.physical_id: d.capacity_bytes for d in self.devices}

    @property
    def free_bytes(self) -> dict[int, int]:
        return {d.physical_id: d.free_bytes for d in self.devices}

    @property
    def compute_capabilities(self) -> dict[int, tuple[int, int]]:
        return {d.physical_id: d.compute_capability for d in self.devices}


def existing_gpus(
    selection: GpuSelection, probe_machine: Callable[[], HardwareSnapshot] = probe
) -> HardwareSnapshot:
    """What exists: the declared fleet, else this machine's GPUs (NVML); none for `gpus=cpu`."""
    if selection.declared:
        return declared_snapshot(selection.declared)
    if selection.mode is GpuMode.CPU:
        return HardwareSnapshot((), None, None, None, "none")
    return probe_machine()


def select_gpus(
    selection: GpuSelection, snapshot: HardwareSnapshot, env: Mapping[str, str]
) -> GpuAssignment:
    """Decide the GPUs for `selection` among those in `snapshot` (what exists: `existing_gpus`),
    given the environment the process has.

    An existing `CUDA_VISIBLE_DEVICES` in `env` restricts the GPUs that may be chosen, on a
    declared fleet as on this machine: `auto` takes exactly those, `least_used` picks among them,
    and `gpus.ids` must be a subset. Its entries are physical ids or GPU UUIDs (unique prefixes
    too); empty or `-1` allows none. Integer entries and `gpus.ids` are PCI bus ids: a
    `CUDA_DEVICE_ORDER` other than `PCI_BUS_ID` conflicts with them.

    Raises:
        ConfigError: the selection is incomplete (no ids, no count).
        HardwareError: the GPUs asked for are not there or not allowed; every problem at once.
    """
    if selection.mode == GpuMode.CPU:
        return GpuAssignment(GpuMode.CPU, (), {}, snapshot.source)
    allowed, problems = _allowed_ids(snapshot, env)
    # `candidates`: the GPUs this selection could use; memory caps must name one of them.
    if selection.mode == GpuMode.AUTO:
        chosen = candidates = allowed
    elif selection.mode == GpuMode.IDS:
        problems += _check_ids(selection.ids, snapshot, env, allowed)
        chosen = candidates = sorted(set(selection.ids))
    else:
        candidates = allowed
        chosen = _least_used(selection.count, snapshot, allowed, problems)
    wanted_env = {ORDER: "PCI_BUS_ID", VISIBLE: ",".join(map(str, chosen))} if chosen else {}
    return _assign(selection, snapshot, chosen, candidates, wanted_env, problems)


def to_logical(assignment: GpuAssignment, physical_id: int, path: str = "") -> int:
    """The `cuda:N` index this process uses for physical GPU `physical_id`."""
    for device in assignment.devices:
        if device.physical_id == physical_id:
            return device.logical_id
    message = f"GPU {physical_id} is not selected (selected: {_ids(assignment.physical_ids)})"
    raise HardwareError([Problem(path, message, hint=_mapping_hint(assignment))])


def to_physical(assignment: GpuAssignment, logical_id: int, path: str = "") -> int:
    """The physical id (nvidia-smi's number) of `cuda:logical_id` in this process."""
    for device in assignment.devices:
        if device.logical_id == logical_id:
            return device.physical_id
    devices = ", ".join(f"cuda:{d.logical_id}" for d in assignment.devices) or "none"
    message = f"cuda:{logical_id} is not a device of this process (devices: {devices})"
    raise HardwareError([Problem(path, message, hint=_mapping_hint(assignment))])


# UUIDs of the GPUs that CUDA already sees in this process, in its order; None: not initialised.
CudaProbe = Callable[[], Sequence[str] | None]


def apply_environment(
    assignment: GpuAssignment,
    environ: MutableMapping[str, str] | None = None,
    cuda_probe: CudaProbe = cuda_devices_in_use,
) -> None:
    """Set `assignment.env` in `environ` (default: `os.environ`).

    Raises HardwareError when CUDA is already initialised here and sees other GPUs: CUDA reads
    `CUDA_VISIBLE_DEVICES` once, when it initialises, so the change would be silently ignored.
    """
    target = os.environ if environ is None else environ
    if not assignment.env:
        return
    seen = cuda_probe()
    wanted = [d.uuid for d in assignment.devices]
    if seen is not None and [uuid_key(u) for u in seen] != [uuid_key(u) for u in wanted]:
        settings = " ".join(f"{k}={v}" for k, v in sorted(assignment.env.items()))
        message = f"CUDA is already initialised in this process, seeing {len(seen)} GPU(s) "
        message += f"instead of exactly GPUs {_ids(assignment.physical_ids)}"
        hint = f"CUDA reads {VISIBLE} once, when it initialises: run glmdeploy in a fresh process "
        hint += f"(the `glmdeploy` CLI does), or set {settings} before any CUDA call"
        expected = f"{settings}, set before CUDA initialises"
        raise HardwareError([Problem(VISIBLE, message, expected, hint)])
    target.update(assignment.env)


def _assign(
    selection: GpuSelection,
    snapshot: HardwareSnapshot,
    chosen: Sequence[int],
    candidates: Sequence[int],
    env: Mapping[str, str],
    problems: list[Problem],
) -> GpuAssignment:
    """Apply memory caps, raise every problem found so far, and number the chosen GPUs."""
    caps = selection.max_memory_gib
    for gpu_id in sorted(caps):  # cap values were range-checked by validation
        if gpu_id not in candidates:
            message = f"GPU {gpu_id} has a memory cap but is not selected"
            hint = f"remove the cap for GPU {gpu_id}, or select GPU {gpu_id}"
            expected = f"caps for GPUs {_ids(candidates)}"
            problems.append(Problem("gpus.max_memory_gib", message, expected, hint))
    if problems:
        raise HardwareError(problems)
    devices: list[AssignedGpu] = []
    for logical_id, physical_id in enumerate(chosen):
        gpu = snapshot.gpu(physical_id)
        assert gpu is not None  # every chosen id was checked against the snapshot
        cap_bytes = int(caps[physical_id] * GIB) if physical_id in caps else gpu.total_bytes
        info = (gpu.name, gpu.uuid, min(gpu.total_bytes, cap_bytes), gpu.free_bytes)
        devices.append(AssignedGpu(physical_id, logical_id, *info, gpu.compute_capability))
    return GpuAssignment(selection.mode, tuple(devices), dict(env), snapshot.source)


def _allowed_ids(
    snapshot: HardwareSnapshot, env: Mapping[str, str]
) -> tuple[list[int], list[Problem]]:
    """The physical ids an existing CUDA_VISIBLE_DEVICES allows (all GPUs when it is unset)."""
    value = env.get(VISIBLE)
    if value is None:
        return list(snapshot.ids), []
    allowed: list[int] = []
    problems: list[Problem] = []

    def bad(message: str, expected: str | None = None) -> None:
        hint = f"fix or unset {VISIBLE}; {_DOCTOR_HINT}"
        problems.append(Problem(VISIBLE, f"{message} (it is '{value}')", expected, hint))

    for entry in (e.strip() for e in value.split(",")) if value.strip() else ():
        found: int | None = None
        if re.fullmatch(r"[+-]?\d+", entry):
            if int(entry) < 0:  # CUDA stops reading at a negative entry: "-1" hides every GPU
                break
            if _order_is_not_pci(env):
                bad(_ORDER_CONFLICT.format(env[ORDER]), "GPU UUIDs, or PCI_BUS_ID order")
            elif snapshot.gpu(int(entry)) is None:
                bad(f"GPU {int(entry)} is not {_where(snapshot)}", _visible(snapshot))
            else:
                found = int(entry)
        elif entry.upper().startswith("GPU-"):
            prefix = entry.lower()
            matches = [g.physical_id for g in snapshot.gpus if g.uuid.lower().startswith(prefix)]
            if len(matches) == 1:
                found = matches[0]
            else:
                bad(f"{entry} matches {'several GPUs' if matches else 'no GPU'}", _UUID_EXPECTED)
        else:
            bad(f"'{entry}' is not a GPU id or UUID", _VISIBLE_SYNTAX)
        if found is not None and found in allowed:
            bad(f"GPU {found} is listed twice")
        elif found is not None:
            allowed.append(found)
    return sorted(allowed), list(dict.fromkeys(problems))  # one problem per kind of mistake


def _check_ids(
    ids: Sequence[int], snapshot: HardwareSnapshot, env: Mapping[str, str], allowed: Sequence[int]
) -> list[Problem]:
    if not ids:
        hint = "write e.g. 'gpus.ids=[0,1]', or choose gpus=auto"
        raise ConfigError([Problem("gpus.ids", "no GPU ids given", "a list of ids", hint)])

    problems: list[Problem] = []

    def bad(message: str, expected: str | None, hint: str) -> None:
        problems.append(Problem("gpus.ids", message, expected, hint))

    if _order_is_not_pci(env):
        message = f"{ORDER}={env[ORDER]} is set, but gpus.ids are nvidia-smi (PCI bus) ids"
        hint = f"unset {ORDER} (glmdeploy sets PCI_BUS_ID), or use gpus=auto and UUIDs in {VISIBLE}"
        bad(message, f"{ORDER} unset or PCI_BUS_ID", hint)
    for gpu_id, times in sorted(Counter(ids).items()):
        if times > 1:
            bad(f"GPU {gpu_id} is listed {times} times", None, "list each GPU once")
    for gpu_id in dict.fromkeys(ids):
        if snapshot.gpu(gpu_id) is None:
            hint = "run `glmdeploy doctor`, or choose gpus=auto"
            if snapshot.source == "declared":
                hint = f"gpus.declared lists {len(snapshot.gpus)} GPU(s), numbered from 0"
            bad(f"GPU {gpu_id} is not {_where(snapshot)}", _visible(snapshot), hint)
        elif gpu_id not in allowed:
            hint = f"choose ids among the allowed ones, or unset {VISIBLE}"
            message = f"GPU {gpu_id} is hidden by {VISIBLE}={env.get(VISIBLE, '')}"
            bad(message, f"allowed: {_ids(allowed)}", hint)
    return problems


def _least_used(
    count: int | None, snapshot: HardwareSnapshot, allowed: Sequence[int], problems: list[Problem]
) -> list[int]:
    if count is None or count < 1:
        problem = Problem("gpus.count", f"count is {count}", "at least 1", "e.g. gpus.count=2")
        raise ConfigError([problem])
    if count > len(allowed):
        message = f"{count} GPUs requested, only {len(allowed)} can be used"
        expected = f"at most {len(allowed)} (allowed: {_ids(allowed)})"
        problems.append(Problem("gpus.count", message, expected, _DOCTOR_HINT))
        return []
    used = {gpu.physical_id: gpu.used_bytes for gpu in snapshot.gpus}
    return sorted(sorted(allowed, key=lambda i: (used[i], i))[:count])


def _order_is_not_pci(env: Mapping[str, str]) -> bool:
    return ORDER in env and env[ORDER].strip() != "PCI_BUS_ID"


def _where(snapshot: HardwareSnapshot) -> str:
    return "in the declared fleet" if snapshot.source == "declared" else "on this machine"


def _visible(snapshot: HardwareSnapshot) -> str:
    if snapshot.source == "declared":
        return f"declared: {_ids(snapshot.ids)}"
    reason = f" (NVML: {snapshot.nvml_error})" if snapshot.nvml_error else ""
    return f"visible: {_ids(snapshot.ids)}{reason}"


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(map(str, ids)) or "none"


def _mapping_hint(assignment: GpuAssignment) -> str:
    pairs = ", ".join(f"GPU {d.physical_id} as cuda:{d.logical_id}" for d in assignment.devices)
    hint = "glmdeploy names GPUs by physical id, as in gpus.ids and nvidia-smi; "
    return hint + f"this process sees {pairs or 'no GPU'}"
