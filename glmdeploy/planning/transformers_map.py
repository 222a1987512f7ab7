"""transformers' own `device_map="auto"` for the same model and budgets, as a unit -> device map.

For comparison only (`placement.strategy=transformers`, `benchmarks/placement.py`): it calls the
function `from_pretrained(device_map="auto", max_memory=…)` calls, transformers'
`integrations.accelerate._get_device_map` (its copy of `get_balanced_memory` followed by
`infer_auto_device_map`), on a meta-device model. No CUDA call initialises a device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from glmdeploy.config.settings import Dtype, ModelSpec, Quantization
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.planning.memory import MemoryModel
from glmdeploy.planning.types import DeviceKey, DeviceSpec

_TORCH_DTYPES = {Dtype.BF16: "bfloat16", Dtype.FP16: "float16", Dtype.FP32: "float32"}


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence 'Device 0 is not available' and similar warnings on machines without those GPUs."""
    loggers = [logging.getLogger(n) for n in ("accelerate", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def transformers_device_map(
    model: Any, max_memory: Mapping[DeviceKey, int]
) -> dict[str, DeviceKey]:
    """transformers' raw `device_map="auto"` for a meta-device `model` under `max_memory` (bytes).

    GPU keys are ints; transformers visits them in increasing id order and appends "disk" for
    whatever does not fit.
    """
    from transformers.integrations.accelerate import _get_device_map

    with _quiet():
        return dict(_get_device_map(model, "auto", dict(max_memory), None))


def unit_assignment(anatomy: Anatomy, raw: Mapping[str, DeviceKey]) -> dict[str, DeviceKey]:
    """Translate a transformers map (any granularity) to one device per unit.

    A unit takes the device of the nearest key that is itself or an ancestor ("" or "model" when
    transformers put everything on one device); if transformers split it, the device of its first
    key.
    """
    out: dict[str, DeviceKey] = {}
    for unit in anatomy.units:
        parts = unit.name.split(".")
        ancestors = ["", *(".".join(parts[:k]) for k in range(1, len(parts) + 1))]
        found = [raw[a] for a in ancestors if a in raw]
        if found:
            out[unit.name] = found[-1]
            continue
        inside = [d for k, d in raw.items() if k.startswith(unit.name + ".")]
        if inside:
            out[unit.name] = inside[0]
    return out


def max_memory(
    gpus: Sequence[DeviceSpec],
    offload_devices: Sequence[DeviceSpec],
    capacities: Mapping[DeviceKey, int],
    memory: MemoryModel,
) -> dict[DeviceKey, int]:
    """`max_memory` for transformers: each GPU's budget (capacity − reserve), cpu when allowed."""
    budgets: dict[DeviceKey, int] = {
        g.key: max(0, capacities[g.key] - memory.reserve) for g in gpus
    }
    if any(d.key == "cpu" for d in offload_devices):
        budgets["cpu"] = capacities.get("cpu") or 2**62  # 0: unlimited
    return budgets


def transformers_assignment(
    anatomy: Anatomy, model: ModelSpec, memory: MemoryModel, budgets: Mapping[DeviceKey, int]
) -> tuple[dict[str, DeviceKey], list[str]]:
    """transformers' unit map for `model` (whose anatomy is `anatomy`) in `memory.dtype` under
    `budgets`, with notes. The live config is rebuilt when the anatomy came from the cache."""
    from glmdeploy.model.hf_config import hf_config_for
    from glmdeploy.model.skeleton import meta_model

    config = anatomy.hf_config if anatomy.hf_config is not None else hf_config_for(model)
    meta = meta_model(config, _TORCH_DTYPES[memory.dtype])
    assignment = unit_assignment(anatomy, transformers_device_map(meta, budgets))
    notes = [
        "transformers: its own device_map='auto' for max_memory = each GPU's budget (weights "
        "only, GPUs in id order), measured with glmdeploy's memory model"
    ]
    if memory.quantization is not Quantization.NONE:
        notes.append("transformers: sized without quantisation (no quantizer on the meta model)")
    return assignment, notes
