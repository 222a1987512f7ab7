"""Facts about this machine's GPUs, read without initialising CUDA (NVML, never torch).

Physical GPU ids are NVML indices. NVML numbers GPUs in PCI bus order, as `nvidia-smi` does, which
is also CUDA's order once `CUDA_DEVICE_ORDER=PCI_BUS_ID` is set. Reading NVML does not create a CUDA
context, so probing is safe before `CUDA_VISIBLE_DEVICES` has been decided.

NVML is reached through the small `Nvml` protocol: `PynvmlBackend` is the real one, and tests pass a
fake with the same dozen methods. `cuda_devices_in_use` tells whether CUDA has already been
initialised in this process, and which GPUs it then sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from glmdeploy.config.settings import GIB, DeclaredGpu

SnapshotSource = Literal["nvml", "declared", "none"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    name: str
    used_bytes: int | None  # None: the driver does not say (no permission, some platforms)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML (or a declared fleet) describes it."""

    physical_id: int  # NVML index = PCI bus order = nvidia-smi's number
    name: str
    uuid: str  # "GPU-…" for real GPUs, "declared-N" for declared ones
    total_bytes: int
    used_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]
    processes: tuple[GpuProcess, ...] = ()

    @property
    def supports_bf16(self) -> bool:
        """bf16 needs compute capability 8.0 (Ampere) or newer; V100 and T4 have none."""
        return self.compute_capability >= (8, 0)


@dataclass(frozen=True)
class HardwareSnapshot:
    """The GPUs of this machine at one moment, or of a declared fleet."""

    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    cuda_driver_version: str | None  # the newest CUDA the driver supports, e.g. "12.4"
    nvml_error: str | None  # why NVML could not be read; None when it could (or was not asked)
    source: SnapshotSource

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(gpu.physical_id for gpu in self.gpus)

    def gpu(self, physical_id: int) -> GpuInfo | None:
        return next((g for g in self.gpus if g.physical_id == physical_id), None)


class NvmlError(Exception):
    """NVML is missing or one of its queries failed."""


class Nvml(Protocol):
    """The NVML queries glmdeploy needs, GPUs by NVML index; a failure raises `NvmlError`."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def cuda_driver_version(self) -> int: ...  # NVML's encoding: 12040 means CUDA 12.4
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def uuid(self, index: int) -> str: ...
    def memory(self, index: int) -> tuple[int, int, int]: ...  # total, used, free bytes
    def compute_capability(self, index: int) -> tuple[int, int]: ...
    def processes(self, index: int) -> list[tuple[int, int | None]]: ...  # (pid, used bytes)
    def process_name(self, pid: int) -> str: ...


class PynvmlBackend:
    """`Nvml` over nvidia-ml-py: `lib` is the `pynvml` module, imported on first use if None."""

    def __init__(self, lib: Any = None) -> None:
        self._lib = lib

    def _call(self, function: str, *args: Any) -> Any:
        try:
            if self._lib is None:
                import pynvml

                self._lib = pynvml
            return getattr(self._lib, function)(*args)
        except ImportError as exc:
            raise NvmlError("nvidia-ml-py (pynvml) is not installed") from exc
        except Exception as exc:  # NVMLError subclasses, and OSError/AttributeError on old drivers
            raise NvmlError(str(exc) or type(exc).__name__) from exc

    def _handle(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def init(self) -> None:
        self._call("nvmlInit")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def cuda_driver_version(self) -> int:
        return int(self._call("nvmlSystemGetCudaDriverVersion"))

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def name(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetName", self._handle(index)))

    def uuid(self, index: int) -> str:
        return _text(self._call("nvmlDeviceGetUUID", self._handle(index)))

    def memory(self, index: int) -> tuple[int, int, int]:
        info = self._call("nvmlDeviceGetMemoryInfo", self._handle(index))
        return int(info.total), int(info.used), int(info.free)

    def compute_capability(self, index: int) -> tuple[int, int]:
        major, minor = self._call("nvmlDeviceGetCudaComputeCapability", self._handle(index))
        return int(major), int(minor)

    def processes(self, index: int) -> list[tuple[int, int | None]]:
        handle = self._handle(index)
        found = list(self._call("nvmlDeviceGetComputeRunningProcesses", handle))
        with contextlib.suppress(NvmlError):  # not every GPU reports graphics processes
            found += list(self._call("nvmlDeviceGetGraphicsRunningProcesses", handle))
        used: dict[int, int | None] = {}
        for proc in found:
            nbytes = getattr(proc, "usedGpuMemory", None)
            used[int(proc.pid)] = int(nbytes) if nbytes is not None else used.get(int(proc.pid))
        return sorted(used.items())

    def process_name(self, pid: int) -> str:
        return _text(self._call("nvmlSystemGetProcessName", pid))


def probe(nvml: Nvml | None = None) -> HardwareSnapshot:
    """Read this machine's GPUs. Never raises: without NVML, the snapshot has no GPUs, and why."""
    api: Nvml = nvml if nvml is not None else PynvmlBackend()
    try:
        api.init()
    except NvmlError as exc:
        return HardwareSnapshot((), None, None, str(exc), "none")
    driver: str | None = None
    try:
        driver = api.driver_version()
        cuda = _optional(lambda: _cuda_version_text(api.cuda_driver_version()), None)
        gpus = tuple(_read_gpu(api, index) for index in range(api.device_count()))
    except NvmlError as exc:
        return HardwareSnapshot((), driver, None, f"NVML query failed: {exc}", "none")
    finally:
        _optional(api.shutdown, None)
    return HardwareSnapshot(gpus, driver, cuda, None, "nvml")


