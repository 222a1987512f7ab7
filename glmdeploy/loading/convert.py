"""Convert a legacy ChatGLM checkpoint directory into a native transformers GLM one, atomically.

The result is built in a staging directory beside the destination and swapped into place only when
complete (`glmdeploy.staging`): a failed or interrupted conversion leaves the destination as it was,
and what a killed one left behind is cleaned up, or rolled back, by the next conversion there.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file

from glmdeploy import atomic
from glmdeploy.loading.checkpoint import (
    SAFETENSORS_INDEX,
    TensorInfo,
    check_float_weights,
    fingerprint,
    iter_tensors,
)
from glmdeploy.loading.checkpoint import list_tensors as list_checkpoint_tensors
from glmdeploy.loading.embedded import CACHE_ENV
from glmdeploy.model.hf_config import MODELING_SOURCE, modeling_source, read_config_json
from glmdeploy.model.legacy_chatglm import (
    INV_FREQ,
    check_tensors,
    is_legacy_chatglm,
    native_config_dict,
    native_tensors,
)
from glmdeploy.outputs import check_directory, make_directory, output_error
from glmdeploy.problems import LoadError, OutputError, Problem
from glmdeploy.staging import exclusive, publish, recover, staging

CONVERTER_VERSION = 1  # bump when the output of a conversion changes: invalidates cached ones
MARKER = "glmdeploy-conversion.json"  # written last into a cached conversion
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_CACHE_HINT = f"set {CACHE_ENV} to a writable directory with room for the converted weights"
_SIDE_FILES = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json",
               "generation_config.json")  # fmt: skip


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote."""

    src: Path
    dst: Path
    num_tensors: int  # native tensors written
    total_bytes: int
    shards: tuple[str, ...]
    copied: tuple[str, ...]  # tokenizer and generation files copied from src
    notes: tuple[str, ...] = ()  # leftovers of interrupted conversions that were cleaned up


