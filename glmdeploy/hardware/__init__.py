"""The machine: GPUs through NVML, GPU selection, precision resolution, environment and doctor."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.hardware.doctor import collect_report
    from glmdeploy.hardware.environment import environment_facts
    from glmdeploy.hardware.gpu_select import GpuAssignment, select_gpus
    from glmdeploy.hardware.nvml import HardwareSnapshot, declared_snapshot, probe
    from glmdeploy.hardware.precision import ResolvedPrecision, resolve_precision

__all__ = [
    "GpuAssignment",
    "HardwareSnapshot",
    "ResolvedPrecision",
    "collect_report",
    "declared_snapshot",
    "environment_facts",
    "probe",
    "resolve_precision",
    "select_gpus",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "GpuAssignment": "gpu_select",
        "HardwareSnapshot": "nvml",
        "ResolvedPrecision": "precision",
        "collect_report": "doctor",
        "declared_snapshot": "nvml",
        "environment_facts": "environment",
        "probe": "nvml",
        "resolve_precision": "precision",
        "select_gpus": "gpu_select",
    },
)
