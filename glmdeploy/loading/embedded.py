"""Materialise an embedded model option (architecture + seed) as a cached local native checkpoint.

The weights are what `AutoModelForCausalLM.from_config` initialises after `torch.manual_seed(seed)`
(fp32, CPU), saved with `save_pretrained` (config.json + model.safetensors), beside a small
tokenizer trained locally for the vocabulary (`glmdeploy.loading.embedded_tokenizer`) whose
end-of-text and padding ids the model's config uses. The cache key covers
the architecture, the seed and the torch/transformers versions (their initialisers decide values).
torch and transformers are imported only when needed.
A checkpoint is written into a staging directory beside its final place (`glmdeploy.staging`), a
marker file last, and moved into place; a directory with the marker is complete and reused.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from glmdeploy import atomic
from glmdeploy.cache import CACHE_ENV, cache_root
from glmdeploy.config.settings import Architecture
from glmdeploy.hardware.environment import package_version
from glmdeploy.loading.embedded_tokenizer import write_tokenizer
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.outputs import make_directory, output_error
from glmdeploy.staging import publish, recover, staging

__all__ = ["CACHE_ENV", "MARKER", "cache_root", "embedded_key", "materialize"]  # cache: re-exported
MARKER = "glmdeploy-materialized.json"  # written last: its presence means the directory is complete
MATERIALIZE_VERSION = 2  # bump when what is written changes: invalidates cached checkpoints


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
        OutputError: the cache directory cannot be written (exit 2, like any output).
    """
    root = Path(root) if root is not None else cache_root() / "embedded"
    key = embedded_key(architecture, seed)
    target = root / key[:20]
    if (target / MARKER).is_file():
        return target
    hint = f"set {CACHE_ENV} to a directory you can write, with room for the model"
    make_directory(root, "the cache of built models", hint=hint)  # an output: exit 2 if it fails
    try:
        recover(root)  # what killed runs left: nothing to tell, the cache is glmdeploy's own
        with staging(target) as staged:
            _write(staged.tmp, architecture, seed, key)
            if not (target / MARKER).is_file():  # else another process finished first: keep it
                publish(staged)
    except OSError as exc:
        raise output_error(target, exc, "the built model", hint) from exc
    return target


def _write(directory: Path, architecture: Architecture, seed: int, key: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = config_from_architecture(architecture)
    tokenizer = write_tokenizer(directory, architecture.vocab_size)
    if tokenizer is not None:  # the model ends text where its tokenizer does
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
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
