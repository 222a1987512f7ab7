"""Explicit maps are checked against the real module tree and the selected devices."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoConfig

from glmdeploy.config.settings import MapEntry, Offload
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.explicit_map import check_explicit_map, expand
from glmdeploy.problems import ConfigError, render_problems

from builders import make_deployment


def glm(layers: int = 28, **overrides: Any) -> Anatomy:
    """A ChatGLM3-shaped native GLM (28 layers), tiny widths."""
    cfg = AutoConfig.for_model(
        "glm", **{"vocab_size": 256, "hidden_size": 16, "intermediate_size": 32,
                  "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "head_dim": 8, "attention_bias": True, "pad_token_id": None, **overrides},
    )  # fmt: skip
    return build_anatomy(cfg)


SEED_GUIDE = (  # the seed guide's ChatGLM3 map: v1 names, a misspelt norm, logical ids
    MapEntry(("transformer.word_embeddings", "transformer.layers.0-13"), 0),
    MapEntry(("transformer.layers.14-27", "transformer.final_layer_norm", "lm_head"), 1),
)
CORRECT = (
    MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0-13"), 2),
    MapEntry(("model.layers.14-27", "model.norm", "lm_head"), 3),
)


def messages(entries: tuple[MapEntry, ...], anatomy: Anatomy, selected: list[Any],
             offload: Offload = Offload.NONE) -> dict[str, list[str]]:  # fmt: skip
    check = check_explicit_map(entries, anatomy, selected, offload)
    out: dict[str, list[str]] = {}
    for p in check.problems:
        out.setdefault(p.path, []).append(f"{p.message} | {p.hint}")
    return out


def test_the_seed_guide_map_is_rejected_with_the_right_names() -> None:
    found = messages(SEED_GUIDE, glm(), [2, 3])
    text = "\n".join(m for ms in found.values() for m in ms)
    for native in ("`model.embed_tokens`", "`model.layers.0-13`", "`model.layers.14-27`",
                   "`model.norm`"):  # fmt: skip
        assert native in text
    assert "ChatGLM-6B (v1)" in text and "exists in no ChatGLM generation" in text
    assert found["placement.map[0].device"] == [
        "GPU 0 is not selected (selected: 2, 3) | maps name physical GPU ids, as in gpus.ids "
        "(logical id 0 is GPU 2 here)"
    ]
    assert found["placement.map[1].device"][0].startswith("GPU 1 is not selected")


def test_chatglm2_3_names_are_translated_too() -> None:
    entries = (
        MapEntry(("transformer.embedding.word_embeddings", "transformer.rotary_pos_emb",
                  "transformer.encoder.layers.0-27", "transformer.encoder.final_layernorm",
                  "transformer.output_layer"), 0),
    )  # fmt: skip
    text = "\n".join(m for ms in messages(entries, glm(), [0]).values() for m in ms)
    for native in ("model.embed_tokens", "model.rotary_emb", "model.layers.0-27", "model.norm",
                   "lm_head"):  # fmt: skip
        assert f"`{native}`" in text


def test_a_correct_map_passes_and_resolves_in_forward_order() -> None:
    anatomy = glm()
    check = check_explicit_map(CORRECT, anatomy, [2, 3])
    assert check.ok
    assert list(check.device_map) == list(anatomy.names)
    assert check.device_map["model.layers.13"] == 2 and check.device_map["lm_head"] == 3


def test_a_single_device_map_with_a_typo_is_caught() -> None:
    entries = (MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0-3",
                         "model.nrom", "lm_head"), 0),)  # fmt: skip
    check = check_explicit_map(entries, glm(4), [0])
    assert not check.ok and check.device_map == {}
    typo = next(p for p in check.problems if "nrom" in p.message)
    assert typo.path == "placement.map[0].modules" and typo.hint == "did you mean 'model.norm'?"
    assert any(p.message == "not mapped to any device: model.norm" for p in check.problems)


def test_containers_and_whole_blocks_via_parts_are_accepted() -> None:
    anatomy = glm(2)
    assert check_explicit_map((MapEntry(("model", "lm_head"), 0),), anatomy, [0]).ok
    block = ("model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.1.input_layernorm",
             "model.layers.1.post_attention_layernorm")  # fmt: skip
    entries = (
        MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0"), 0),
        MapEntry((*block, "model.norm", "lm_head"), 1),
    )
    check = check_explicit_map(entries, anatomy, [0, 1])
    assert check.ok and check.device_map["model.layers.1"] == 1


def test_uncovered_overlapping_and_split_blocks_are_all_reported() -> None:
    rest_of_3 = ("model.layers.3.self_attn", "model.layers.3.input_layernorm",
                 "model.layers.3.post_attention_layernorm")  # fmt: skip
    entries = (
        MapEntry(
            ("model.embed_tokens", "model.layers.0-2", "model.layers.4-9", "model.layers.3.mlp"), 0
        ),
        MapEntry((*rest_of_3, "model.layers.9", "model.layers.20-23"), 1),
    )
    check = check_explicit_map(entries, glm(), [0, 1])
    text = render_problems("invalid", check.problems)
    uncovered = "model.rotary_emb, model.layers.10-19, model.layers.24-27, model.norm, lm_head"
    assert f"not mapped to any device: {uncovered}" in text
    assert "placement.map[0].modules: model.layers.9 is also mapped by placement.map[1]" in text
    assert "model.layers.3 is also mapped" not in text  # its parts are disjoint
    split = "model.layers.3 (GlmDecoderLayer) must stay on one device, but its parts map to GPU 0"
    assert f"placement.map[0].modules: {split} and GPU 1" in text
    assert "model.layers.9 (GlmDecoderLayer)" not in text  # the overlap says it already
    assert text.startswith("error: invalid (3 problems)")


def test_partly_mapped_blocks_name_the_missing_parts() -> None:
    entries = (MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0.mlp",
                         "model.layers.1", "model.norm", "lm_head"), 0),)  # fmt: skip
    (problem,) = check_explicit_map(entries, glm(2), [0]).problems
    assert problem.message.startswith("model.layers.0 is only partly mapped:")
    assert "model.layers.0.self_attn.q_proj.weight" in problem.message
    assert problem.hint == "map the whole unit 'model.layers.0' (to GPU 0)"


def test_tied_weights_must_share_a_device() -> None:
    cfg = AutoConfig.for_model(
        "qwen2", vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    anatomy = build_anatomy(cfg)
    entries = (
        MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0"), 0),
        MapEntry(("model.layers.1", "model.norm", "lm_head"), 1),
    )
    (problem,) = check_explicit_map(entries, anatomy, [0, 1]).problems
    assert "lm_head shares its weight with model.embed_tokens (tied)" in problem.message
    assert problem.hint == "put lm_head on GPU 0 with model.embed_tokens"


def test_devices_ranges_and_offload_are_checked() -> None:
    anatomy = glm(4)
    entries = (
        MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.3-0"), "cuda:1"),
        MapEntry(("model.layers.0-5", "model.norm"), "cpu"),
        MapEntry(("lm_head",), "disk"),
    )
    found = messages(entries, anatomy, [1])
    assert found["placement.map[0].device"] == [
        "'cuda:1' is not a device | write 1 (a number, the physical GPU id)"
    ]
    assert found["placement.map[1].device"] == [
        "cpu offload is not enabled | set placement.offload=cpu to allow it"
    ]
    assert (
        "'model.layers.3-0': the range runs backwards | None" in found["placement.map[0].modules"]
    )
    assert found["placement.map[1].modules"] == ["model.layers.4-5 do not exist | None"]
    allowed = messages(entries, anatomy, [1], Offload.DISK)
    assert "placement.map[1].device" not in allowed and "placement.map[2].device" not in allowed


def test_expand() -> None:
    assert expand("model.layers.2-4") == ["model.layers.2", "model.layers.3", "model.layers.4"]
    assert expand("model.layers.2-4.mlp") == [f"model.layers.{i}.mlp" for i in (2, 3, 4)]
    assert expand("lm_head") == ["lm_head"]
    assert expand("model.layers.4-2") is None


def test_planner_raises_config_error_with_all_problems() -> None:
    from glmdeploy.planning.strategies import plan_placement
    from glmdeploy.planning.types import DeviceSpec

    deployment = make_deployment("explicit", name="x", map=SEED_GUIDE, max_context_tokens=128)
    devices = [DeviceSpec(2, 2, "A", 10**9), DeviceSpec(3, 3, "B", 10**9)]
    with pytest.raises(ConfigError) as caught:
        plan_placement(deployment, glm(), devices)
    assert len(caught.value.problems) >= 6 and caught.value.exit_code == 2
