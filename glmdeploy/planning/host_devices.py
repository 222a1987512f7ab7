"""The off-GPU devices a plan may use: CPU RAM and disk, with what this machine can give them.

`offload_devices` gives the specs `placement.offload` allows (the CPU always when there is no GPU):
cpu with 90 % of the RAM available now, disk with the free space of the offload folder. The fit
advice asks for the same specs (`offload_spec`) when it tries an offload the deployment did not
allow, so that "offload=cpu fits" is said only where the plan with offload=cpu fits. Nothing here
imports torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from glmdeploy.config.settings import Deployment
from glmdeploy.planning.types import DeviceSpec

RAM_SHARE = 0.9  # of the RAM available now: the default CPU budget (placement.cpu_memory_gib: set)


def offload_devices(
    deployment: Deployment, *, has_gpus: bool, run_dir: Path | None = None
) -> list[DeviceSpec]:
    """cpu (RAM the plan may use) and disk (free space) specs, as `placement.offload` allows.

    Without GPUs the CPU runs the model, so it is always offered then.
    """
    keys = list(deployment.placement.offload.devices)
    if not has_gpus and "cpu" not in keys:
        keys.insert(0, "cpu")
    return [offload_spec(deployment, key, run_dir=run_dir) for key in keys]


def offload_spec(deployment: Deployment, key: str, *, run_dir: Path | None = None) -> DeviceSpec:
    """The spec of off-GPU device `key` (`cpu` or `disk`) on this machine."""
    if key == "cpu":
        return DeviceSpec("cpu", None, "CPU RAM", _ram_bytes())
    folder = Path(deployment.placement.offload_folder or run_dir or Path.cwd())
    return DeviceSpec("disk", None, f"disk ({folder})", _free_disk(folder))


def _ram_bytes() -> int:
    """RAM_SHARE of the RAM available now (the default CPU budget)."""
    import psutil

    return int(psutil.virtual_memory().available * RAM_SHARE)


def _free_disk(folder: Path) -> int:
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    return shutil.disk_usage(probe_dir).free
