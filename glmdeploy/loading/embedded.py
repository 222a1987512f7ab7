"""Materialise an embedded model option (architecture + seed) as a cached local native checkpoint.

The weights are what `AutoModelForCausalLM.from_config` initialises after `torch.manual_seed(seed)`
(fp32, CPU), saved with `save_pretrained` (config.json + model.safetensors). The cache key covers
the architecture, the seed and the torch/transformers versions (their initialisers decide values).
torch and transformers are imported only when needed, so planning code may use `hf_config`.
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

from glmdeploy.config.settings import Architecture
from glmdeploy.problems import ConfigError, LoadError, Problem

CACHE_ENV = "GLMDEPLOY_CACHE"  # replaces ~/.cache/glmdeploy
MARKER = "glmdeploy-materialized.json"  # written last: its presence means the directory is complete
MATERIALIZE_VERSION = 1  # bump when what is written changes: invalidates cached checkpoints


def cache_root() -> Path:
    """glmdeploy's cache directory: `$GLMDEPLOY_CACHE`, else `~/.cache/glmdeploy`."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "glmdeploy"


def embedded_key(architecture: Architecture, seed: int) -> str:
    """The cache key (sha256 hex) of an embedded model: architecture, seed and library versions."""
    record = {
        "architecture": dataclasses.asdict(architecture),
        "seed": seed,
        "torch": importlib.metadata.version("torch"),
        "transformers": importlib.metadata.version("transformers"),
        "version": MATERIALIZE_VERSION,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def hf_config(architecture: Architecture) -> Any:
    """The transformers config of `architecture`; token ids the vocabulary lacks are dropped.

    Family defaults (GLM's pad id 151329) exceed a small vocabulary; an out-of-range padding index
    makes `nn.Embedding` refuse to build.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(architecture.model_type, **architecture.to_hf_kwargs())
    except (ValueError, KeyError, TypeError) as exc:
        message = f"transformers cannot build a config for model_type {architecture.model_type!r}"
        raise ConfigError([Problem("model.architecture", f"{message}: {exc}")]) from exc
    for name in ("pad_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not 0 <= value < architecture.vocab_size:
            setattr(config, name, None)
    return config


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

    config = hf_config(architecture)
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
    partial = directory / f".{MARKER}.tmp"
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, directory / MARKER)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an incomplete `target` is replaced, a complete one kept."""
    if target.exists() and not (target / MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / MARKER).is_file():  # not another process that finished first
            raise
