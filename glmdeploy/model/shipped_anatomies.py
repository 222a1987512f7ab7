"""The precomputed anatomies of the shipped model options (`conf/model/*.yaml` with architectures).

They are anatomy cache entries (`glmdeploy.model.anatomy_cache`) stored as package data in
`glmdeploy/model/anatomies/`, with the traced workspaces (`glmdeploy.model.workspace_cache`) a plan
of them needs by default (transformers' default implementations, every dtype, CUDA and CPU targets),
so that the first plan of a shipped model option needs no torch. Their keys include the
transformers and torch versions, so they serve the versions in `constraints.txt`; with other
versions they are simply not found, and the anatomy is built and cached as usual. Regenerate them
after changing a model option, the skeleton, the tracer or the pinned versions:

    python -m glmdeploy.model.shipped_anatomies

A test checks that they equal freshly built anatomies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from glmdeploy.config.locations import SHIPPED_CONF_DIR
from glmdeploy.config.settings import Architecture, Dtype, ModelSource, ModelSpec, SourceKind
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.anatomy_cache import SHIPPED_DIR, CacheEntry, entry_key, key_inputs
from glmdeploy.model.workspace import WORKSPACE_FORMAT
from glmdeploy.model.workspace_cache import EXTRA, workspace_key

SHIPPED_DTYPES = (Dtype.BF16, Dtype.FP16, Dtype.FP32)
SHIPPED_TARGETS = ("cuda", "cpu")


def shipped_models(conf_dir: Path = SHIPPED_CONF_DIR) -> dict[str, ModelSpec]:
    """The shipped model options that carry architecture facts, by option name."""
    found: dict[str, ModelSpec] = {}
    for path in sorted((conf_dir / "model").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if data.get("architecture"):
            arch = Architecture(**data["architecture"])
            found[path.stem] = ModelSpec(path.stem, ModelSource(SourceKind.NONE), arch)
    return found


def build_entries() -> dict[str, CacheEntry]:
    """A freshly built cache entry per shipped model option (imports torch and transformers)."""
    from glmdeploy.model.hf_config import hf_config_for
    from glmdeploy.model.skeleton import anatomy_from_config

    entries: dict[str, CacheEntry] = {}
    for name, model in shipped_models().items():
        inputs = key_inputs(model)
        if inputs is None:
            raise RuntimeError("transformers and torch must be installed to build anatomies")
        anatomy = anatomy_from_config(hf_config_for(model))
        extras = {EXTRA: shipped_workspaces(anatomy)}
        entries[name] = CacheEntry(entry_key(inputs), inputs, anatomy, extras)
    return entries


def shipped_workspaces(anatomy: Anatomy) -> dict[str, object]:
    """The workspace models a shipped entry carries (`anatomy` with its live config)."""
    from glmdeploy.model.workspace_build import build_workspaces

    models = {}
    for dtype in SHIPPED_DTYPES:
        built = build_workspaces(anatomy, dtype, SHIPPED_TARGETS)
        for target, model in zip(SHIPPED_TARGETS, built, strict=True):
            models[workspace_key(dtype, "sdpa", None, target)] = model.to_dict()
    return {"format": WORKSPACE_FORMAT, "models": models}


def write_shipped(directory: Path = SHIPPED_DIR) -> list[Path]:
    """Rebuild every shipped entry into `directory`; entries no option needs are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = build_entries()
    written = []
    for entry in entries.values():
        path = directory / f"{entry.key}.json"
        path.write_text(entry.to_json(), encoding="utf-8")
        written.append(path)
    for stale in set(directory.glob("*.json")) - set(written):
        stale.unlink()
    return written


if __name__ == "__main__":
    for written_path in write_shipped():
        print(written_path, file=sys.stdout)
