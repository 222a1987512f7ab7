"""The software side of this machine: package versions, torch's CUDA build, relevant variables.

Shared by `glmdeploy doctor` and run records (`environment_facts`). Nothing here imports torch or
initialises CUDA: torch's CUDA build is read from its `version.py` alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import asdict
from functools import lru_cache
from typing import Any

from glmdeploy.hardware.nvml import Nvml, probe

PACKAGES = (
    "glmdeploy", "torch", "transformers", "accelerate", "safetensors", "hydra-core",
    "bitsandbytes", "nvidia-ml-py",
)  # fmt: skip
ENV_VARS = (
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF", "HF_HOME",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS",
)  # fmt: skip
ENV_PREFIXES = ("NCCL_", "GLOO_")
NOT_INSTALLED = "not installed"
_CHANGING = ("used_bytes", "free_bytes", "processes")  # GPU facts that change from run to run


@lru_cache(maxsize=64)
def package_version(distribution: str) -> str:
    """The installed version of `distribution`, or "not installed" (looked up once a process:
    each look-up scans sys.path, and what a process has imported does not change under it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def package_versions() -> dict[str, str]:
    return {name: package_version(name) for name in PACKAGES}


def relevant_environment(env: Mapping[str, str]) -> dict[str, str | None]:
    """`ENV_VARS` (None: unset) and every NCCL_*/GLOO_* variable that is set."""
    shown: dict[str, str | None] = {name: env.get(name) for name in ENV_VARS}
    shown.update({k: v for k, v in sorted(env.items()) if k.startswith(ENV_PREFIXES)})
    return shown


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built for (`torch.version.cuda`); None for CPU builds or no torch.

    Read from torch's `version.py` without importing torch, unless torch is imported already.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = torch.version.cuda
        return str(cuda) if cuda else None
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "version.py")
    module_spec = importlib.util.spec_from_file_location("_glmdeploy_torch_version", path)
    if module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (OSError, ImportError, SyntaxError):
        return None
    cuda = getattr(module, "cuda", None)
    return str(cuda) if cuda else None


def environment_facts(
    *, nvml: Nvml | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Versions, NVIDIA driver, GPUs and relevant environment variables (`nvml`, `environ`: tests).

    Reads NVML and torch's version file only: CUDA is never initialised.
    """
    snapshot = probe(nvml)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch_cuda": torch_cuda_build(),
        "nvidia_driver": snapshot.driver_version,
        "cuda_driver": snapshot.cuda_driver_version,
        "nvml_error": snapshot.nvml_error,
        "gpus": [
            {k: v for k, v in asdict(g).items() if k not in _CHANGING}  # total memory, uuid, …
            for g in snapshot.gpus
        ],
        "env": relevant_environment(os.environ if environ is None else environ),
    }
