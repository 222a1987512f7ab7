"""The meta-device skeleton: forward order, sizes per dtype, tied groups, caching, speed."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from glmdeploy.config.settings import Dtype, Quantization
from glmdeploy.model import skeleton
from glmdeploy.model.anatomy import Tally
from glmdeploy.model.skeleton import build_anatomy

TINY: dict[str, dict[str, Any]] = {
    "glm": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                pad_token_id=None),
    "glm4": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                 pad_token_id=None),
    "llama": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "glm4_moe": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4,
                     moe_intermediate_size=32, num_experts_per_tok=2, n_shared_experts=1,
                     first_k_dense_replace=1, pad_token_id=None),
}  # fmt: skip


def config(model_type: str, **overrides: Any) -> Any:
    return AutoConfig.for_model(model_type, **{**TINY[model_type], **overrides})


def real_bytes(model: torch.nn.Module, prefix: str) -> int:
    tensors = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()]
               if n == prefix or n.startswith(prefix + ".")}  # fmt: skip
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_forward_order_is_traced_and_matches_the_data_flow(model_type: str) -> None:
    anatomy = build_anatomy(config(model_type))
    layers = TINY[model_type]["num_hidden_layers"]
    expected = (
        "model.embed_tokens",
        "model.rotary_emb",
        *(f"model.layers.{i}" for i in range(layers)),
        "model.norm",
        "lm_head",
    )
    assert anatomy.order_source == "traced"
    assert anatomy.names == expected
    assert [u.layer_index for u in anatomy.blocks] == list(range(layers))
    assert {u.kind for u in anatomy.units} == {"embedding", "rotary", "block", "norm", "head"}
    assert anatomy.containers == ("model", "model.layers")


def test_structural_order_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skeleton, "_trace_order", lambda *args: None)
    anatomy = skeleton.anatomy_from_config(config("llama"))
    assert anatomy.order_source == "structural"
    assert anatomy.names[0] == "model.embed_tokens" and anatomy.names[-1] == "lm_head"
    assert [u.name for u in anatomy.blocks] == [f"model.layers.{i}" for i in range(3)]


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [(Dtype.FP32, torch.float32), (Dtype.BF16, torch.bfloat16), (Dtype.FP16, torch.float16)],
)
def test_unit_bytes_equal_the_bytes_of_a_real_model(
    model_type: str, dtype: Dtype, torch_dtype: torch.dtype
) -> None:
    anatomy = build_anatomy(config(model_type))
    model = AutoModelForCausalLM.from_config(config(model_type), dtype=torch_dtype)
    for unit in anatomy.units:
        if unit.kind == "head" and anatomy.tied_groups:
            assert unit.bytes(dtype) == 0  # counted with the embedding it is tied to
            continue
        assert unit.bytes(dtype) == real_bytes(model, unit.name), unit.name
    assert anatomy.n_params == sum(p.numel() for p in model.parameters())


def test_moe_router_stays_fp32_and_experts_are_in_the_block() -> None:
    anatomy = build_anatomy(config("glm4_moe"))
    dense, moe = anatomy.blocks[0], anatomy.blocks[1]
    assert dense.params.fp32 == 0
    assert moe.params.fp32 == 4 * 64  # the router weight (experts × hidden), created in fp32
    assert moe.other_buffers.fp32 + moe.persistent_buffers.fp32 == 4  # e_score_correction_bias
    assert moe.bytes(Dtype.BF16) > dense.bytes(Dtype.BF16)
    assert anatomy.no_split_classes == ("Glm4MoeDecoderLayer",)


def test_tied_embedding_and_head_form_a_group() -> None:
    anatomy = build_anatomy(config("qwen2"))
    (group,) = anatomy.tied_groups
    assert group.units == ("model.embed_tokens", "lm_head")
    assert group.tensors == ("lm_head.weight", "model.embed_tokens.weight")
    assert anatomy.tied_leader("lm_head") == "model.embed_tokens"
    assert anatomy.tied_leader("model.norm") == "model.norm"
    assert "lm_head.weight" in anatomy.unit("lm_head").tensors


def test_quantised_bytes_follow_the_documented_formula() -> None:
    tally = Tally(compute=1000, fp32=10, linear=640, linear_rows=20, linear_blocks=10)
    assert tally.bytes(Dtype.BF16) == 1000 * 2 + 40
    assert tally.bytes(Dtype.BF16, Quantization.INT8) == 360 * 2 + 640 + 20 * 4 + 40
    assert tally.bytes(Dtype.BF16, Quantization.INT4) == 360 * 2 + 320 + 10 * 4 + 40
    anatomy = build_anatomy(config("glm"))
    block, embed = anatomy.blocks[0], anatomy.unit("model.embed_tokens")
    assert block.params.linear == 64 * 64 + 2 * 32 * 64 + 64 * 64 + 256 * 64 + 64 * 128
    assert embed.bytes(Dtype.BF16, Quantization.INT4) == embed.bytes(Dtype.BF16)  # not quantised


def test_anatomies_are_cached_and_hashed_by_structure() -> None:
    first = build_anatomy(config("glm"))
    assert build_anatomy(config("glm")) is first
    renamed = build_anatomy(config("glm", eos_token_id=7))  # same tensors, other config dict
    assert renamed is not first and renamed.config_hash == first.config_hash
    assert build_anatomy(config("glm", num_hidden_layers=5)).config_hash != first.config_hash
    assert build_anatomy(config("glm", num_key_value_heads=4)).config_hash != first.config_hash


def test_large_skeletons_build_in_seconds_without_weights() -> None:
    cfg = AutoConfig.for_model(
        "llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
    )  # fmt: skip
    start = time.perf_counter()
    anatomy = build_anatomy(cfg)
    assert time.perf_counter() - start < 5
    assert 70e9 < anatomy.n_params < 71e9
    assert len(anatomy.blocks) == 80 and anatomy.order_source == "traced"
