"""Materialise an embedded model option (architecture + seed) as a cached local native checkpoint.

The weights are what `AutoModelForCausalLM.from_config` initialises after `torch.manual_seed(seed)`
(fp32, CPU), saved with `save_pretrained` (config.json + model.safetensors). The cache key covers
the architecture, the seed and the torch/transformers versions (their initialisers decide values).
torch and transformers are imported only when needed.
A checkpoint is written into a temporary directory beside its final place, a marker file last, and
renamed into place; a directory with the marker is complete and reused.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from glmdeploy import atomic
from glmdeploy.cache import CACHE_ENV, cache_root
from glmdeploy.config.settings import Architecture
from glmdeploy.hardware.environment import package_version
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.problems import LoadError, Problem

__all__ = ["CACHE_ENV", "MARKER", "cache_root", "embedded_key", "materialize"]  # cache: re-exported
MARKER = "glmdeploy-materialized.json"  # written last: its presence means the directory is complete
MATERIALIZE_VERSION = 1  # bump when what is written changes: invalidates cached checkpoints


def embedded_key(architecture: Architecture, seed: int) -> str:
    """The cache key (sha256 hex) of an embedded model: architecture, seed and library versions."""
    record = {
        "architecture": dataclasses.asdict(architecture),
        "seed": seed,
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "version": MATERIALIZE_VERSION,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def materialize(architecture: Architecture, seed: int, root: Path | None = None) -> Path:
    """The checkpoint directory of the embedded model, written on first use.

    Args:
        architecture: the model's shapes (`model.architecture`).
        seed: `model.source.seed`.
        root: the directory holding materialised models (default: `cache_root() / "embedded"`).

    Raises:
        ConfigError: transformers cannot build this architecture.
        LoadError: the cache directory cannot be written.
    """
    root = Path(root) if root is not None else cache_root() / "embedded"
    key = embedded_key(architecture, seed)
    target = root / key[:20]
    if (target / MARKER).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    except OSError as exc:
        hint = f"set {CACHE_ENV} to a writable directory"
        raise LoadError([Problem(str(root), f"cannot write the cache: {exc}", hint=hint)]) from exc
    try:
        _write(tmp, architecture, seed, key)
        _move_into_place(tmp, target)
    except OSError as exc:
        hint = f"free some space, or set {CACHE_ENV} to another directory"
        raise LoadError([Problem(str(target), f"cannot write it: {exc}", hint=hint)]) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write(directory: Path, architecture: Architecture, seed: int, key: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = config_from_architecture(architecture)
    # fork_rng: seeding must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto: Any = AutoModelForCausalLM  # untyped upstream
        model = auto.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100GB")
    record = {
        "architecture": dataclasses.asdict(architecture),
        "seed": seed,
        "key": key,
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    atomic.write_text(directory / MARKER, json.dumps(record, indent=2) + "\n")


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an incomplete `target` is replaced, a complete one kept."""
    if target.exists() and not (target / MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / MARKER).is_file():  # not another process that finished first
            raise
