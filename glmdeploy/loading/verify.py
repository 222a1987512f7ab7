"""Check that a load lands where its plan says: the GPUs CUDA shows, and every tensor's device.

Before loading, `check_visible_gpus` confirms that `cuda:N` is the N-th selected GPU (CUDA reads
`CUDA_VISIBLE_DEVICES` once). After loading, `verify_placement` finds each tensor's residence:

- on a GPU or the CPU (not offloaded): its own device;
- offloaded (accelerate keeps it on `meta` behind an `AlignDevicesHook` with `offload=True`): "cpu"
  when the hook's weights map holds it in RAM, "disk" when its offload index points to a file.

Buffers of offloaded modules live on the execution device (accelerate offloads parameters only);
that is accepted, and their bytes are counted where they are. Devices are logical keys: `cuda:N`
indices as ints, "cpu", "disk".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from glmdeploy.hardware.gpu_select import GpuAssignment, to_logical
from glmdeploy.hardware.nvml import uuid_key
from glmdeploy.planning.types import DeviceKey, Plan, device_label
from glmdeploy.problems import HardwareError, LoadError, Problem

_REPORT = "this is a bug in glmdeploy or transformers/accelerate: please report it"
_PLAN_AGAIN = "the plan was made for another model, or misnames a module: plan again"


@dataclass(frozen=True)
class DeviceBytes:
    """Weight bytes on one device: what the plan predicted and what the loaded model holds.

    `device` is the logical key this process uses (`cuda:<device>` for an int), `plan_device` the
    plan's key (physical GPU id, "cpu" or "disk").
    """

    device: int | str
    plan_device: DeviceKey
    predicted_bytes: int
    actual_bytes: int

    @property
    def label(self) -> str:
        return device_label(self.plan_device, self.device if isinstance(self.device, int) else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.label,
            "plan_device": self.plan_device,
            "predicted_bytes": self.predicted_bytes,
            "actual_bytes": self.actual_bytes,
        }


def input_device(model: Any) -> torch.device:
    """Where inputs go: the execution device of the input embedding."""
    embedding = model.get_input_embeddings()
    hook = _align_hook(embedding)
    if hook is not None and hook.execution_device is not None:
        return torch.device(_text(hook.execution_device))
    weight = embedding.weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def check_visible_gpus(assignment: GpuAssignment) -> None:
    """Raise HardwareError unless `cuda:N` is the assignment's N-th GPU (by UUID) for every N."""
    if not torch.cuda.is_available():
        message = "the plan uses GPUs but CUDA is not available"
        raise HardwareError([Problem("gpus", message, hint="run `glmdeploy doctor`, or gpus=cpu")])
    count = torch.cuda.device_count()
    for device in assignment.devices:
        seen = None
        if device.logical_id < count:
            seen = str(torch.cuda.get_device_properties(device.logical_id).uuid)
        same = seen is not None and uuid_key(seen) == uuid_key(device.uuid)
        if assignment.source == "nvml" and not same:
            message = f"cuda:{device.logical_id} is not GPU {device.physical_id} ({device.uuid})"
            hint = "CUDA initialised before glmdeploy set CUDA_VISIBLE_DEVICES: use a fresh process"
            raise HardwareError([Problem("CUDA_VISIBLE_DEVICES", message, hint=hint)])


