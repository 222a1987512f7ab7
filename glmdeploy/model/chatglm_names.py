"""Module names across ChatGLM generations and transformers' native `GlmForCausalLM`.

Imports nothing heavy: explicit-map checking (planning) uses it to recognise names of another
generation (ChatGLM2/3 remote code, ChatGLM-6B v1, the seed guide's misspelling) and say what the
right native name is.
"""

from __future__ import annotations

import re

LEGACY = "ChatGLM2/ChatGLM3 (remote-code)"
V1 = "ChatGLM-6B (v1)"

_TOP: dict[str, tuple[str, str]] = {  # legacy module -> (generation, native module)
    "transformer.embedding": (LEGACY, "model.embed_tokens"),
    "transformer.embedding.word_embeddings": (LEGACY, "model.embed_tokens"),
    "transformer.encoder.layers": (LEGACY, "model.layers"),
    "transformer.encoder.final_layernorm": (LEGACY, "model.norm"),
    "transformer.output_layer": (LEGACY, "lm_head"),
    "transformer.rotary_pos_emb": (LEGACY, "model.rotary_emb"),
    "transformer.word_embeddings": (V1, "model.embed_tokens"),
    "transformer.layers": (V1, "model.layers"),
    "transformer.final_layernorm": (V1, "model.norm"),
}
BLOCK_PATTERNS = {
    LEGACY: re.compile(r"transformer\.encoder\.layers\.(\d+)(?:\.(.+))?$"),
    V1: re.compile(r"transformer\.layers\.(\d+)(?:\.(.+))?$"),
}
_CHILDREN: dict[str, str | None] = {  # block child -> native child (None: no single counterpart)
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "self_attention": "self_attn",  # v1 calls it `attention`
    "self_attention.dense": "self_attn.o_proj",
    "self_attention.query_key_value": None,  # split into q_proj, k_proj, v_proj
    "mlp": "mlp",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
_SEED_TYPO = "transformer.final_layer_norm"  # the seed guide's name; no generation has it
_TO_LEGACY = {native: old for old, (gen, native) in _TOP.items() if gen == LEGACY}
_TO_LEGACY["model.embed_tokens"] = "transformer.embedding.word_embeddings"
_CHILDREN_TO_LEGACY = {native: old for old, native in _CHILDREN.items() if native}
_CHILDREN_TO_LEGACY.update({f"self_attn.{p}_proj": "self_attention.query_key_value" for p in "qkv"})


def lookup(name: str) -> tuple[str, str | None] | None:
    """(generation, native name or None) for a legacy, v1 or seed-guide module name."""
    if name in _TOP:
        return _TOP[name]
    if name == _SEED_TYPO:
        return "seed guide", "model.norm"
    for generation, pattern in BLOCK_PATTERNS.items():
        if m := pattern.match(name):
            child = m.group(2) or ""
            if generation == V1:
                child = re.sub(r"^attention\b", "self_attention", child)
            if child and child not in _CHILDREN:
                return None
            native = _CHILDREN[child] if child else ""
            if native is None:
                return generation, None
            return generation, f"model.layers.{m.group(1)}" + (f".{native}" if native else "")
    return None


def legacy_module_to_native(name: str) -> str | None:
    """The native `GlmForCausalLM` module for a ChatGLM2/3, ChatGLM-6B (v1) or seed-guide name.

    Returns None for names that are not legacy names or have no single native module (the fused
    `query_key_value` becomes three modules).
    """
    found = lookup(name)
    return found[1] if found else None


def checkpoint_module_to_native(name: str) -> str | None:
    """The native module for a ChatGLM2/3 checkpoint's own module name, or None (a name of
    another generation, no single native module, or not a legacy name at all)."""
    found = lookup(name)
    return found[1] if found is not None and found[0] == LEGACY else None


def native_module_to_legacy(name: str) -> str | None:
    """The ChatGLM2/3 remote-code module for a native `GlmForCausalLM` module name, or None."""
    if name in _TO_LEGACY:
        return _TO_LEGACY[name]
    m = re.match(r"model\.layers\.(\d+)(?:\.(.+))?$", name)
    child = m.group(2) if m else None
    if m is None or (child is not None and child not in _CHILDREN_TO_LEGACY):
        return None
    block = f"transformer.encoder.layers.{m.group(1)}"
    return f"{block}.{_CHILDREN_TO_LEGACY[child]}" if child else block


def module_name_hint(name: str, *, legacy_checkpoint: bool = False) -> str | None:
    """A sentence for a module name from another ChatGLM generation, or None for other names.

    Example: "`transformer.layers.0` is a ChatGLM-6B (v1) name; in this model it is
    `model.layers.0`". For a ChatGLM2/3 checkpoint (`legacy_checkpoint`), whose own names are
    accepted too, it gives the checkpoint's name as well.
    """
    found = lookup(name)
    if found is None:
        return None
    generation, native = found
    names = _names(native, legacy_checkpoint)
    if generation == "seed guide":
        return (
            f"`{name}` exists in no ChatGLM generation (a misspelling of "
            f"`transformer.final_layernorm`); in this model it is {names}"
        )
    if native is None:
        block = re.sub(r"^transformer\.(encoder\.)?layers\.(\d+).*", r"model.layers.\2", name)
        return (
            f"`{name}` is a {generation} name; in this model it is split into "
            f"`{block}.self_attn.q_proj`, `k_proj` and `v_proj` (inside the block `{block}`)"
        )
    return f"`{name}` is a {generation} name; in this model it is {names}"


def _names(native: str | None, legacy_checkpoint: bool) -> str:
    own = native_module_to_legacy(native or "") if legacy_checkpoint else None
    return f"`{own}` (native `{native}`)" if own else f"`{native}`"
