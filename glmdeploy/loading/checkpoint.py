"""Read checkpoint tensors safely: safetensors or weights-only `.bin`, single or sharded.

`.bin` files are read only with `torch.load(weights_only=True, mmap=True)`, so no code in a
checkpoint ever runs. Every failure is a `LoadError` whose problems name the file at fault.
"""

from __future__ import annotations

import enum
import hashlib
import json
import pickle
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from safetensors import SafetensorError, safe_open

from glmdeploy.loading.content_hash import file_digests
from glmdeploy.problems import LoadError, Problem, one_of

if TYPE_CHECKING:
    import torch  # imported where tensors are read: run records fingerprint without it

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own limit
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
_AGAIN = "download or copy this file again"
_NO_PICKLE = (
    "glmdeploy will not execute pickled code from a checkpoint; convert the file to safetensors "
    "where you trust it, or use the publisher's safetensors files"
)


class WeightFormat(enum.StrEnum):
    SAFETENSORS = "safetensors"
    BIN = "bin"  # a torch.save zip file, read with weights_only=True


class TensorInfo(NamedTuple):
    """What a checkpoint says about one tensor, without reading its data."""

    shape: tuple[int, ...]
    dtype: str  # torch's name: "float32", "bfloat16", …
    file: Path

    @property
    def nbytes(self) -> int:
        import torch

        numel = 1
        for dim in self.shape:
            numel *= dim
        itemsize: int = getattr(torch, self.dtype).itemsize
        return numel * itemsize


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint directory and, when sharded, its index."""

    directory: Path
    format: WeightFormat
    shards: tuple[Path, ...]
    index: Path | None = None
    weight_map: Mapping[str, str] = field(default_factory=dict)  # tensor name -> shard file name


def _fail(
    path: Path | str, message: str, expected: str | None = None, hint: str | None = None
) -> LoadError:
    return LoadError([Problem(str(path), message, expected, hint)])


def _names(names: Collection[str], limit: int = 5) -> str:
    shown = ", ".join(f"`{n}`" for n in sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def find_weight_files(directory: Path) -> WeightFiles:
    """Locate the weights in `directory` (safetensors preferred) and check every shard exists."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise _fail(directory, f"the checkpoint directory {what}")
    formats = (WeightFormat.SAFETENSORS, WeightFormat.BIN)
    for index_name, fmt in zip((SAFETENSORS_INDEX, BIN_INDEX), formats, strict=True):
        if (directory / index_name).is_file():
            return _read_index(directory / index_name, fmt)
    for single, fmt in zip((SAFETENSORS, BIN), formats, strict=True):
        if (directory / single).is_file():
            return WeightFiles(directory, fmt, (directory / single,))
    present = sorted(p.name for p in directory.iterdir())
    listing = ", ".join(present[:20]) + (", …" if len(present) > 20 else "")
    raise _fail(
        directory,
        "no weights found",
        expected=f"{SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, {BIN} or {BIN_INDEX}",
        hint=f"the directory holds: {listing or 'nothing'}",
    )


def _read_index(index: Path, fmt: WeightFormat) -> WeightFiles:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise _fail(index, f"cannot read the index: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _fail(
            index, "no valid 'weight_map'", expected='{"weight_map": {"<tensor>": "<file>"}}'
        )
    shard_names = sorted(set(weight_map.values()))
    outside = [name for name in shard_names if Path(name).name != name]
    if outside:
        raise _fail(index, f"names shards outside its directory: {_names(outside)}")
    shards = tuple(index.parent / name for name in shard_names)
    missing = [
        Problem(str(s), f"{index.name} names this shard but it does not exist", hint=_AGAIN)
        for s in shards
        if not s.is_file()
    ]
    if missing:
        raise LoadError(missing)
    return WeightFiles(index.parent, fmt, shards, index, weight_map)


