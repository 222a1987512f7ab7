"""The diagnostic report of `glmdeploy doctor`: what this machine offers, and what looks wrong.

`collect_report` gathers facts (versions, CUDA state, GPUs from NVML, environment variables) and
derives short findings; `render_report` makes a plain-text block to paste into a bug report.
The CLI prints `DoctorReport.to_json()` for `--json`. Collecting calls `torch.cuda.is_available()`,
which initialises the CUDA driver in this process (after NVML has been read), so run doctor in its
own process, as the CLI does.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from glmdeploy.config.settings import GIB, Deployment, GpuMode, GpuSelection
from glmdeploy.hardware.environment import package_versions, relevant_environment
from glmdeploy.hardware.gpu_select import GpuAssignment, existing_gpus, select_gpus
from glmdeploy.hardware.nvml import GpuInfo, HardwareSnapshot, Nvml, probe
from glmdeploy.problems import GlmDeployError


@dataclass(frozen=True)
class TorchCuda:
    """What torch says about CUDA."""

    installed: bool
    build: (
        str | None
    )  # torch.version.cuda: the CUDA version torch was built for; None on CPU builds
    available: bool  # torch.cuda.is_available()
    device_count: int  # devices torch sees (0 when CUDA is not available)


@dataclass(frozen=True)
class DoctorReport:
    """Everything `glmdeploy doctor` shows, as data (JSON-able through `to_dict`)."""

    python: str
    platform: str
    packages: dict[str, str]  # distribution name -> version, or "not installed"
    torch_cuda: TorchCuda
    cuda: str  # one line: "available (…)" or "not available (reason)"
    hardware: HardwareSnapshot
    environment: dict[str, str | None]  # ENV_VARS (None: unset) and every NCCL_* that is set
    selection: GpuAssignment | None  # the GPUs the deployment would use, if one was given
    findings: tuple[str, ...]
    fit: str | None = None  # does the deployment fit these GPUs? (filled in by the planner)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def collect_report(
    deployment: Deployment | None = None,
    *,
    nvml: Nvml | None = None,
    environ: Mapping[str, str] | None = None,
    torch_cuda: TorchCuda | None = None,
) -> DoctorReport:
    """Gather the report. `nvml`, `environ` and `torch_cuda` replace the real ones in tests."""
    env = os.environ if environ is None else environ
    snapshot = probe(nvml)  # before torch touches CUDA
    facts = torch_cuda if torch_cuda is not None else read_torch_cuda()
    selection, findings = None, []
    if deployment is not None:
        try:  # among the GPUs the deployment says exist: a declared fleet, else these
            selection = select_gpus(
                deployment.gpus, existing_gpus(deployment.gpus, lambda: snapshot), env
            )
        except GlmDeployError as exc:
            findings += [f"config: {p.path}: {p.message}" for p in exc.problems]
    return DoctorReport(
        python=f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}",
        platform=platform.platform(),
        packages=package_versions(),
        torch_cuda=facts,
        cuda=describe_cuda(facts, snapshot, env),
        hardware=snapshot,
        environment=relevant_environment(env),
        selection=selection,
        findings=tuple(diagnose(facts, snapshot, env) + findings),
    )


def read_torch_cuda() -> TorchCuda:
    """Ask torch about CUDA (imports torch; `is_available()` initialises the CUDA driver)."""
    try:
        import torch
    except ImportError:
        return TorchCuda(installed=False, build=None, available=False, device_count=0)
    available = bool(torch.cuda.is_available())
    count = int(torch.cuda.device_count()) if available else 0
    return TorchCuda(True, torch.version.cuda, available, count)


def describe_cuda(facts: TorchCuda, snapshot: HardwareSnapshot, env: Mapping[str, str]) -> str:
    """One plain line on whether CUDA works for torch here, and if not, the likeliest reason."""
    if not facts.installed:
        return "not available (torch is not installed)"
    if facts.build is None:
        return "not available (torch built without CUDA)"
    if facts.available:
        return f"available ({facts.device_count} device(s); torch built for CUDA {facts.build})"
    if snapshot.source == "none" and "not found" in (snapshot.nvml_error or "").lower():
        return f"not available (NVIDIA driver not found: {snapshot.nvml_error})"
    if snapshot.source == "none":
        return f"not available (NVML failed: {snapshot.nvml_error}; is the driver loaded?)"
    if not snapshot.gpus:
        return "not available (the NVIDIA driver reports no GPU)"
    if env.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return "not available (CUDA_VISIBLE_DEVICES hides every GPU)"
    if snapshot.cuda_driver_version and _major(snapshot.cuda_driver_version) < _major(facts.build):
        return (
            f"not available (driver {snapshot.driver_version} supports CUDA "
            f"{snapshot.cuda_driver_version}; torch was built for CUDA {facts.build})"
        )
    return "not available (reason unknown: run `python -c 'import torch; torch.cuda.init()'`)"


def diagnose(facts: TorchCuda, snapshot: HardwareSnapshot, env: Mapping[str, str]) -> list[str]:
    """Short warnings and advice about this machine, most important first."""
    found: list[str] = []
    gpus = snapshot.gpus
    if snapshot.source == "none":
        found.append(
            f"NVML unavailable ({snapshot.nvml_error}): glmdeploy sees no GPU here; "
            "a declared fleet (gpus=2x24gib, or gpus.declared=[…]) still plans without GPUs"
        )
    if gpus and facts.installed and facts.build is None:
        found.append(
            f"torch is a CPU-only build but {len(gpus)} GPU(s) are present: install a CUDA build "
            "of torch"
        )
    if facts.available and "CUDA_VISIBLE_DEVICES" not in env and facts.device_count != len(gpus):
        found.append(f"torch sees {facts.device_count} GPU(s) but NVML reports {len(gpus)}")
    if len(gpus) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        found.append(
            "CUDA_DEVICE_ORDER is not PCI_BUS_ID: outside glmdeploy, cuda:N may not be "
            "nvidia-smi's GPU N (glmdeploy sets PCI_BUS_ID for its own runs)"
        )
    if "CUDA_VISIBLE_DEVICES" in env:
        try:
            allowed = select_gpus(GpuSelection(GpuMode.AUTO), snapshot, env).physical_ids
            shown = ", ".join(map(str, allowed)) or "none"
            found.append(f"CUDA_VISIBLE_DEVICES restricts glmdeploy to GPUs: {shown}")
        except GlmDeployError as exc:
            found += [f"{p.path}: {p.message}" for p in exc.problems]
    for gpu in gpus:
        others = [p for p in gpu.processes if p.pid != os.getpid()]
        if others:
            held = sum(p.used_bytes or 0 for p in others)
            names = ", ".join(f"{p.pid} {p.name}" for p in others)
            found.append(
                f"GPU {gpu.physical_id}: {len(others)} other process(es) hold "
                f"{_gib(held)} ({names}); gpus=least_used avoids busy GPUs"
            )
    no_bf16 = [g for g in gpus if not g.supports_bf16]
    if no_bf16:
        which = ", ".join(f"{g.physical_id} ({g.name}, cc {_cc(g)})" for g in no_bf16)
        found.append(
            f"no bf16 on GPU {which}: bf16 needs compute capability 8.0; use precision.dtype=fp16 "
            "(GLM-4-0414 models are unstable in fp16) or fp32"
        )
    return found


def render_report(report: DoctorReport) -> str:
    """The report as a plain-text block for a terminal or a bug report."""
    snap = report.hardware
    lines = [
        "glmdeploy doctor",
        f"- python: {report.python}",
        f"- platform: {report.platform}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in report.packages.items()),
        f"- torch CUDA build: {report.torch_cuda.build or 'none'}",
        f"- CUDA: {report.cuda}",
        f"- NVIDIA driver: {snap.driver_version or 'not found'}"
        + (f" (CUDA {snap.cuda_driver_version})" if snap.cuda_driver_version else "")
        + (f" (NVML: {snap.nvml_error})" if snap.nvml_error else ""),
        f"- GPUs ({snap.source}): {len(snap.gpus) or 'none'}",
    ]
    for gpu in snap.gpus:
        lines.append(
            f"  {gpu.physical_id}: {gpu.name}  {_gib(gpu.total_bytes)} total, "
            f"{_gib(gpu.used_bytes)} used, {_gib(gpu.free_bytes)} free  cc {_cc(gpu)}  "
            f"bf16 {'yes' if gpu.supports_bf16 else 'no'}  {gpu.uuid}"
        )
        for proc in gpu.processes:
            used = _gib(proc.used_bytes) if proc.used_bytes is not None else "? GiB"
            lines.append(f"     pid {proc.pid} {proc.name}: {used}")
    if report.selection is not None:
        selection = report.selection
        pairs = [f"GPU {d.physical_id} -> cuda:{d.logical_id}" for d in selection.devices]
        kind = f"{selection.mode}, declared fleet" if selection.declared else str(selection.mode)
        lines.append(f"- selection ({kind}): {', '.join(pairs) or 'no GPU'}")
    lines.append("- environment:")
    lines += [f"    {k}={'(unset)' if v is None else v}" for k, v in report.environment.items()]
    lines.append("- findings:" + ("" if report.findings else " none"))
    lines += [f"  * {finding}" for finding in report.findings]
    if report.fit is not None:
        lines.append(f"- fit: {report.fit}")
    return "\n".join(lines)


def _major(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB"


def _cc(gpu: GpuInfo) -> str:
    return "{}.{}".format(*gpu.compute_capability)
