"""Which checkpoint vLLM is given for a model option, and what vLLM sees in it.

vLLM runs legacy ChatGLM2/3 and GLM-4-chat checkpoints (`model_type: chatglm`) with its own model
code (`chatglm.ChatGLMForCausalLM`) and its own config class, so it gets the original checkpoint,
never glmdeploy's converted copy. Their tokenizer is still remote code (`tokenization_chatglm.py`,
loaded by `AutoTokenizer`), so vLLM needs `trust-remote-code`; glmdeploy never switches it on by
itself. An embedded model is materialised to glmdeploy's cache and has no tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmdeploy.config.settings import CheckpointLayout, Deployment, Dtype, SourceKind
from glmdeploy.engines.vllm.facts import IMPLEMENTATIONS, Implementation
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.hf_config import read_config_json

_DTYPES = {"bfloat16": Dtype.BF16, "float16": Dtype.FP16, "float32": Dtype.FP32}
_CHATGLM_TOKENIZER = (
    "its tokenizer is remote code (ChatGLMTokenizer in tokenization_chatglm.py, named by the "
    "checkpoint's auto_map): vLLM reads the config with its own ChatGLMConfig, but loads the "
    "tokenizer with AutoTokenizer, which refuses it without trust_remote_code"
)


@dataclass(frozen=True)
class VllmCheckpoint:
    """What `vllm serve` is pointed at, and the facts vLLM will read from it.

    Attributes:
        model: the directory or hub id for vLLM's `model:` key (None: plan-only, no checkpoint).
        revision: the pinned hub revision, if any.
        architecture: the `architectures[0]` vLLM sees (`ChatGLMModel` for legacy ChatGLM).
        model_type: the `model_type` vLLM sees (`chatglm` for legacy ChatGLM).
        remote_code: why vLLM must run the checkpoint's own code (empty: it need not).
        config_dtype: the checkpoint's `torch_dtype`, when glmdeploy can read it.
        quant_method: `quantization_config.quant_method` of a pre-quantised checkpoint.
        tokenizer: whether the checkpoint has a tokenizer (no: vLLM serves token ids only).
        notes: what the user should know about this choice.
    """

    model: str | None
    revision: str | None
    architecture: str
    model_type: str
    remote_code: tuple[str, ...] = ()
    config_dtype: Dtype | None = None
    quant_method: str | None = None
    tokenizer: bool = True
    notes: tuple[str, ...] = ()

    @property
    def implementation(self) -> Implementation | None:
        return IMPLEMENTATIONS.get(self.architecture)


def vllm_checkpoint(deployment: Deployment, anatomy: Anatomy) -> VllmCheckpoint:
    """The checkpoint vLLM gets for `deployment.model` (`anatomy` is its native skeleton)."""
    src = deployment.model.source
    legacy = src.layout is CheckpointLayout.CHATGLM
    arch, kind = (anatomy.model_class, anatomy.model_type)
    if src.kind is SourceKind.NONE:
        return VllmCheckpoint(None, None, arch, kind, notes=("plan only: no checkpoint",))
    if src.kind is SourceKind.EMBEDDED:
        from glmdeploy.loading.embedded import materialize

        assert deployment.model.architecture is not None  # validation requires it
        path = materialize(deployment.model.architecture, src.seed)
        local = _local(path, arch, kind)
        note = f"the embedded model {deployment.model.name} is materialised at {path}"
        return dataclasses.replace(local, notes=(note, *local.notes))
    if src.kind is SourceKind.HUB:
        notes: list[str] = []
        if legacy:
            arch, kind = "ChatGLMModel", "chatglm"
            notes.append(_legacy_note(str(src.hub_id)))
            if "glm-4-9b-chat" in str(src.hub_id):
                notes.append(
                    "model=glm-4-9b-chat-hf is the same model in transformers' format: "
                    "no remote code at all"
                )
        reasons = (_CHATGLM_TOKENIZER,) if legacy else ()
        return VllmCheckpoint(src.hub_id, src.revision, arch, kind, reasons, notes=tuple(notes))
    return _local(Path(src.path or "").expanduser().resolve(), arch, kind)


def _local(path: Path, arch: str, kind: str) -> VllmCheckpoint:
    raw = read_config_json(path)
    architectures = raw.get("architectures") or [arch]
    model_type = str(raw.get("model_type", kind))
    reasons: list[str] = []
    notes: list[str] = []
    if model_type == "chatglm":
        reasons.append(_CHATGLM_TOKENIZER)
        notes.append(_legacy_note(str(path)))
    tokenizer_config = _json(path / "tokenizer_config.json")
    auto_map = tokenizer_config.get("auto_map") if tokenizer_config else None
    if auto_map and model_type != "chatglm":
        reasons.append(f"tokenizer_config.json maps AutoTokenizer to remote code ({auto_map})")
    quant = raw.get("quantization_config")
    dtype = _DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or ""))
    has_tokenizer = any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if not has_tokenizer:
        notes.append("no tokenizer files: vLLM runs with skip-tokenizer-init (token ids only)")
    return VllmCheckpoint(
        str(path),
        None,
        str(architectures[0]),
        model_type,
        tuple(reasons),
        dtype,
        str(quant.get("quant_method")) if isinstance(quant, dict) else None,
        has_tokenizer,
        tuple(notes),
    )


def _legacy_note(where: str) -> str:
    return (
        f"vLLM runs ChatGLM with its own model code (chatglm.ChatGLMForCausalLM): it gets the "
        f"original checkpoint {where}, not glmdeploy's converted copy"
    )


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
