"""The anatomy cache: a model's skeleton as JSON on disk, so that planning it again needs no torch.

An anatomy is a pure function of the model's transformers config, the installed transformers and
torch, and of what glmdeploy records (`ANATOMY_FORMAT`). Its key is computed without importing
either library: from a model option's architecture facts (the config dict they produce), or from
the bytes of a local checkpoint's config.json and of the code that decides how it is read. Entries
are content-addressed files, `<cache>/anatomy/<key>.json` (`glmdeploy.cache.cache_root`), written
atomically; concurrent writers of one key write the same bytes and the last rename wins. A file
that cannot be read, or whose format or key differs, is ignored and rebuilt. The anatomies of the
shipped model options ship with glmdeploy (`SHIPPED_DIR`, see `glmdeploy.model.shipped_anatomies`).

An entry (format `glmdeploy.anatomy/1`) is a JSON object:
`{"format", "key", "inputs": what the key hashes, "anatomy": Anatomy.to_dict(), "extras": {…}}`.
`extras` holds further per-architecture data, each with its own format: `workspace`, the traced
activation workspaces (`glmdeploy.model.workspace_cache`); readers ignore what they do not know.
Extras are added to an entry later (`save_extra`: the user's entry, started from the shipped one
if there is one); a concurrent writer may drop another's addition, which only costs recomputing it.
Bump `ANATOMY_FORMAT` when `glmdeploy.model.skeleton` records anything differently.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from glmdeploy import atomic
from glmdeploy.cache import cache_root
from glmdeploy.config.settings import ModelSpec
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.hf_config import checkpoint_layout

ANATOMY_FORMAT = 1
FORMAT = f"glmdeploy.anatomy/{ANATOMY_FORMAT}"
SHIPPED_DIR = Path(__file__).resolve().parent / "anatomies"
_MEMORY: dict[str, Anatomy] = {}  # key -> anatomy, for the life of the process


@dataclass(frozen=True)
class CacheEntry:
    """One cached anatomy with what its key hashes and any extra per-architecture data."""

    key: str
    inputs: Mapping[str, Any]
    anatomy: Anatomy
    extras: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {"format": FORMAT, "key": self.key, "inputs": dict(self.inputs),
                "anatomy": self.anatomy.to_dict(), "extras": dict(self.extras)}  # fmt: skip
        return json.dumps(data, indent=1, sort_keys=True) + "\n"


def anatomy_for(model: ModelSpec) -> Anatomy:
    """The anatomy of `model`: from memory, the shipped entries or the cache, else built and cached.

    Raises:
        ConfigError, LoadError: as `glmdeploy.model.hf_config.hf_config_for` and
            `glmdeploy.model.skeleton.build_anatomy` (only when the anatomy must be built).
    """
    inputs = key_inputs(model)
    key = entry_key(inputs) if inputs is not None else None
    found = cached_anatomy(model, key=key)
    if found is not None:
        return found
    from glmdeploy.model.hf_config import hf_config_for
    from glmdeploy.model.skeleton import build_anatomy

    anatomy = build_anatomy(hf_config_for(model))
    if key is not None and inputs is not None:
        _MEMORY[key] = anatomy
        save_entry(CacheEntry(key, inputs, anatomy))
    return anatomy


def cached_anatomy(model: ModelSpec, *, key: str | None = None) -> Anatomy | None:
    """The anatomy of `model` if it is known without building it (no torch), else None."""
    if key is None:
        inputs = key_inputs(model)
        key = entry_key(inputs) if inputs is not None else None
    if key is None:
        return None
    if key not in _MEMORY:
        entry = load_entry(key)
        if entry is None:
            return None
        _MEMORY[key] = entry.anatomy
    return _MEMORY[key]


def forget() -> None:
    """Drop the anatomies held in memory (the files stay): the next lookup reads or builds."""
    _MEMORY.clear()


def load_entry(key: str) -> CacheEntry | None:
    """The entry of `key`, shipped or cached; None if there is none or it is unreadable."""
    for path in (SHIPPED_DIR / f"{key}.json", entry_path(key)):
        entry = _read(path, key)
        if entry is not None:
            return entry
    return None


def stored_extras(key: str, name: str) -> list[Any]:
    """`extras[name]` of the shipped entry of `key`, then of the user's, where present and readable
    (the anatomy itself is not parsed: this is cheap)."""
    found = []
    for path in (SHIPPED_DIR / f"{key}.json", entry_path(key)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") == FORMAT and data.get("key") == key:
                found.append(data["extras"][name])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return found


def save_extra(key: str, name: str, value: Any, fallback: CacheEntry) -> Path | None:
    """Store `extras[name] = value` in the user's entry of `key` (started from the shipped entry,
    else from `fallback`, when there is none); None if it cannot be written, as `save_entry`."""
    entry = _read(entry_path(key), key) or _read(SHIPPED_DIR / f"{key}.json", key) or fallback
    return save_entry(replace(entry, extras={**entry.extras, name: value}))


def save_entry(entry: CacheEntry) -> Path | None:
    """Write `entry` into the cache atomically; None (and nothing written) if that fails.

    A cache that cannot be written costs the next plan a rebuild; it never fails this one.
    """
    path = entry_path(entry.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, entry.to_json())
    except OSError:
        return None
    return path


def entry_path(key: str) -> Path:
    return cache_root() / "anatomy" / f"{key}.json"


def entry_key(inputs: Mapping[str, Any]) -> str:
    """The content address of an entry: sha256 of its inputs as canonical JSON."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def key_inputs(model: ModelSpec) -> dict[str, Any] | None:
    """What the anatomy of `model` depends on, read without torch or transformers.

    None when that cannot be told cheaply (no transformers installed, a checkpoint directory
    without a readable config.json): the anatomy is then built, and the builder reports why not.
    """
    versions = _versions()
    if versions is None:
        return None
    if model.architecture is not None:
        arch = model.architecture
        config = {"model_type": arch.model_type, **arch.to_hf_kwargs()}
        return {"format": ANATOMY_FORMAT, **versions, "config": config}
    directory = Path(model.source.path or "").expanduser()
    try:
        config_json = (directory / "config.json").read_bytes()
        # How the config is read: legacy ChatGLM code (read as text for rope_ratio) or remote code.
        code = {p.name: _sha256(p.read_bytes()) for p in sorted(directory.glob("*.py"))}
    except OSError:
        return None
    return {
        "format": ANATOMY_FORMAT,
        **versions,
        "config_json": _sha256(config_json),
        "code": code,
        "layout": str(checkpoint_layout(model)),  # as planning reads it (config.json decides)
        "trust_remote_code": model.source.trust_remote_code,
    }


def _read(path: Path, key: str) -> CacheEntry | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT or data.get("key") != key:
            return None
        anatomy = Anatomy.from_dict(data["anatomy"])
        return CacheEntry(key, dict(data["inputs"]), anatomy, dict(data.get("extras") or {}))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing or corrupt: rebuilt (and rewritten) by `anatomy_for`


@lru_cache(maxsize=1)
def _versions() -> dict[str, str] | None:
    try:
        return {name: importlib.metadata.version(name) for name in ("transformers", "torch")}
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