def convert_checkpoint(
    src: Path,
    dst: Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ConvertResult:
    """Write a native `GlmForCausalLM` checkpoint at `dst` from the legacy ChatGLM one at `src`.

    Reads any of the four weight layouts (see `glmdeploy.loading.checkpoint`) tensor by tensor and
    writes `config.json`, `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes`
    (a single larger tensor gets a shard of its own) and `model.safetensors.index.json`, plus the
    tokenizer and generation files; never `*.py` remote code.

    Args:
        src: the legacy checkpoint directory.
        dst: where the native checkpoint goes; must not exist or be empty unless `overwrite`.
        progress: show a progress bar on stderr.
        overwrite: replace a non-empty `dst`.
        max_shard_bytes: the largest output shard.

    Raises:
        LoadError: the source cannot be read or converted. `dst` is left as it was and the
            staging directory is removed.
        OutputError: `dst` cannot be written (under a file, read-only, not enough space), is
            not empty (without `overwrite`) or lies inside the source.
    """
    src, dst = Path(src), Path(dst)
    legacy = read_config_json(src)
    config_path = str(src / "config.json")
    if not is_legacy_chatglm(legacy):
        found = f"model_type is {legacy.get('model_type')!r}, not a legacy ChatGLM checkpoint"
        hint = "transformers loads it as it is"
        raise LoadError([Problem(f"{config_path}:model_type", found, "chatglm", hint)])
    native = native_config_dict(legacy, modeling_source=modeling_source(src), source=config_path)
    from transformers import GlmConfig

    config = GlmConfig(**native)  # transformers checks it before any weight is read
    infos = list_checkpoint_tensors(src)
    check_float_weights(infos)
    shapes = {name: info.shape for name, info in infos.items()}
    files = {name: str(info.file) for name, info in infos.items()}
    check_tensors(shapes, legacy, files=files, config_path=config_path)
    needed = sum(info.nbytes for info in infos.values()) + 2**20
    _check_destination(src, dst, overwrite, needed)
    plan = _plan_shards(infos, max_shard_bytes)
    notes = tuple(recover(dst.parent)) if dst.parent.is_dir() else ()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staging(dst) as staged:
            count, total, shard_names = _write_shards(src, staged.tmp, plan, legacy, len(infos),
                                                      progress)  # fmt: skip
            config.save_pretrained(staged.tmp)
            copied = _copy_side_files(src, staged.tmp)
            publish(staged)
    except OSError as exc:
        raise output_error(dst, exc, "the converted checkpoint") from exc
    return ConvertResult(src, dst, count, total, shard_names, copied, notes)


def _check_destination(src: Path, dst: Path, overwrite: bool, needed_bytes: int) -> None:
    check_directory(dst, "the destination", needed_bytes=needed_bytes)
    resolved_src, resolved_dst = src.resolve(), dst.resolve()
    if resolved_dst == resolved_src or resolved_dst in resolved_src.parents:
        raise OutputError(
            [
                Problem(
                    str(dst),
                    f"would overwrite the source checkpoint {src}",
                    hint="choose a destination outside the source checkpoint",
                )
            ]
        )
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        hint = "choose another destination, remove it, or pass `glmdeploy convert --overwrite`"
        raise OutputError([Problem(str(dst), "already exists and is not empty", hint=hint)])


def _plan_shards(infos: Mapping[str, TensorInfo], max_shard_bytes: int) -> list[list[str]]:
    """Legacy tensor names per output shard, in reading order (a split tensor stays together)."""
    plan: list[list[str]] = [[]]
    size = 0
    for name, info in infos.items():
        if name == INV_FREQ:  # read (to be checked) but not written
            plan[-1].append(name)
            continue
        if size and size + info.nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += info.nbytes
    return plan


def _owned(tensor: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """`tensor` if safetensors can save it beside the others, else a contiguous copy of it."""
    storage = tensor.untyped_storage()
    if (
        storage.data_ptr() in seen
        or storage.nbytes() != tensor.nbytes
        or not tensor.is_contiguous()
    ):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    seen.add(tensor.untyped_storage().data_ptr())
    return tensor


def _write_shards(
    src: Path,
    tmp: Path,
    plan: list[list[str]],
    legacy: Mapping[str, Any],
    num_legacy: int,
    progress: bool,
) -> tuple[int, int, tuple[str, ...]]:
    """Stream, convert and save tensors shard by shard; returns (tensors, bytes, shard names)."""
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    last_of_shard = {shard[-1]: i for i, shard in enumerate(plan) if shard}
    weight_map: dict[str, str] = {}
    total = 0
    current: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    with _progress_bar(progress) as bar:
        task = bar.add_task("converting", total=num_legacy)
        for name, tensor in _tracked(iter_tensors(src), bar, task):
            for new_name, new in native_tensors(name, tensor, legacy):
                current[new_name] = _owned(new, seen)
            if name in last_of_shard:
                shard = names[last_of_shard[name]]
                save_file(current, str(tmp / shard), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(current, shard))
                total += sum(t.nbytes for t in current.values())
                current, seen = {}, set()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return len(weight_map), total, tuple(sorted(set(weight_map.values())))


def _progress_bar(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    console = Console(stderr=True)
    return Progress(
        *columns, TimeElapsedColumn(), console=console, disable=not enabled, transient=True
    )


def _tracked(
    items: Iterator[tuple[str, torch.Tensor]], bar: Progress, task: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in items:
        bar.update(task, description=f"converting {name}")
        yield name, tensor
        bar.advance(task)


def _copy_side_files(src: Path, tmp: Path) -> tuple[str, ...]:
    copied = sorted({p.name for pattern in _SIDE_FILES for p in src.glob(pattern) if p.is_file()})
    for name in copied:
        shutil.copy2(src / name, tmp / name)
    return tuple(copied)


def conversion_key(src: Path, checkpoint_fingerprint: str | None = None) -> str:
    """What identifies a conversion: the checkpoint's content fingerprint (`fingerprint`, computed
    here unless given), config.json, the modeling code, the converter version."""
    digest = hashlib.sha256(f"glmdeploy-convert-v{CONVERTER_VERSION}\n".encode())
    digest.update((checkpoint_fingerprint or fingerprint(src)).encode())
    for name in ("config.json", MODELING_SOURCE):
        path = Path(src) / name
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()


@dataclass(frozen=True)
class NativeCheckpoint:
    """What `ensure_native` gives: the directory to load, and what the user should know."""

    path: Path
    notes: tuple[str, ...] = ()


def ensure_native(src: Path, cache_root: Path, *, progress: bool = True) -> NativeCheckpoint:
    """A checkpoint directory that transformers loads natively: `src` itself, or its conversion.

    A legacy ChatGLM checkpoint is converted once into `cache_root/<key>` (see `conversion_key`:
    any change to its weights' bytes makes a new key); a complete earlier conversion (marked by a
    file written last) is reused. Conversions of one key are serialised by a lock; what killed
    conversions left in the cache is removed first.

    Raises:
        LoadError: as `convert_checkpoint`.
        OutputError: the cache cannot be written, or lacks the space.
    """
    src = Path(src)
    if not is_legacy_chatglm(read_config_json(src)):
        return NativeCheckpoint(src)
    checkpoint_fingerprint = fingerprint(src, progress=progress)
    key = conversion_key(src, checkpoint_fingerprint)
    root = make_directory(cache_root, "the conversion cache", hint=_CACHE_HINT)
    target = root / key[:20]
    if (target / MARKER).is_file():
        return NativeCheckpoint(target)
    with exclusive(root / f".{target.name}.lock"):
        if (target / MARKER).is_file():  # another process converted it meanwhile
            return NativeCheckpoint(target)
        notes = [*recover(root), *_stale_conversions(root, src)]
        result = convert_checkpoint(src, target, progress=progress, overwrite=True)
        record = {
            "source": str(src.resolve()),
            "checkpoint_fingerprint": checkpoint_fingerprint,
            "conversion_key": key,
            "converter_version": CONVERTER_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "shards": list(result.shards),
        }
        atomic.write_text(target / MARKER, json.dumps(record, indent=2) + "\n")
    return NativeCheckpoint(target, (*notes, *result.notes))


def _stale_conversions(root: Path, src: Path) -> list[str]:
    """Notes on earlier conversions of `src` (other weights then): they are the user's to remove."""
    notes = []
    for marker in sorted(root.glob(f"*/{MARKER}")):
        try:
            source = json.loads(marker.read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError, AttributeError):
            continue
        if source == str(src.resolve()):
            size = sum(p.stat().st_size for p in marker.parent.iterdir() if p.is_file())
            notes.append(
                f"{src} changed since it was converted into {marker.parent} ({size / 1e9:.2f} GB):"
                " remove that directory once no run uses it"
            )
    return notes