def list_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, checked against its index (reads only safetensors headers).

    Raises:
        LoadError: missing, corrupt or truncated files; an index that disagrees with its shards; a
            tensor stored in two shards; a `.bin` that holds anything but tensors.
    """
    files = find_weight_files(directory)
    problems: list[Problem] = []
    infos: dict[str, TensorInfo] = {}
    duplicates: dict[tuple[Path, Path], list[str]] = {}
    unread: set[str] = set()
    for shard in files.shards:
        try:
            found = _shard_infos(shard, files.format)
        except LoadError as err:
            problems.extend(err.problems)
            unread.add(shard.name)
            continue
        for name, info in found.items():
            if name in infos:
                duplicates.setdefault((infos[name].file, shard), []).append(name)
            else:
                infos[name] = info
    for (first, again), names in sorted(duplicates.items()):
        message = f"{_names(names)} also stored in {first.name}"
        problems.append(Problem(str(again), message, hint="each tensor belongs in one shard only"))
    lacking: dict[str, list[str]] = {}
    for name, shard_name in files.weight_map.items():
        holder = infos.get(name)
        if shard_name not in unread and (holder is None or holder.file.name != shard_name):
            lacking.setdefault(shard_name, []).append(name)
    for shard_name, names in sorted(lacking.items()):
        message = f"maps {_names(names)} to {shard_name}, which lacks it"
        problems.append(Problem(str(files.index), message, hint="index and shards do not match"))
    if problems:
        raise LoadError(problems)
    return infos


def _shard_infos(path: Path, fmt: WeightFormat) -> dict[str, TensorInfo]:
    if fmt is WeightFormat.BIN:
        return {
            name: TensorInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."), path)
            for name, t in load_bin(path).items()
        }
    header, _ = _safetensors_header(path)
    entries = sorted((v["data_offsets"][0], k, v) for k, v in header.items() if k != "__metadata__")
    odd = sorted({v["dtype"] for _, _, v in entries} - _SAFETENSORS_DTYPES.keys())
    if odd:
        raise _fail(
            path, f"unsupported dtype {', '.join(odd)}", expected=one_of(_SAFETENSORS_DTYPES)
        )
    return {
        k: TensorInfo(tuple(v["shape"]), _SAFETENSORS_DTYPES[v["dtype"]], path)
        for _, k, v in entries
    }


def _safetensors_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """The parsed header and its raw bytes, after checking the data it describes is all there."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, _MAX_HEADER_BYTES):
            raise _fail(path, f"truncated or not safetensors ({size} bytes in all)", hint=_AGAIN)
        raw = f.read(length)
    try:
        header = json.loads(raw)
        entries = [v for k, v in header.items() if k != "__metadata__"]
        end = max((int(v["data_offsets"][1]) for v in entries), default=0)
        if not all({"dtype", "shape"} <= v.keys() for v in entries):
            raise ValueError("an entry lacks dtype or shape")
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _fail(path, f"corrupt safetensors header: {exc}", hint=_AGAIN) from exc
    if end > size - 8 - length:
        held = size - 8 - length
        raise _fail(
            path, f"truncated: {held} bytes of data, the header describes {end}", hint=_AGAIN
        )
    return header, prefix + raw


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped; unpickles nothing but tensors and plain containers."""
    import torch

    try:
        loaded = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        message = f"holds pickled Python objects besides tensors{what}"
        raise _fail(path, message, expected="a state dict of tensors", hint=_NO_PICKLE) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(
            path,
            f"truncated or corrupt .bin: {first_line}",
            expected="a torch.save zip file (torch >= 1.6)",
            hint=f"{_AGAIN}; if it is an old-format torch.save file, {_NO_PICKLE.split('; ')[1]}",
        ) from exc
    if not isinstance(loaded, Mapping):
        raise _fail(path, f"holds a {type(loaded).__name__}, not a state dict")
    odd = [
        f"{k!s} ({type(v).__name__})"
        for k, v in loaded.items()
        if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    ]
    if odd:
        message = f"holds entries that are not tensors: {_names(odd)}"
        expected = "a flat dict of tensor name -> tensor"
        raise _fail(path, message, expected, hint="save only the model's state_dict()")
    return dict(loaded)


def check_float_weights(infos: Mapping[str, TensorInfo], *, quantized: bool = False) -> None:
    """Raise LoadError naming each file and tensor where a weight is stored as integers or bools.

    A model's parameters (`*.weight`, `*.bias`) are floating point in every architecture glmdeploy
    loads; integer ones come from a corrupt or mislabelled file, and transformers would cast them
    silently. A quantised checkpoint stores integers on purpose: pass `quantized` (its config.json
    has a `quantization_config`).
    """
    if quantized:
        return
    wrong: dict[Path, list[str]] = {}
    for name, info in infos.items():
        if name.rsplit(".", 1)[-1] in ("weight", "bias") and not _floating(info.dtype):
            wrong.setdefault(info.file, []).append(f"{name} ({info.dtype})")
    if wrong:
        expected = "a floating-point dtype (F32, F16, BF16)"
        hint = f"the file is corrupt or mislabelled: {_AGAIN}"
        raise LoadError(
            [
                Problem(str(file), f"weights stored as integers: {_names(names)}", expected, hint)
                for file, names in sorted(wrong.items())
            ]
        )


def _floating(dtype: str) -> bool:
    """Whether a torch dtype name is a floating one (float16/32/64, bfloat16, float8_*)."""
    return dtype.startswith(("float", "bfloat"))


def iter_tensors(
    directory: Path, names: Collection[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` file by file, one tensor read at a time (every tensor, or `names`).

    The whole checkpoint is checked with `list_tensors` before the first tensor is yielded.
    """
    infos = list_tensors(directory)
    wanted = list(infos) if names is None else list(names)
    unknown = set(wanted) - infos.keys()
    if unknown:
        raise _fail(directory, f"the checkpoint has no tensor {_names(unknown)}")
    order = {name: i for i, name in enumerate(infos)}
    by_file: dict[Path, list[str]] = {}
    for name in sorted(wanted, key=order.__getitem__):
        by_file.setdefault(infos[name].file, []).append(name)
    for path, file_names in by_file.items():
        if path.suffix == ".bin":
            state = load_bin(path)
            for name in file_names:
                yield name, state[name]
            del state
            continue
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in file_names:
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise _fail(path, f"corrupt safetensors file: {exc}", hint=_AGAIN) from exc


def read_tensors(directory: Path, names: Collection[str]) -> dict[str, torch.Tensor]:
    """The named tensors, read into memory."""
    return dict(iter_tensors(directory, names))


def fingerprint(directory: Path, *, progress: bool = False) -> str:
    """The checkpoint's content identity (sha256 hex), for run records and the conversion cache.

    Covers config.json, the index, and each weight file's name, size and content hash (see
    `glmdeploy.loading.content_hash`: streamed once, then reused while the file is unchanged), so
    any edit of any weight byte changes it.
    """
    files = find_weight_files(directory)
    digest = hashlib.sha256(f"glmdeploy-checkpoint-v2\n{files.format}\n".encode())
    for extra in (Path(directory) / "config.json", files.index):
        if extra is not None and extra.is_file():
            digest.update(f"\n{extra.name}\n".encode() + extra.read_bytes())
    hashes = file_digests(files.shards, progress=progress)
    for shard, content in zip(files.shards, hashes, strict=True):
        digest.update(f"\n{shard.name}\n{shard.stat().st_size}\n{content}\n".encode())
    return digest.hexdigest()
