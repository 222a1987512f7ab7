"""GPU facts: NVML snapshots through a fake NVML, the pynvml adapter, declared fleets, no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from glmdeploy.config.settings import GIB, DeclaredGpu
from glmdeploy.hardware.nvml import (
    GpuInfo,
    GpuProcess,
    HardwareSnapshot,
    NvmlError,
    PynvmlBackend,
    declared_snapshot,
    probe,
)


@dataclass
class FakeGpu:
    name: str
    uuid: str
    total_gib: float
    used_gib: float
    cc: tuple[int, int]
    processes: list[tuple[int, int | None]] = field(default_factory=list)


class FakeNvml:
    """A fake `Nvml`: fixed GPUs, and failures on demand (`fail={"memory": "…"}`)."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        fail: dict[str, str] | None = None,
        process_names: dict[int, str] | None = None,
    ) -> None:
        self.gpus = gpus
        self.fail = fail or {}
        self.process_names = process_names or {}
        self.shut_down = False

    def _check(self, what: str, index: int | None = None) -> None:
        message = self.fail.get(what) or self.fail.get(f"{what}:{index}")
        if message:
            raise NvmlError(message)

    def init(self) -> None:
        self._check("init")

    def shutdown(self) -> None:
        self.shut_down = True

    def driver_version(self) -> str:
        self._check("driver_version")
        return "550.54.15"

    def cuda_driver_version(self) -> int:
        self._check("cuda_driver_version")
        return 12040

    def device_count(self) -> int:
        return len(self.gpus)

    def name(self, index: int) -> str:
        return self.gpus[index].name

    def uuid(self, index: int) -> str:
        return self.gpus[index].uuid

    def memory(self, index: int) -> tuple[int, int, int]:
        self._check("memory", index)
        gpu = self.gpus[index]
        total, used = int(gpu.total_gib * GIB), int(gpu.used_gib * GIB)
        return total, used, total - used

    def compute_capability(self, index: int) -> tuple[int, int]:
        return self.gpus[index].cc

    def processes(self, index: int) -> list[tuple[int, int | None]]:
        self._check("processes", index)
        return self.gpus[index].processes

    def process_name(self, pid: int) -> str:
        if pid not in self.process_names:
            raise NvmlError("Not Found")
        return self.process_names[pid]


def four_gpus() -> list[FakeGpu]:
    return [
        FakeGpu("Tesla V100-SXM2-32GB", "GPU-0a0a0a0a-1111", 32, 20, (7, 0), [(4242, 20 * GIB)]),
        FakeGpu("NVIDIA L40S", "GPU-1b1b1b1b-2222", 48, 1, (8, 9), [(777, None)]),
        FakeGpu("Tesla V100-SXM2-32GB", "GPU-2c2c2c2c-3333", 32, 0.5, (7, 0)),
        FakeGpu("NVIDIA L40S", "GPU-3d3d3d3d-4444", 48, 1, (8, 9)),
    ]


def test_probe_reads_every_gpu_in_nvml_order() -> None:
    nvml = FakeNvml(four_gpus(), process_names={4242: "python"})
    snap = probe(nvml)
    assert snap.source == "nvml" and snap.nvml_error is None
    assert (snap.driver_version, snap.cuda_driver_version) == ("550.54.15", "12.4")
    assert snap.ids == (0, 1, 2, 3)
    assert [g.compute_capability for g in snap.gpus] == [(7, 0), (8, 9), (7, 0), (8, 9)]
    gpu0 = snap.gpus[0]
    assert gpu0 == GpuInfo(
        0,
        "Tesla V100-SXM2-32GB",
        "GPU-0a0a0a0a-1111",
        32 * GIB,
        20 * GIB,
        12 * GIB,
        (7, 0),
        (GpuProcess(4242, "python", 20 * GIB),),
    )
    # A process whose name cannot be read, and whose memory the driver does not report.
    assert snap.gpus[1].processes == (GpuProcess(777, "?", None),)
    assert nvml.shut_down
    assert [g.supports_bf16 for g in snap.gpus] == [False, True, False, True]
    assert snap.gpu(3) is snap.gpus[3] and snap.gpu(4) is None


def test_probe_without_nvml_says_why_and_never_raises() -> None:
    snap = probe(FakeNvml(four_gpus(), fail={"init": "NVML Shared Library Not Found"}))
    assert snap == HardwareSnapshot((), None, None, "NVML Shared Library Not Found", "none")


