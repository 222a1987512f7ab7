"""The transformers config of a model option: from its architecture facts or its checkpoint.

Legacy ChatGLM checkpoints get the native `GlmConfig` they convert to (their remote code never
runs). transformers is imported inside the functions, so planning code can import this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmdeploy.config.settings import Architecture, CheckpointLayout, ModelSpec, SourceKind
from glmdeploy.problems import ConfigError, LoadError, Problem

MODELING_SOURCE = "modeling_chatglm.py"  # read as text to tell how rope_ratio is used, never run


def config_from_architecture(architecture: Architecture) -> Any:
    """The `PretrainedConfig` of `architecture`, token ids its vocabulary lacks dropped.

    Family defaults (GLM's pad id 151329) exceed a small vocabulary; an out-of-range padding index
    makes `nn.Embedding` refuse to build.

    Raises:
        ConfigError: transformers cannot build a config for `architecture.model_type`.
    """
    from transformers import AutoConfig

    try:
        family = AutoConfig.for_model(architecture.model_type)  # the family's default token ids
        kwargs = architecture.to_hf_kwargs()
        kwargs.update(dict.fromkeys(stray_token_ids(family, architecture.vocab_size)))
        config = AutoConfig.for_model(architecture.model_type, **kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            [
                Problem(
                    "model.architecture.model_type",
                    f"transformers cannot build a config for {architecture.model_type!r}: "
                    + (str(exc).splitlines() or [type(exc).__name__])[0],
                    "a model_type known to the installed transformers",
                    "e.g. glm, glm4, llama, qwen2, glm4_moe",
                )
            ]
        ) from exc
    return config


def stray_token_ids(config: Any, vocab_size: int | None = None) -> list[str]:
    """The names among `pad_token_id`/`bos_token_id` whose value lies outside the vocabulary."""
    vocab = vocab_size if vocab_size is not None else getattr(config, "vocab_size", None)
    return [
        name
        for name in ("pad_token_id", "bos_token_id")
        if isinstance(vocab, int)
        and isinstance(value := getattr(config, name, None), int)
        and not 0 <= value < vocab
    ]


def without_stray_token_ids(config: Any) -> Any:
    """`config` with its `stray_token_ids` set to None (a config read from a checkpoint)."""
    for name in stray_token_ids(config):
        setattr(config, name, None)
    return config


def read_config_json(directory: Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict.

    Raises:
        LoadError: the directory or its config.json is missing, or the file is not a JSON object.
    """
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        what = "is not a directory" if Path(directory).exists() else "does not exist"
        raise LoadError([Problem(str(directory), f"the checkpoint directory {what}")])
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        hint = "a checkpoint directory needs the config.json it was published with"
        raise LoadError([Problem(str(path), "missing", hint=hint)]) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError([Problem(str(path), f"cannot read it: {exc}")]) from exc
    if not isinstance(config, dict):
        raise LoadError([Problem(str(path), "not a JSON object")])
    return config


def modeling_source(directory: Path) -> str | None:
    """The text of a legacy checkpoint's `modeling_chatglm.py`, if it has one (never executed)."""
    path = Path(directory) / MODELING_SOURCE
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def checkpoint_layout(model: ModelSpec) -> CheckpointLayout:
    """How the checkpoint names its tensors: `chatglm` when configured, or when a local
    checkpoint's config.json says `model_type: chatglm`; else `native`."""
    if model.source.layout is CheckpointLayout.CHATGLM:
        return CheckpointLayout.CHATGLM
    if model.source.kind is not SourceKind.LOCAL or not model.source.path:
        return CheckpointLayout.NATIVE
    from glmdeploy.model.legacy_chatglm import is_legacy_chatglm

    try:
        raw = read_config_json(Path(model.source.path).expanduser())
    except LoadError:  # reported where the config is read for planning
        return CheckpointLayout.NATIVE
    return CheckpointLayout.CHATGLM if is_legacy_chatglm(raw) else CheckpointLayout.NATIVE


def hf_config_for(model: ModelSpec) -> Any:
    """The transformers config in native names: from the architecture facts or the checkpoint.

    Raises:
        ConfigError: the architecture facts name an unknown model type.
        LoadError: the checkpoint's config.json cannot be read or understood.
    """
    if model.architecture is not None:
        return config_from_architecture(model.architecture)
    from transformers import AutoConfig, GlmConfig

    from glmdeploy.model.legacy_chatglm import is_legacy_chatglm, native_config_dict

    path = Path(model.source.path or "").expanduser()
    raw = read_config_json(path)
    config_file = path / "config.json"
    if is_legacy_chatglm(raw) or model.source.layout is CheckpointLayout.CHATGLM:
        native = native_config_dict(raw, modeling_source=modeling_source(path),
                                    source=str(config_file))  # fmt: skip
        native.pop("model_type", None)
        return GlmConfig(**native)
    try:
        return AutoConfig.from_pretrained(
            str(path), trust_remote_code=model.source.trust_remote_code
        )
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise LoadError(
            [
                Problem(
                    str(config_file),
                    f"transformers cannot read it: {exc}",
                    hint="set model.source.trust_remote_code=true only if you trust "
                    "the checkpoint's code, or give the architecture explicitly",
                )
            ]
        ) from exc
