"""Explicit maps in a ChatGLM2/3 checkpoint's own names are accepted for such checkpoints.

They name the same units unambiguously, so they are translated once, where the map is resolved,
with a note giving the native names; v1 names and names that exist nowhere stay errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig

from glmdeploy.config.settings import MapEntry
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.explicit_map import check_explicit_map

CHECKPOINT = (  # ChatGLM3-6B's own module names, as its users write them
    MapEntry(("transformer.embedding.word_embeddings", "transformer.rotary_pos_emb",
              "transformer.encoder.layers.0-13"), 2),
    MapEntry(("transformer.encoder.layers.14-27", "transformer.encoder.final_layernorm",
              "transformer.output_layer"), 3),
)  # fmt: skip
NATIVE = (
    MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0-13"), 2),
    MapEntry(("model.layers.14-27", "model.norm", "lm_head"), 3),
)
CLI_MAP = (
    "placement.map=[{modules:[transformer.embedding.word_embeddings,transformer.rotary_pos_emb,"
    "transformer.encoder.layers.0-13],device:0},{modules:[transformer.encoder.layers.14-27,"
    "transformer.encoder.final_layernorm,transformer.output_layer],device:1}]"
)


@pytest.fixture(scope="module")
def chatglm3() -> Anatomy:
    cfg = AutoConfig.for_model(
        "glm", vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, attention_bias=True,
        pad_token_id=None,
    )  # fmt: skip
    return build_anatomy(cfg)


def test_checkpoint_names_resolve_like_native_ones_with_a_note(chatglm3: Anatomy) -> None:
    check = check_explicit_map(CHECKPOINT, chatglm3, [2, 3], checkpoint_names=True)
    assert check.ok, check.problems
    assert check.device_map == check_explicit_map(NATIVE, chatglm3, [2, 3]).device_map
    (note,) = check.notes
    assert "transformer.encoder.layers.0-13 = model.layers.0-13" in note
    assert "transformer.output_layer = lm_head" in note


def test_checkpoint_names_stay_errors_for_a_native_model(chatglm3: Anatomy) -> None:
    check = check_explicit_map(CHECKPOINT, chatglm3, [2, 3])
    assert not check.ok and not check.notes
    assert any("`model.layers.0-13`" in (p.hint or "") for p in check.problems)


def test_other_generations_and_unknown_names_stay_errors(chatglm3: Anatomy) -> None:
    v1 = (MapEntry(("transformer.word_embeddings", "transformer.layers.0-27",
                    "transformer.final_layer_norm", "transformer.output_layer",
                    "transformer.rotary_pos_emb"), 2),)  # fmt: skip
    check = check_explicit_map(v1, chatglm3, [2, 3], checkpoint_names=True)
    hints = " ".join(p.hint or "" for p in check.problems)
    assert "ChatGLM-6B (v1)" in hints and "`transformer.encoder.layers.0-27`" in hints
    assert "`transformer.encoder.final_layernorm`" in hints  # the seed guide's misspelling
    nowhere = (MapEntry(("transformer.encoder.layers.0-29",), 2),)
    check = check_explicit_map(nowhere, chatglm3, [2], checkpoint_names=True)
    assert [p.message for p in check.problems if "do not exist" in p.message]
    fused = (MapEntry(("transformer.encoder.layers.0.self_attention.query_key_value",), 2),)
    check = check_explicit_map(fused, chatglm3, [2], checkpoint_names=True)
    assert not check.ok and "q_proj" in " ".join(p.hint or "" for p in check.problems)


def test_chatglm3_option_accepts_its_own_names(cli: Any, tmp_path: Path) -> None:
    shown = cli("plan", "model=chatglm3-6b", "gpus=2x24gib", "precision=bf16",
                "placement=explicit", CLI_MAP, f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert shown.code == 0, shown.err
    assert "note: placement.map uses the checkpoint's ChatGLM2/3 names" in shown.out
    assert (
        "model.layers.0-13" in shown.out
        and "transformer.encoder" not in shown.out.split("note:")[0]
    )


def test_native_option_refuses_checkpoint_names(cli: Any, tmp_path: Path) -> None:
    shown = cli("plan", "model=glm-4-9b-chat-hf", "gpus=2x24gib", "placement=explicit",
                CLI_MAP.replace("13]", "19]").replace("14-27", "20-39"),
                f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert shown.code == 2
    assert "`model.layers.0-19`" in shown.err


def test_a_local_legacy_checkpoint_is_recognised(
    cli: Any, chatglm3_tiny: Path, tmp_path: Path
) -> None:
    local_map = (
        "placement.map=[{modules:[transformer.embedding.word_embeddings,"
        "transformer.rotary_pos_emb,transformer.encoder.layers.0],device:cpu},"
        "{modules:[transformer.encoder.layers.1,transformer.encoder.final_layernorm,"
        "transformer.output_layer],device:disk}]"
    )
    shown = cli("plan", "model=local", f"model.source.path={chatglm3_tiny}", "gpus=cpu",
                "placement=explicit", "placement.offload=disk", local_map,
                f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert shown.code == 0, shown.err
    assert "ChatGLM2/3 names" in shown.out