def test_a_failing_query_gives_no_gpus_and_the_reason() -> None:
    nvml = FakeNvml(four_gpus(), fail={"memory:2": "Unknown Error"})
    snap = probe(nvml)
    assert snap.gpus == () and snap.source == "none"
    assert snap.nvml_error == "NVML query failed: Unknown Error"
    assert snap.driver_version == "550.54.15"
    assert nvml.shut_down


def test_optional_queries_may_fail_without_spoiling_the_snapshot() -> None:
    fail = {"processes:0": "Not Supported", "cuda_driver_version": "Function Not Found"}
    snap = probe(FakeNvml(four_gpus(), fail=fail))
    assert snap.source == "nvml" and len(snap.gpus) == 4
    assert snap.gpus[0].processes == () and snap.cuda_driver_version is None


def test_declared_snapshot_numbers_the_fleet_from_zero_with_all_memory_free() -> None:
    snap = declared_snapshot([DeclaredGpu("A100", 80), DeclaredGpu("T4", 16, (7, 5))])
    assert snap.source == "declared" and snap.nvml_error is None
    assert snap.ids == (0, 1)
    t4 = snap.gpus[1]
    assert (t4.name, t4.total_bytes, t4.used_bytes, t4.free_bytes) == ("T4", 16 * GIB, 0, 16 * GIB)
    assert t4.compute_capability == (7, 5) and not t4.supports_bf16


class _FakePynvml:
    """Stands in for the `pynvml` module, to test the adapter without a driver."""

    def __init__(self) -> None:
        self.handles: list[int] = []

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.handles.append(index)
        return 100 + index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"Tesla T4"  # old nvidia-ml-py releases return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(total=16, used=4, free=12)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return [SimpleNamespace(pid=5, usedGpuMemory=3), SimpleNamespace(pid=9, usedGpuMemory=None)]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        return [SimpleNamespace(pid=5, usedGpuMemory=None), SimpleNamespace(pid=2, usedGpuMemory=1)]

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        raise OSError("libnvidia-ml.so: undefined symbol")


def test_pynvml_backend_adapts_the_bindings() -> None:
    backend = PynvmlBackend(_FakePynvml())
    assert backend.name(0) == "Tesla T4"
    assert backend.memory(1) == (16, 4, 12)
    # compute and graphics processes merged by pid, keeping a reported size
    assert backend.processes(0) == [(2, 1), (5, 3), (9, None)]
    with pytest.raises(NvmlError, match="undefined symbol"):
        backend.cuda_driver_version()
    with pytest.raises(NvmlError, match="nvmlSystemGetDriverVersion"):
        backend.driver_version()  # missing from the stand-in: AttributeError becomes NvmlError


def test_real_probe_is_truthful_on_this_machine() -> None:
    snap = probe()
    if snap.source == "none":
        assert snap.gpus == () and snap.nvml_error
    else:
        assert snap.nvml_error is None and snap.ids == tuple(range(len(snap.gpus)))


def test_probing_imports_no_torch_and_finds_cuda_uninitialised() -> None:
    code = (
        "import sys\n"
        "from glmdeploy.hardware import gpu_select, nvml\n"
        "nvml.probe()\n"
        "assert nvml.cuda_devices_in_use() is None\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.gpu
def test_nvml_ids_are_cuda_ids_under_pci_bus_order() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # A fresh process: this one may have initialised CUDA under another environment.
    code = (
        "import torch\n"
        "from glmdeploy.hardware.gpu_select import _uuid_key\n"
        "from glmdeploy.hardware.nvml import cuda_devices_in_use, probe\n"
        "snap = probe()\n"
        "assert snap.source == 'nvml', snap.nvml_error\n"
        "assert cuda_devices_in_use() is None\n"
        "assert torch.cuda.is_available()\n"  # runs cuInit, before torch's own lazy init
        "seen = cuda_devices_in_use()\n"
        "assert not torch.cuda.is_initialized() and seen is not None\n"
        "assert len(seen) == torch.cuda.device_count() == len(snap.gpus), seen\n"
        "for gpu, uuid in zip(snap.gpus, seen):\n"
        "    props = torch.cuda.get_device_properties(gpu.physical_id)\n"
        "    assert _uuid_key(gpu.uuid) == _uuid_key(uuid) == _uuid_key(str(props.uuid))\n"
        "    assert (props.major, props.minor) == gpu.compute_capability\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
