"""The workspace model a plan uses: traced once per model, dtype, implementation and target, then
kept with the model's anatomy cache entry, so that planning it again imports no torch.

`workspace_for` looks in this process's memory, then in the shipped and the user's anatomy cache
entries (`CacheEntry.extras["workspace"]`: `{"format": WORKSPACE_FORMAT, "models": {key: …}}`,
keyed by `workspace_key`); failing that it traces (`glmdeploy.model.workspace_build`, which imports
torch and transformers) and stores the result in the user's entry, the formula fallback included
(a trace that failed fails again: remote code, eager experts). An entry whose workspace data is
missing, of another format or malformed is traced again. Without a live config (an anatomy that is
not the model's own, e.g. a synthetic one in tests) the formula is used and nothing is stored.
"""

from __future__ import annotations

import hashlib
from typing import Any

from glmdeploy.config.settings import Dtype, ModelSpec
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.anatomy_cache import (
    CacheEntry,
    cached_anatomy,
    entry_key,
    key_inputs,
    save_extra,
    stored_extras,
)
from glmdeploy.model.workspace import WORKSPACE_FORMAT, WorkspaceModel, formula_workspace
from glmdeploy.problems import GlmDeployError

EXTRA = "workspace"  # the name of the workspace data in `CacheEntry.extras`
_MEMORY: dict[tuple[str, str, str], WorkspaceModel] = {}  # (config hash, source, key) -> model


def workspace_key(
    dtype: Dtype, attn_implementation: str, experts_implementation: str | None, target: str
) -> str:
    """`bf16/sdpa/default/cuda`: what a workspace model is traced for (None experts: default)."""
    return f"{dtype}/{attn_implementation}/{experts_implementation or 'default'}/{target}"


def workspace_for(
    model: ModelSpec,
    anatomy: Anatomy,
    dtype: Dtype,
    *,
    target: str,
    attn_implementation: str = "sdpa",
    experts_implementation: str | None = None,
) -> WorkspaceModel:
    """The workspace model of `anatomy` (the anatomy of `model`) for these implementations.

    Args:
        model: the model option; its anatomy cache entry holds the traced models.
        anatomy: the model's anatomy (`glmdeploy.model.anatomy_cache.anatomy_for`), or any anatomy
            built with its live config (traced, not stored).
        dtype: the resolved compute dtype.
        target: `cuda` (the plan has GPUs, declared or probed) or `cpu` (a CPU-only plan).
        attn_implementation, experts_implementation: as `from_pretrained` gets them (the loader
            passes neither: transformers' defaults, `sdpa` and `grouped_mm` where supported).
    """
    wkey = workspace_key(dtype, attn_implementation, experts_implementation, target)
    key = _entry_key(model)
    known = cached_anatomy(model, key=key) if key is not None else None
    own = (
        known is not None
        and known.config_hash == anatomy.config_hash
        and (known is anatomy or anatomy.hf_config is None)
    )
    if not own and anatomy.hf_config is None:  # nothing to trace it from (nor to key it by)
        note = "no live model config to trace (not the model's own anatomy); historical formula"
        return formula_workspace(anatomy, dtype, attn_implementation, note=note)
    source = key if own and key is not None else _config_digest(anatomy)
    memo = (anatomy.config_hash, source, wkey)
    if memo in _MEMORY:
        return _MEMORY[memo]
    found = _stored(key, wkey) if own and key is not None else None
    if found is None:
        found = _build(model, anatomy, dtype, wkey, own, key,
                       attn_implementation, experts_implementation, target)  # fmt: skip
    _MEMORY[memo] = found
    return found


def forget() -> None:
    """Drop the workspace models held in memory (the cache files stay)."""
    _MEMORY.clear()


def _build(
    model: ModelSpec,
    anatomy: Anatomy,
    dtype: Dtype,
    wkey: str,
    own: bool,
    key: str | None,
    attn_implementation: str,
    experts_implementation: str | None,
    target: str,
) -> WorkspaceModel:
    config = anatomy.hf_config
    if config is None:  # the model's own anatomy, read from the cache
        from glmdeploy.model.hf_config import hf_config_for

        try:
            config = hf_config_for(model)
        except GlmDeployError as exc:  # e.g. the checkpoint moved since: not stored
            note = f"its config cannot be read ({exc}); historical formula, not exact"
            return formula_workspace(anatomy, dtype, attn_implementation, note=note)
    from dataclasses import replace

    from glmdeploy.model.workspace_build import build_workspace

    built = build_workspace(
        replace(anatomy, hf_config=config),
        dtype,
        attn_implementation=attn_implementation,
        experts_implementation=experts_implementation,
        target=target,
    )
    if own and key is not None:
        _store(key, wkey, built, CacheEntry(key, key_inputs(model) or {}, anatomy))
    return built


def _stored(key: str, wkey: str) -> WorkspaceModel | None:
    """The stored model for `wkey`: the shipped entry's, else the user's; None if unreadable."""
    for extra in stored_extras(key, EXTRA):
        try:
            if extra["format"] == WORKSPACE_FORMAT and wkey in extra["models"]:
                return WorkspaceModel.from_dict(extra["models"][wkey])
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # malformed: traced again and rewritten
    return None


def _store(key: str, wkey: str, model: WorkspaceModel, fallback: CacheEntry) -> None:
    models: dict[str, Any] = {}
    for extra in stored_extras(key, EXTRA):  # shipped, then the user's: the user's win
        found = extra.get("models") if isinstance(extra, dict) else None
        if isinstance(found, dict) and extra.get("format") == WORKSPACE_FORMAT:
            models.update(found)
    models[wkey] = model.to_dict()
    save_extra(key, EXTRA, {"format": WORKSPACE_FORMAT, "models": models}, fallback)


def _entry_key(model: ModelSpec) -> str | None:
    inputs = key_inputs(model)
    return entry_key(inputs) if inputs is not None else None


def _config_digest(anatomy: Anatomy) -> str:
    """What identifies an anatomy that is not its model's own: its live config, in full."""
    config = anatomy.hf_config
    text = (
        config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    )
    return hashlib.sha256(text.encode()).hexdigest()
