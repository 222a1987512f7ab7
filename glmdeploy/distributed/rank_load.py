"""Load one rank's share with transformers' `DistributedConfig`, and check it against the plan.

Each rank calls `from_pretrained(…, distributed_config=DistributedConfig(tp_size, pp_size))`
inside the process group the worker created; transformers reads only the rank's slice of every
split tensor and replaces the layers of other pipeline stages. `check_shards` then compares every
local tensor (a DTensor's local shard) with the shape and bytes the plan gave this rank.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from glmdeploy.config.settings import CheckpointLayout, Deployment
from glmdeploy.distributed.spec import LaunchSpec
from glmdeploy.hardware.precision import GpuCapability, ResolvedPrecision, resolve_precision
from glmdeploy.loading.loader import LoadedModel, _load_tokenizer, quiet_transformers
from glmdeploy.loading.verify import DeviceBytes, _nbytes
from glmdeploy.planning.types import Plan
from glmdeploy.problems import ConfigError, DoesNotFitError, LoadError, Problem

Shards = Mapping[str, tuple[tuple[int, ...], int]]


def load_rank(
    spec: LaunchSpec, deployment: Deployment, plan: Plan, rank: int, device: torch.device
) -> tuple[LoadedModel, list[Problem]]:
    """This rank's model and the differences between its shards and the plan (empty: exact).

    Raises:
        ConfigError: the plan was made for another precision.
        LoadError, DoesNotFitError: transformers cannot load the checkpoint here.
    """
    gpus = tuple(GpuCapability(g.physical_id, g.name, g.compute_capability) for g in spec.gpus)
    model_type = deployment.model.architecture.model_type if deployment.model.architecture else ""
    precision = resolve_precision(deployment.precision, gpus, model_type=model_type)
    mismatches = precision.mismatches(plan.fingerprint.dtype, plan.fingerprint.quantization)
    if mismatches:
        raise ConfigError(mismatches)
    started = time.perf_counter()
    with quiet_transformers():
        model = _from_pretrained(spec, deployment, precision)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    actual = local_shards(model)
    problems = check_shards(actual, spec.expected[rank], rank)
    row = plan.rows[rank]
    key: int | str = (device.index or 0) if device.type == "cuda" else "cpu"
    nbytes = sum(b for _, b in actual.values())
    label = rank_label(rank, row.device, key)
    bytes_row = DeviceBytes(key, label, row.weights_bytes, nbytes)
    tokenizer, note = _load_tokenizer(deployment.model.source, spec.checkpoint)
    loaded = LoadedModel(
        model,
        tokenizer,
        precision.torch_dtype(),
        precision,
        spec.checkpoint,
        {"": key},
        (bytes_row,),
        0.0,
        load_seconds,
        time.perf_counter() - started,
        device,
        warnings=(*precision.warnings, *spec.checkpoint_warnings, *note),
    )
    return loaded, problems


def rank_label(rank: int, plan_device: int | str, local: int | str) -> str:
    """`rank 1 · GPU 3 → cuda:1`, `rank 0 · cpu`: how results name a rank and its device."""
    from glmdeploy.planning.types import device_label

    logical = local if isinstance(plan_device, int) and isinstance(local, int) else None
    return f"rank {rank} · {device_label(plan_device, logical)}"


def _from_pretrained(spec: LaunchSpec, deployment: Deployment, precision: ResolvedPrecision) -> Any:
    from transformers import AutoModelForCausalLM, DistributedConfig

    p, source = deployment.parallel, deployment.model.source
    kwargs: dict[str, Any] = {
        "dtype": precision.torch_dtype(),
        "distributed_config": DistributedConfig(tp_size=p.tp_size, pp_size=p.pp_size),
        "weights_only": True,
        "output_loading_info": True,
        "trust_remote_code": source.trust_remote_code and source.layout is CheckpointLayout.NATIVE,
    }
    if precision.quantization_config is not None:
        kwargs["quantization_config"] = precision.quantization_config
    location = Path(spec.checkpoint)
    if not location.is_dir():
        kwargs["revision"] = source.revision
    elif any(location.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    auto: Any = AutoModelForCausalLM  # untyped upstream
    try:
        model, info = auto.from_pretrained(spec.checkpoint, **kwargs)
    except torch.OutOfMemoryError as exc:
        hint = "more ranks (parallel.tp_size), or raise placement.reserve_gib"
        raise DoesNotFitError([Problem("parallel", f"out of memory: {exc}", hint=hint)]) from exc
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        message = f"transformers cannot load it: {type(exc).__name__}: {exc}".splitlines()[0]
        raise LoadError([Problem(spec.checkpoint, message)]) from exc
    troubles = {
        "missing_keys": "missing",
        "unexpected_keys": "unexpected",
        "mismatched_keys": "of the wrong shape",
    }
    problems = [
        Problem(spec.checkpoint, f"tensors {what}: {', '.join(sorted(map(str, info[key]))[:4])}")
        for key, what in troubles.items()
        if info.get(key)
    ]
    if problems:
        raise LoadError(problems)
    return model


def local_shards(model: Any) -> dict[str, tuple[tuple[int, ...], int]]:
    """Every distinct parameter (its local shard, for a DTensor) and buffer: shape and bytes."""
    from torch.distributed.tensor import DTensor

    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        out[name] = (tuple(local.shape), _nbytes(local))
    for name, buffer in model.named_buffers():
        out[name] = (tuple(buffer.shape), _nbytes(buffer))
    return out


def check_shards(actual: Shards, expected: Shards, rank: int) -> list[Problem]:
    """Each tensor whose shape or bytes on this rank differ from the plan, and any extra/missing."""
    problems = []
    for name in sorted(set(actual) | set(expected)):
        want, got = expected.get(name), actual.get(name)
        if want == got:
            continue
        if got is None:
            message = f"{name}: planned {list(want[0]) if want else '?'}, not loaded on this rank"
        elif want is None:
            message = f"{name}: loaded {list(got[0])} ({got[1]} bytes), not in this rank's plan"
        else:
            message = (
                f"{name}: planned {list(want[0])} ({want[1]} bytes), "
                f"loaded {list(got[0])} ({got[1]} bytes)"
            )
        problems.append(
            Problem(
                f"rank {rank}",
                message,
                hint="a bug in glmdeploy's shard "
                "arithmetic or a transformers change: please report it",
            )
        )
    return problems