def verify_placement(model: Any, device_map: Mapping[str, int | str]) -> dict[int | str, int]:
    """Actual weight bytes per logical device; raises LoadError listing every misplaced module.

    Tensors no map entry covers are reported under their block (`model.layers.3`) or module: the
    plan was made for another model or misnames a module (transformers does not check one-device
    maps).
    """
    gpus = sorted(d for d in device_map.values() if isinstance(d, int))
    execution: set[int | str] = set(gpus) if gpus else {"cpu"}
    misplaced: dict[tuple[str, str, str], list[str]] = {}
    actual: dict[int | str, int] = {}
    for name, where, nbytes, is_buffer in _residences(model):
        actual[where] = actual.get(where, 0) + nbytes
        unit = _unit_of(name, device_map)
        if unit is None:
            key = (_block_of(name), "not in the plan's device map", _PLAN_AGAIN)
            misplaced.setdefault(key, []).append(name)
            continue
        planned = device_map[unit]
        offloaded = planned in ("cpu", "disk") and planned not in execution
        if where != planned and not (is_buffer and offloaded and where in execution):
            found = "not loaded (meta)" if where == "meta" else _text(where)
            key = (unit, f"planned on {_text(planned)}, found {found}", _REPORT)
            misplaced.setdefault(key, []).append(name)
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map is not None and dict(hf_map) != dict(device_map):
        misplaced[("hf_device_map", "differs from the map checked", _REPORT)] = [str(hf_map)]
    if misplaced:
        problems = [
            Problem(unit, f"{what}: {_few(names)}", hint=hint)
            for (unit, what, hint), names in sorted(misplaced.items())
        ]
        raise LoadError(problems, "the model did not load as planned")
    return actual


def _block_of(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `model.layers.3`; `lm_head.weight` -> `lm_head`."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def device_bytes(
    plan: Plan, assignment: GpuAssignment, actual: Mapping[int | str, int]
) -> tuple[DeviceBytes, ...]:
    """The plan's predicted weight bytes beside `actual` (from `verify_placement`), per device."""
    rows: list[DeviceBytes] = []
    for row in plan.rows:
        key = to_logical(assignment, row.device) if isinstance(row.device, int) else row.device
        rows.append(DeviceBytes(key, row.device, row.weights_bytes, actual.get(key, 0)))
    listed = {r.device for r in rows}
    for key, nbytes in sorted(actual.items(), key=lambda kv: str(kv[0])):
        if key not in listed:  # a device the plan has no row for
            physical = assignment.devices[key].physical_id if isinstance(key, int) else key
            rows.append(DeviceBytes(key, physical, 0, nbytes))
    return tuple(rows)


def _residences(model: Any) -> list[tuple[str, int | str, int, bool]]:
    """(tensor name, device key, bytes, is buffer) for each distinct parameter and buffer."""
    out: list[tuple[str, int | str, int, bool]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        hook = _align_hook(module)
        direct = [(n, t, False) for n, t in module._parameters.items()]
        direct += [(n, t, True) for n, t in module._buffers.items()]
        for local, tensor, is_buffer in direct:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = f"{module_name}.{local}" if module_name else local
            where: int | str = _device_key(tensor.device)
            if where == "meta" and hook is not None and hook.weights_map is not None:
                where = _offloaded_to(hook.weights_map, local)
            out.append((name, where, _nbytes(tensor), is_buffer))
    return out


def _offloaded_to(weights_map: Any, local: str) -> str:
    """Where an offloaded tensor lives: cpu (the weights map holds it), disk (indexed) or meta."""
    loader, key = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "")
    key += local
    if key in (getattr(loader, "state_dict", None) or {}):
        return "cpu"
    return "disk" if key in (getattr(loader, "index", None) or {}) else "meta"


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor (meta ones too), with bitsandbytes' scales when quantised."""
    total = int(tensor.nbytes)
    for extra in (getattr(tensor, "SCB", None), getattr(getattr(tensor, "quant_state", None),
                                                        "absmax", None)):  # fmt: skip
        if isinstance(extra, torch.Tensor):
            total += int(extra.nbytes)
    return total


def _align_hook(module: Any) -> Any:
    """The module's accelerate `AlignDevicesHook` (inside a `SequentialHook` too), or None."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", ())]:
        if candidate is not None and hasattr(candidate, "execution_device"):
            return candidate
    return None


def _unit_of(name: str, device_map: Mapping[str, int | str]) -> str | None:
    """The longest map key that is `name` or a dotted prefix of it ("" matches everything)."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return key
    return None


def _device_key(device: torch.device) -> int | str:
    if device.type == "cuda":
        return int(device.index or 0)
    return str(device.type)


def _text(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
