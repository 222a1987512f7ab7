"""The doctor report: truthful on this machine, and its findings on a faked GPU machine."""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest

from glmdeploy.config.settings import (
    GIB,
    Architecture,
    Deployment,
    GpuMode,
    GpuSelection,
    ModelSource,
    SourceKind,
)
from glmdeploy.hardware.doctor import (
    TorchCuda,
    collect_report,
    describe_cuda,
    diagnose,
    render_report,
)
from glmdeploy.hardware.nvml import GpuInfo, GpuProcess, HardwareSnapshot, NvmlError

from builders import make_deployment

CPU_BUILD = TorchCuda(installed=True, build=None, available=False, device_count=0)
CUDA_BUILD_NO_GPU = TorchCuda(installed=True, build="12.4", available=False, device_count=0)
WORKING = TorchCuda(installed=True, build="12.4", available=True, device_count=2)


class TwoGpuNvml:
    """A fake NVML: a V100 with another process holding memory, and an idle L40S."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...

    def driver_version(self) -> str:
        return "550.54.15"

    def cuda_driver_version(self) -> int:
        return 12040

    def device_count(self) -> int:
        return 2

    def name(self, index: int) -> str:
        return ["Tesla V100-SXM2-32GB", "NVIDIA L40S"][index]

    def uuid(self, index: int) -> str:
        return f"GPU-{index}abc"

    def memory(self, index: int) -> tuple[int, int, int]:
        total, used = [(32 * GIB, 6 * GIB), (48 * GIB, 0)][index]
        return total, used, total - used

    def compute_capability(self, index: int) -> tuple[int, int]:
        return [(7, 0), (8, 9)][index]

    def processes(self, index: int) -> list[tuple[int, int | None]]:
        held: list[list[tuple[int, int | None]]] = [[(4242, 6 * GIB), (os.getpid(), 0)], []]
        return held[index]

    def process_name(self, pid: int) -> str:
        if pid != 4242:
            raise NvmlError("Not Found")
        return "python"


def snapshot(gpus: tuple[GpuInfo, ...] = (), error: str | None = None) -> HardwareSnapshot:
    source = "none" if error else "nvml"
    cuda = None if error else "12.4"
    return HardwareSnapshot(gpus, None if error else "550.54.15", cuda, error, source)  # type: ignore[arg-type]


def deployment(gpus: GpuSelection) -> Deployment:
    arch = Architecture("glm", 64, 16, 32, 2, 2, 1, 8, 128)
    source = ModelSource(SourceKind.EMBEDDED)
    return make_deployment(
        "auto", architecture=arch, source=source, gpus=gpus, max_context_tokens=256
    )


def test_doctor_is_truthful_on_this_machine() -> None:
    torch = pytest.importorskip("torch")
    report = collect_report()
    text = render_report(report)
    assert report.packages["torch"] == importlib.metadata.version("torch")
    assert report.torch_cuda.build == torch.version.cuda
    assert report.torch_cuda.available == torch.cuda.is_available()
    if torch.version.cuda is None:
        assert report.cuda == "not available (torch built without CUDA)"
        assert "- CUDA: not available (torch built without CUDA)" in text
    if report.hardware.source == "none":  # no NVIDIA driver here
        assert report.hardware.gpus == () and report.hardware.nvml_error
        assert f"(NVML: {report.hardware.nvml_error})" in text
        assert "- GPUs (none): none" in text
        assert any(f.startswith("NVML unavailable (") for f in report.findings)
    assert json.loads(report.to_json())["cuda"] == report.cuda
    assert report.fit is None


def test_missing_packages_say_not_installed() -> None:
    report = collect_report(nvml=TwoGpuNvml(), environ={}, torch_cuda=CPU_BUILD)
    for name, version in report.packages.items():
        try:
            assert version == importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            assert version == "not installed"


def test_report_on_a_faked_gpu_machine() -> None:
    environ = {"HF_HOME": "/data/hf", "NCCL_DEBUG": "INFO", "UNRELATED": "1"}
    report = collect_report(nvml=TwoGpuNvml(), environ=environ, torch_cuda=CPU_BUILD)
    assert report.hardware.ids == (0, 1)
    assert report.environment["HF_HOME"] == "/data/hf"
    assert report.environment["NCCL_DEBUG"] == "INFO"
    assert report.environment["CUDA_VISIBLE_DEVICES"] is None
    assert "UNRELATED" not in report.environment
    findings = "\n".join(report.findings)
    assert "torch is a CPU-only build but 2 GPU(s) are present" in findings
    assert "CUDA_DEVICE_ORDER is not PCI_BUS_ID" in findings
    assert "GPU 0: 1 other process(es) hold 6.0 GiB (4242 python)" in findings
    assert "no bf16 on GPU 0 (Tesla V100-SXM2-32GB, cc 7.0)" in findings
    assert "GPU 1:" not in findings  # idle
    text = render_report(report)
    assert "- NVIDIA driver: 550.54.15 (CUDA 12.4)" in text
    assert "  0: Tesla V100-SXM2-32GB  32.0 GiB total, 6.0 GiB used, 26.0 GiB free  cc 7.0" in text
    assert "bf16 no" in text and "bf16 yes" in text
    assert "     pid 4242 python: 6.0 GiB" in text
    assert "    CUDA_VISIBLE_DEVICES=(unset)" in text
    assert "    NCCL_DEBUG=INFO" in text
    json.loads(report.to_json())


def test_report_shows_the_deployment_selection_or_why_it_fails() -> None:
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    good = deployment(GpuSelection(GpuMode.IDS, ids=(1,)))
    report = collect_report(good, nvml=TwoGpuNvml(), environ=env, torch_cuda=WORKING)
    assert report.selection is not None and report.selection.physical_ids == (1,)
    assert "- selection (ids): GPU 1 -> cuda:0" in render_report(report)
    bad = deployment(GpuSelection(GpuMode.IDS, ids=(5,)))
    report = collect_report(bad, nvml=TwoGpuNvml(), environ=env, torch_cuda=WORKING)
    assert report.selection is None
    assert "config: gpus.ids: GPU 5 is not on this machine" in report.findings


def test_visible_devices_findings() -> None:
    gpus = collect_report(nvml=TwoGpuNvml(), environ={}, torch_cuda=WORKING).hardware
    ok = diagnose(WORKING, gpus, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert "CUDA_VISIBLE_DEVICES restricts glmdeploy to GPUs: 1" in ok
    bad = diagnose(WORKING, gpus, {"CUDA_VISIBLE_DEVICES": "7"})
    assert any(f.startswith("CUDA_VISIBLE_DEVICES: GPU 7 is not on this machine") for f in bad)


def test_fit_is_left_for_the_planner_and_rendered_when_set() -> None:
    report = collect_report(nvml=TwoGpuNvml(), environ={}, torch_cuda=WORKING)
    assert report.fit is None and "- fit:" not in render_report(report)
    from dataclasses import replace

    assert "- fit: fits: 14.2 GiB on GPU 1" in render_report(
        replace(report, fit="fits: 14.2 GiB on GPU 1")
    )


V100 = GpuInfo(0, "Tesla V100", "GPU-0", 32 * GIB, 0, 32 * GIB, (7, 0), (GpuProcess(1, "x", None),))


@pytest.mark.parametrize(
    ("facts", "snap", "env", "expected"),
    [
        (
            TorchCuda(False, None, False, 0),
            snapshot(),
            {},
            "not available (torch is not installed)",
        ),
        (CPU_BUILD, snapshot((V100,)), {}, "not available (torch built without CUDA)"),
        (WORKING, snapshot((V100,)), {}, "available (2 device(s); torch built for CUDA 12.4)"),
        (
            CUDA_BUILD_NO_GPU,
            snapshot(error="NVML Shared Library Not Found"),
            {},
            "not available (NVIDIA driver not found: NVML Shared Library Not Found)",
        ),
        (
            CUDA_BUILD_NO_GPU,
            snapshot(error="Driver/library version mismatch"),
            {},
            "not available (NVML failed: Driver/library version mismatch; is the driver loaded?)",
        ),
        (CUDA_BUILD_NO_GPU, snapshot(), {}, "not available (the NVIDIA driver reports no GPU)"),
        (
            CUDA_BUILD_NO_GPU,
            snapshot((V100,)),
            {"CUDA_VISIBLE_DEVICES": ""},
            "not available (CUDA_VISIBLE_DEVICES hides every GPU)",
        ),
        (
            TorchCuda(True, "13.0", False, 0),
            snapshot((V100,)),
            {},
            "not available (driver 550.54.15 supports CUDA 12.4; torch was built for CUDA 13.0)",
        ),
    ],
)
def test_describe_cuda(
    facts: TorchCuda, snap: HardwareSnapshot, env: dict[str, str], expected: str
) -> None:
    assert describe_cuda(facts, snap, env) == expected