def declared_snapshot(declared: Sequence[DeclaredGpu]) -> HardwareSnapshot:
    """A snapshot of a fleet described in the config: ids 0..n-1, all memory free."""
    gpus = tuple(
        GpuInfo(
            physical_id=index,
            name=gpu.name,
            uuid=f"declared-{index}",
            total_bytes=int(gpu.memory_gib * GIB),
            used_bytes=0,
            free_bytes=int(gpu.memory_gib * GIB),
            compute_capability=gpu.compute_capability,
        )
        for index, gpu in enumerate(declared)
    )
    return HardwareSnapshot(gpus, None, None, None, "declared")


def cuda_devices_in_use() -> tuple[str, ...] | None:
    """UUIDs of the GPUs CUDA already sees in this process, in its order; None if not initialised.

    CUDA reads `CUDA_VISIBLE_DEVICES` when its driver initialises (`cuInit`), and
    `torch.cuda.is_available()` does that before torch's own lazy init. So the driver is asked too:
    until `cuInit`, `cuDeviceGetCount` fails (CUDA_ERROR_NOT_INITIALIZED). Nothing here imports
    torch or initialises CUDA.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        count = torch.cuda.device_count()
        return tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(count))
    try:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return None  # no CUDA driver: CUDA cannot have been initialised
    count_out = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count_out)) != 0:
        return None
    uuids = []
    for ordinal in range(count_out.value):
        device, raw = ctypes.c_int(0), (ctypes.c_ubyte * 16)()
        ok = driver.cuDeviceGet(ctypes.byref(device), ordinal) == 0
        ok = ok and driver.cuDeviceGetUuid(raw, device) == 0
        uuids.append(bytes(raw).hex() if ok else "unknown")
    return tuple(uuids)


def _read_gpu(api: Nvml, index: int) -> GpuInfo:
    total, used, free = api.memory(index)
    return GpuInfo(
        physical_id=index,
        name=api.name(index),
        uuid=api.uuid(index),
        total_bytes=total,
        used_bytes=used,
        free_bytes=free,
        compute_capability=api.compute_capability(index),
        # Process lists are a courtesy: some GPUs and containers refuse them.
        processes=_optional(lambda: _read_processes(api, index), ()),
    )


def _read_processes(api: Nvml, index: int) -> tuple[GpuProcess, ...]:
    return tuple(
        GpuProcess(pid, _optional(functools.partial(api.process_name, pid), "?"), nbytes)
        for pid, nbytes in api.processes(index)
    )


def _optional(read: Callable[[], _T], default: _T) -> _T:
    """The value of an NVML query that may fail without spoiling the snapshot."""
    try:
        return read()
    except NvmlError:
        return default


def _cuda_version_text(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def uuid_key(uuid: str) -> str:
    """A GPU UUID's hex digits: NVML writes `GPU-8932f937-…`, torch `8932f937-…`, CUDA raw bytes."""
    return re.sub(r"[^0-9a-f]", "", uuid.lower().removeprefix("gpu-"))


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)
