"""Compare a recorded run's environment and checkpoint with now, before the run is replayed.

Both sides are flattened into labelled facts (`torch` → `2.13.0`, `GPU 0` → `RTX 4090 (24.0 GiB)`,
`CUDA_VISIBLE_DEVICES` → `(unset)`, …); every label whose value differs becomes one sentence,
`torch 2.13.0 → 2.14.1`, in the order the record lists them. Facts that change from run to run
(free memory, processes) are not compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glmdeploy.config.settings import GIB
from glmdeploy.records.record import RunRecord

ABSENT = "absent"


def differences(
    record: RunRecord, current_env: Mapping[str, Any], current_checkpoint: Mapping[str, Any] | None
) -> list[str]:
    """Every difference in versions, GPUs, environment variables and checkpoint, as sentences.

    Args:
        record: the recorded run.
        current_env: `record.environment_facts()` of this process, now.
        current_checkpoint: `record.checkpoint_facts(model)` now (None: no weights).
    """
    before = {**environment_labels(record.environment), **checkpoint_labels(record.checkpoint)}
    now = {**environment_labels(current_env), **checkpoint_labels(current_checkpoint)}
    return [
        f"{label} {before.get(label, ABSENT)} → {now.get(label, ABSENT)}"
        for label in [*before, *(k for k in now if k not in before)]
        if before.get(label, ABSENT) != now.get(label, ABSENT)
    ]


def environment_labels(env: Mapping[str, Any]) -> dict[str, str]:
    """The comparable facts of `environment_facts()`, by the label a sentence starts with."""
    facts: dict[str, str] = {
        "python": str(env.get("python", ABSENT)),
        "platform": str(env.get("platform", ABSENT)),
    }
    facts.update({str(k): str(v) for k, v in (env.get("packages") or {}).items()})
    facts["torch CUDA build"] = str(env.get("torch_cuda") or "none")
    facts["NVIDIA driver"] = str(env.get("nvidia_driver") or "none")
    facts["driver CUDA version"] = str(env.get("cuda_driver") or "none")
    gpus = list(env.get("gpus") or [])
    facts["GPU count"] = str(len(gpus))
    for gpu in gpus:
        label = f"GPU {gpu.get('physical_id', '?')}"
        memory = f"{int(gpu.get('total_bytes', 0)) / GIB:.1f} GiB"
        facts[label] = f"{gpu.get('name', '?')} ({memory})"
        capability = gpu.get("compute_capability")
        if capability:
            facts[f"{label} compute capability"] = ".".join(map(str, capability))
        facts[f"{label} uuid"] = str(gpu.get("uuid", "?"))
    for name, value in (env.get("env") or {}).items():
        facts[str(name)] = "(unset)" if value is None else repr(str(value))
    return facts


def checkpoint_labels(checkpoint: Mapping[str, Any] | None) -> dict[str, str]:
    """The comparable facts of `checkpoint_facts()`: where the weights are, their fingerprint."""
    if checkpoint is None:
        return {"checkpoint": "none (no weights)"}
    kind = checkpoint.get("kind", "?")
    where = {
        "local": f"local {checkpoint.get('path')} ({checkpoint.get('layout', 'native')} layout)",
        "hub": f"hub {checkpoint.get('hub_id')}@{checkpoint.get('revision') or 'main'}",
        "embedded": f"embedded (seed {checkpoint.get('seed')})",
    }.get(kind, str(kind))
    fingerprint = checkpoint.get("fingerprint")
    if fingerprint:
        shown = f"{str(fingerprint)[:12]}…"
    elif checkpoint.get("fingerprint_error"):
        shown = f"unreadable ({checkpoint['fingerprint_error']})"
    else:
        shown = "none"
    return {"checkpoint": where, "checkpoint fingerprint": shown}
