"""The mapping from legacy ChatGLM2/3 and GLM-4-chat checkpoints to transformers' `GlmForCausalLM`.

Config keys and tensors (module names: `glmdeploy.model.chatglm_names`); torch is imported inside
the functions that convert tensors.

Facts this module relies on (checked against the remote `modeling_chatglm.py` files and
transformers 5.24's `modeling_glm.py`):

- Both rotate the first half of each head's dims as interleaved pairs `(x[2i], x[2i+1])`, so the
  q/k rows need no permutation; the fused `dense_h_to_4h` is `[gate; up]` in both.
- The remote code's `rotary_pos_emb.inv_freq` buffer is always built with base 10000 and never read
  by its forward pass. `rope_ratio` multiplies the base in ChatGLM3-6B-32k/128k and GLM-4-9b-chat
  (`base = base * self.rope_ratio`) but divides the positions in ChatGLM2-6B-32k
  (`seq_idx / self.rope_ratio`, i.e. linear scaling).
- `original_rope`, `apply_query_key_layer_scaling` and `attention_softmax_in_fp32` do not change
  what the remote code computes, so they are accepted whatever their value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from glmdeploy.model.chatglm_names import BLOCK_PATTERNS, LEGACY, V1, lookup
from glmdeploy.problems import LoadError, Problem

if TYPE_CHECKING:
    import torch

INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
_OWNS_WEIGHT = re.compile(r"(embed_tokens|norm|lm_head|layernorm|o_proj|gate_up_proj|down_proj)$")


def is_legacy_chatglm(config: Mapping[str, Any]) -> bool:
    """Whether a config.json describes a remote-code ChatGLM checkpoint (`model_type: chatglm`)."""
    return config.get("model_type") == "chatglm"


_REQUIRED = ("padded_vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
             "num_attention_heads", "kv_channels", "seq_length")  # fmt: skip
# key: (ChatGLMConfig's default, the value GlmForCausalLM cannot represent, what that value means)
_UNSUPPORTED: dict[str, tuple[bool, bool, str]] = {
    "rmsnorm": (True, False, "LayerNorm; GlmForCausalLM has only RMSNorm"),
    "post_layer_norm": (True, False, "no final norm; GlmForCausalLM always applies `model.norm`"),
    "apply_residual_connection_post_layernorm": (
        False, True, "residuals after the layer norm; GlmForCausalLM adds them before it"),
    "add_bias_linear": (False, True, "biases on dense and MLP layers; GlmForCausalLM has none"),
}  # fmt: skip
_V1_MESSAGE = f"a {V1} config (2D positions, GELU, scaled residuals): no native architecture"
_ROPE_UNKNOWN = (
    "cannot tell whether rope_ratio scales the rotary base (ChatGLM3-32k/128k, GLM-4-chat) or "
    "the positions (ChatGLM2-6B-32k)"
)
_ROPE_HINT = (
    "keep the checkpoint's modeling_chatglm.py beside config.json (glmdeploy reads it, never runs "
    "it), or set `_name_or_path` to the hub id, e.g. THUDM/chatglm3-6b-32k"
)


def _rope_ratio_scales_base(legacy: Mapping[str, Any], modeling_source: str | None) -> bool | None:
    """True: rope_ratio multiplies the base; False: it divides positions; None: cannot tell."""
    if modeling_source is not None:
        base = re.search(r"base\s*=\s*base\s*\*\s*self\.rope_ratio", modeling_source) is not None
        positions = re.search(r"/\s*self\.rope_ratio", modeling_source) is not None
        if base != positions:
            return base
    name = str(legacy.get("_name_or_path", "")).lower()
    if re.search(r"chatglm2|codegeex2", name):
        return False
    if re.search(r"chatglm3|glm-?4|codegeex4", name):
        return True
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _structure_problems(legacy: Mapping[str, Any], source: str) -> list[Problem]:
    """What makes a legacy config unreadable or not representable natively (rope aside)."""
    if "position_encoding_2d" in legacy or "inner_hidden_size" in legacy:
        hint = "glmdeploy converts ChatGLM2, ChatGLM3 and GLM-4-chat checkpoints"
        return [Problem(f"{source}:model_type", _V1_MESSAGE, hint=hint)]
    problems = [
        Problem(f"{source}:{key}", "missing" if key not in legacy else repr(legacy[key]),
                "a positive integer")
        for key in _REQUIRED
        if not _positive_int(legacy.get(key))
    ]  # fmt: skip
    for key, (default, bad, meaning) in _UNSUPPORTED.items():
        if legacy.get(key, default) == bad:
            problems.append(Problem(f"{source}:{key}", f"{str(bad).lower()}: {meaning}"))
    if legacy.get("quantization_bit") not in (None, 0):
        hint = "convert the unquantized checkpoint and quantize with glmdeploy's precision group"
        problems.append(Problem(f"{source}:quantization_bit", "quantized weights", hint=hint))
    if legacy.get("pre_seq_len") is not None:
        message = "a P-tuning v2 prefix encoder, which GlmForCausalLM cannot run"
        problems.append(Problem(f"{source}:pre_seq_len", message, hint="use the base checkpoint"))
    heads: Any = legacy.get("num_attention_heads")
    groups: Any = legacy.get("multi_query_group_num")
    if legacy.get("multi_query_attention", False) and not (
        _positive_int(groups) and (not _positive_int(heads) or heads % groups == 0)
    ):
        expected = f"a positive divisor of num_attention_heads ({heads})"
        problems.append(Problem(f"{source}:multi_query_group_num", repr(groups), expected))
    if _positive_int(legacy.get("kv_channels")) and legacy["kv_channels"] % 4:
        hint = "its rotary half must hold whole pairs of dims"
        problems.append(Problem(f"{source}:kv_channels", "not a multiple of 4", hint=hint))
    return problems


def native_config_dict(
    legacy: Mapping[str, Any], *, modeling_source: str | None = None, source: str = "config.json"
) -> dict[str, Any]:
    """The native `GlmConfig` keyword arguments (and config.json) for a legacy config.

    Args:
        legacy: the checkpoint's config.json.
        modeling_source: the text of the checkpoint's `modeling_chatglm.py`, if present; read (never
            run) only to tell how `rope_ratio` is applied.
        source: the config's path, for problem locations (`<source>:<key>`).

    Raises:
        LoadError: keys missing or invalid, or values the native architecture cannot represent.
    """
    problems = _structure_problems(legacy, source)
    ratio = legacy.get("rope_ratio", 1)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio <= 0:
        problems.append(Problem(f"{source}:rope_ratio", repr(ratio), "a positive number"))
    elif ratio != 1:
        scales_base = _rope_ratio_scales_base(legacy, modeling_source)
        if scales_base is None:
            problems.append(Problem(f"{source}:rope_ratio", _ROPE_UNKNOWN, hint=_ROPE_HINT))
        elif scales_base:
            rope["rope_theta"] = 10000.0 * ratio
        else:
            rope.update(rope_type="linear", factor=float(ratio))
    if problems:
        raise LoadError(problems)
    heads = legacy["num_attention_heads"]
    native: dict[str, Any] = {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "vocab_size": legacy["padded_vocab_size"],
        "hidden_size": legacy["hidden_size"],
        "intermediate_size": legacy["ffn_hidden_size"],
        "num_hidden_layers": legacy["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": legacy["multi_query_group_num"]
        if legacy.get("multi_query_attention", False)
        else heads,
        "head_dim": legacy["kv_channels"],
        "hidden_act": "silu",
        "attention_bias": bool(legacy.get("add_qkv_bias", False)),
        "attention_dropout": float(legacy.get("attention_dropout", 0.0)),
        "rms_norm_eps": float(legacy.get("layernorm_epsilon", 1e-5)),
        "max_position_embeddings": legacy["seq_length"],
        "rope_parameters": {**rope, "partial_rotary_factor": 0.5},
        "tie_word_embeddings": bool(legacy.get("tie_word_embeddings", False)),
        "use_cache": bool(legacy.get("use_cache", True)),
    }
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if legacy.get(key) is not None:
            native[key] = legacy[key]
    if legacy.get("torch_dtype") is not None:
        native["dtype"] = legacy["torch_dtype"]
    return native


def _qkv_rows(legacy: Mapping[str, Any]) -> tuple[int, int]:
    """(query rows, key/value rows each) of the fused query_key_value projection."""
    heads, head_dim = legacy["num_attention_heads"], legacy["kv_channels"]
    groups = legacy["multi_query_group_num"] if legacy.get("multi_query_attention") else heads
    return heads * head_dim, groups * head_dim


def expected_legacy_shapes(legacy: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a legacy checkpoint with this (valid) config holds, with its shape.

    The optional `transformer.rotary_pos_emb.inv_freq` buffer is not included.
    """
    hidden, ffn = legacy["hidden_size"], legacy["ffn_hidden_size"]
    vocab = legacy["padded_vocab_size"]
    q_rows, kv_rows = _qkv_rows(legacy)
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (vocab, hidden),
        "transformer.encoder.final_layernorm.weight": (hidden,),
        "transformer.output_layer.weight": (vocab, hidden),
    }
    for i in range(legacy["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "self_attention.query_key_value.weight"] = (q_rows + 2 * kv_rows, hidden)
        if legacy.get("add_qkv_bias", False):
            shapes[p + "self_attention.query_key_value.bias"] = (q_rows + 2 * kv_rows,)
        shapes[p + "self_attention.dense.weight"] = (hidden, q_rows)
        shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * ffn, hidden)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (hidden, ffn)
    return shapes


def check_tensors(
    shapes: Mapping[str, Sequence[int]],
    legacy: Mapping[str, Any],
    *,
    files: Mapping[str, str] | None = None,
    config_path: str = "config.json",
) -> None:
    """Check a legacy checkpoint's tensor names and shapes against its (valid) config.

    Args:
        shapes: tensor name -> shape, as the checkpoint holds them.
        legacy: the checkpoint's config.json.
        files: tensor name -> weight file, for problem locations.
        config_path: the config's path, for problem locations.

    Raises:
        LoadError: tensors missing, unexpected or of the wrong shape; all listed at once.
    """
    where = files or {}
    expected = expected_legacy_shapes(legacy)
    layers = legacy["num_layers"]
    problems: list[Problem] = []
    missing = sorted(expected.keys() - shapes.keys())
    if missing:
        message = f"the weights lack {_few(missing)}, which this config implies"
        hint = "check num_layers and the sizes in config.json, and that the shards belong together"
        problems.append(Problem(config_path, message, hint=hint))
    unexpected: dict[str, list[str]] = {}
    for name in sorted(shapes.keys() - expected.keys() - {INV_FREQ}):
        unexpected.setdefault(where.get(name, config_path), []).append(name)
    for path, names in sorted(unexpected.items()):
        beyond = any(
            (m := BLOCK_PATTERNS[LEGACY].match(n)) and int(m.group(1)) >= layers for n in names
        )
        hint = f"{config_path} says num_layers: {layers}, but the weights have more layers"
        if not beyond:
            hint = "is this a ChatGLM2, ChatGLM3 or GLM-4-chat checkpoint?"
        problems.append(Problem(path, f"unexpected tensors {_few(names)}", hint=hint))
    wrong = [n for n in sorted(expected.keys() & shapes.keys()) if tuple(shapes[n]) != expected[n]]
    for name in wrong[:8]:
        message = f"`{name}` has shape {list(shapes[name])}"
        expected_shape = f"{list(expected[name])}, from {config_path}"
        problems.append(Problem(where.get(name, config_path), message, expected_shape))
    if len(wrong) > 8:
        problems.append(Problem(config_path, f"{len(wrong) - 8} more tensors of the wrong shape"))
    if problems:
        raise LoadError(problems)


def _few(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_inv_freq(tensor: torch.Tensor, legacy: Mapping[str, Any]) -> None:
    import torch

    dim = legacy["kv_channels"] // 2  # as the remote code's RotaryEmbedding.__init__ builds it
    expected = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    # The remote code computes the buffer in the model's dtype (often fp16/bf16, then saved as
    # fp32): allow that rounding; another base (e.g. 10000 * rope_ratio) is off by far more.
    if tensor.shape != expected.shape or not torch.allclose(tensor.double(), expected, rtol=2e-2):
        message = (
            "not the base-10000 buffer ChatGLM's code builds: the checkpoint uses another rope base"
        )
        hint = "this checkpoint was not made by the published ChatGLM modeling code"
        raise LoadError([Problem(INV_FREQ, message, hint=hint)])


def native_tensors(
    name: str, tensor: torch.Tensor, legacy: Mapping[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    """The native tensors for one legacy tensor (`query_key_value` gives three, `inv_freq` none).

    Split tensors are views of `tensor`.

    Raises:
        LoadError: a name outside the legacy layout, or an `inv_freq` of another rope base.
    """
    if name == INV_FREQ:
        _check_inv_freq(tensor, legacy)
        return []
    module, _, kind = name.rpartition(".")
    found = lookup(module)
    is_legacy = found is not None and found[0] == LEGACY
    native = found[1] if found is not None and is_legacy else None
    if native is not None and kind == "weight" and _OWNS_WEIGHT.search(native):
        return [(f"{native}.weight", tensor)]
    if not (is_legacy and module.endswith(".query_key_value") and kind in ("weight", "bias")):
        raise LoadError([Problem(name, "not a tensor of the ChatGLM2/ChatGLM3 layout")])
    attn = module.replace("transformer.encoder.", "model.").replace(
        "self_attention.query_key_value", "self_attn"
    )
    q_rows, kv_rows = _qkv_rows(legacy)
    rest = tuple(tensor.shape[1:])
    if legacy.get("multi_query_attention", False):
        parts = [tensor[:q_rows], tensor[q_rows : q_rows + kv_rows], tensor[q_rows + kv_rows :]]
    else:  # rows are [q; k; v] per head: the remote code views them as (heads, 3 * head_dim)
        grouped = tensor.reshape(legacy["num_attention_heads"], 3, legacy["kv_channels"], *rest)
        parts = [grouped[:, i].reshape(q_rows, *rest) for i in range(3)]
    return [(f"{attn}.{p}_proj.{kind}", t) for p, t in zip("qkv", parts, strict=True)]


def iter_native_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], legacy: Mapping[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Convert `(name, tensor)` pairs one at a time (each name is checked, completeness is not)."""
    for name, tensor in tensors:
        yield from native_tensors(name, tensor, legacy)


def convert_state_dict(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    legacy: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """A native `GlmForCausalLM` state dict from a complete legacy one.

    Args:
        tensors: the legacy state dict, or an iterator of `(name, tensor)` pairs.
        legacy: the checkpoint's config.json.

    Raises:
        LoadError: a config the native architecture cannot represent, or tensors that do not
            match it (see `check_tensors`).
    """
    problems = _structure_problems(legacy, "config.json")
    if problems:
        raise LoadError(problems)
    state = dict(tensors.items() if isinstance(tensors, Mapping) else tensors)
    check_tensors({n: tuple(t.shape) for n, t in state.items()}, legacy)
    return dict(iter_native_tensors(state.items(), legacy))
