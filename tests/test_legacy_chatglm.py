"""Legacy ChatGLM -> native GlmForCausalLM: names, config, tensors, and the fixture's references."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmdeploy.loading.convert import MARKER, convert_checkpoint, ensure_native
from glmdeploy.model.chatglm_names import (
    legacy_module_to_native,
    module_name_hint,
    native_module_to_legacy,
)
from glmdeploy.model.legacy_chatglm import (
    check_tensors,
    convert_state_dict,
    is_legacy_chatglm,
    native_config_dict,
    native_tensors,
)
from glmdeploy.problems import LoadError, OutputError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "chatglm3-tiny"
QKV = "transformer.encoder.layers.{}.self_attention.query_key_value.{}"


@pytest.fixture
def legacy() -> dict[str, Any]:
    config: dict[str, Any] = json.loads((FIXTURE / "config.json").read_text())
    return config


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "model.safetensors")


# --- module names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("legacy_name", "native"),
    [
        ("transformer.embedding.word_embeddings", "model.embed_tokens"),
        ("transformer.encoder.layers.27", "model.layers.27"),
        ("transformer.encoder.layers.3.self_attention.dense", "model.layers.3.self_attn.o_proj"),
        ("transformer.encoder.layers.3.mlp.dense_h_to_4h", "model.layers.3.mlp.gate_up_proj"),
        ("transformer.encoder.final_layernorm", "model.norm"),
        ("transformer.output_layer", "lm_head"),
        ("transformer.rotary_pos_emb", "model.rotary_emb"),
        ("transformer.word_embeddings", "model.embed_tokens"),  # v1, as the seed guide writes
        ("transformer.layers.0", "model.layers.0"),
        ("transformer.final_layernorm", "model.norm"),
        ("transformer.final_layer_norm", "model.norm"),  # the seed guide's misspelling
        ("transformer.encoder.layers.0.self_attention.query_key_value", None),  # split in three
        ("model.layers.0", None),
        ("transformer.encoder.layers.0.nope", None),
    ],
)
def test_legacy_module_to_native(legacy_name: str, native: str | None) -> None:
    assert legacy_module_to_native(legacy_name) == native


@pytest.mark.parametrize(
    ("native", "legacy_name"),
    [
        ("model.embed_tokens", "transformer.embedding.word_embeddings"),
        ("model.layers.5", "transformer.encoder.layers.5"),
        (
            "model.layers.5.self_attn.k_proj",
            "transformer.encoder.layers.5.self_attention.query_key_value",
        ),
        ("model.norm", "transformer.encoder.final_layernorm"),
        ("lm_head", "transformer.output_layer"),
        ("model.rotary_emb", "transformer.rotary_pos_emb"),
        ("model", None),
    ],
)
def test_native_module_to_legacy(native: str, legacy_name: str | None) -> None:
    assert native_module_to_legacy(native) == legacy_name


def test_hints_for_names_of_other_generations() -> None:
    assert module_name_hint("transformer.layers.0") == (
        "`transformer.layers.0` is a ChatGLM-6B (v1) name; in this model it is `model.layers.0`"
    )
    typo = module_name_hint("transformer.final_layer_norm")
    assert typo is not None and "exists in no ChatGLM generation" in typo and "`model.norm`" in typo
    assert "`lm_head`" in str(module_name_hint("transformer.output_layer"))
    assert "q_proj" in str(module_name_hint(QKV.format(0, "weight").removesuffix(".weight")))
    assert module_name_hint("model.layers.0") is None
    assert module_name_hint("lm_head") is None


def test_name_functions_do_not_import_torch() -> None:
    code = (
        "import sys, glmdeploy.model.chatglm_names, glmdeploy.model.legacy_chatglm; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# --- config ---------------------------------------------------------------------------------------


def test_native_config_of_the_fixture(legacy: dict[str, Any]) -> None:
    assert is_legacy_chatglm(legacy)
    native = native_config_dict(legacy)
    assert native == {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        "tie_word_embeddings": False,
        "use_cache": True,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "dtype": "float32",
    }
    assert native_config_dict(dict(legacy, multi_query_attention=False))["num_key_value_heads"] == 4


def test_unrepresentable_configs_are_all_reported(legacy: dict[str, Any]) -> None:
    refused = {
        "rmsnorm": False,
        "post_layer_norm": False,
        "add_bias_linear": True,
        "apply_residual_connection_post_layernorm": True,
        "quantization_bit": 4,
        "pre_seq_len": 8,
    }
    bad = {**legacy, **refused}
    del bad["hidden_size"]
    with pytest.raises(LoadError) as err:
        native_config_dict(bad, source="ckpt/config.json")
    keys = sorted([*refused, "hidden_size"])
    assert [p.path for p in err.value.problems] == [f"ckpt/config.json:{key}" for key in keys]


def test_original_rope_false_is_accepted(legacy: dict[str, Any]) -> None:
    """The remote code stores `original_impl` but never reads it."""
    assert native_config_dict(dict(legacy, original_rope=False)) == native_config_dict(legacy)


def test_v1_config_is_refused() -> None:
    v1 = {"model_type": "chatglm", "position_encoding_2d": True, "inner_hidden_size": 16384}
    with pytest.raises(LoadError, match=r"ChatGLM-6B \(v1\)") as err:
        native_config_dict(v1)
    assert err.value.problems[0].path == "config.json:model_type"


BASE_CODE = "base = base * self.rope_ratio\ntheta = 1.0 / (base ** (torch.arange(0, n_elem, 2)))"
POSITIONS_CODE = "seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio"


@pytest.mark.parametrize(
    ("extra", "source", "rope"),
    [
        ({}, BASE_CODE, {"rope_type": "default", "rope_theta": 500 * 10000.0}),
        ({}, POSITIONS_CODE, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 500.0}),
        (
            {"_name_or_path": "THUDM/glm-4-9b-chat"},
            None,
            {"rope_type": "default", "rope_theta": 5e6},
        ),
        (
            {"_name_or_path": "THUDM/chatglm2-6b-32k"},
            None,
            {"rope_type": "linear", "rope_theta": 10000.0, "factor": 500.0},
        ),
    ],
)
def test_rope_ratio_follows_the_checkpoint_code(
    legacy: dict[str, Any], extra: dict[str, str], source: str | None, rope: dict[str, Any]
) -> None:
    config = {**legacy, "_name_or_path": "", "rope_ratio": 500, **extra}
    native = native_config_dict(config, modeling_source=source)
    assert native["rope_parameters"] == {**rope, "partial_rotary_factor": 0.5}


def test_rope_ratio_of_unknown_code_is_refused(legacy: dict[str, Any]) -> None:
    with pytest.raises(LoadError, match="cannot tell whether rope_ratio") as err:
        native_config_dict({**legacy, "_name_or_path": "my/model", "rope_ratio": 50})
    assert err.value.problems[0].path == "config.json:rope_ratio"


def test_linear_rope_divides_positions() -> None:
    from transformers import GlmConfig
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    def cos_sin(rope: dict[str, Any], positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rope = {**rope, "partial_rotary_factor": 0.5}
        config = GlmConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            hidden_size=64,
            rope_parameters=rope,
        )
        return tuple(GlmRotaryEmbedding(config)(torch.zeros(1), positions))

    positions = torch.arange(40)[None]
    linear = cos_sin({"rope_type": "linear", "factor": 16.0, "rope_theta": 10000.0}, positions)
    default = cos_sin({"rope_type": "default", "rope_theta": 10000.0}, positions / 16)
    assert all(torch.allclose(a, b) for a, b in zip(linear, default, strict=True))


# --- tensors --------------------------------------------------------------------------------------


def chatglm_rotary(x: torch.Tensor, positions: torch.Tensor, n_elem: int) -> torch.Tensor:
    """modeling_chatglm.py's rotary embedding and `apply_rotary_pos_emb`, on [.., s, hd]."""
    theta = 1.0 / (10000 ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    angles = torch.outer(positions.float(), theta)
    cos, sin = angles.cos(), angles.sin()
    rot, rest = x[..., :n_elem], x[..., n_elem:]
    pairs = rot.reshape(*rot.shape[:-1], n_elem // 2, 2)
    out = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1
    ).flatten(-2)
    return torch.cat([out, rest], -1)


def test_native_rotary_matches_chatglm_without_permutation(legacy: dict[str, Any]) -> None:
    from transformers import GlmConfig
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding, apply_rotary_pos_emb

    config = GlmConfig(**native_config_dict(legacy))
    x = torch.randn(2, 4, 9, 16)
    cos, sin = GlmRotaryEmbedding(config)(x, torch.arange(9)[None])
    native, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(native, chatglm_rotary(x, torch.arange(9), 8), atol=1e-6)


@pytest.mark.parametrize("multi_query", [True, False])
def test_qkv_split_matches_the_remote_code(legacy: dict[str, Any], multi_query: bool) -> None:
    config = dict(legacy, multi_query_attention=multi_query)
    heads, groups, hd = 4, 2 if multi_query else 4, 16
    rows = (heads + 2 * groups) * hd
    weight, bias, x = torch.randn(rows, 64), torch.randn(rows), torch.randn(3, 64)
    mixed = x @ weight.T + bias
    if multi_query:  # SelfAttention.forward of modeling_chatglm.py
        q, k, v = mixed.split([heads * hd, groups * hd, groups * hd], dim=-1)
    else:
        q, k, v = mixed.view(3, heads, 3 * hd).split(hd, dim=-1)
    split = dict(native_tensors(QKV.format(0, "weight"), weight, config))
    split |= dict(native_tensors(QKV.format(0, "bias"), bias, config))
    for name, expected in zip("qkv", (q, k, v), strict=True):
        p = f"model.layers.0.self_attn.{name}_proj."
        got = x @ split[p + "weight"].T + split[p + "bias"]
        assert torch.allclose(got, expected.reshape(3, -1), atol=1e-5)


def test_unknown_and_missing_tensors_are_listed(
    legacy: dict[str, Any], state: dict[str, torch.Tensor]
) -> None:
    odd = dict(state, **{"transformer.prefix_encoder.embedding.weight": torch.zeros(1)})
    del odd["transformer.output_layer.weight"]
    with pytest.raises(LoadError) as err:
        convert_state_dict(odd, legacy)
    messages = " | ".join(p.message for p in err.value.problems)
    assert "lack `transformer.output_layer.weight`" in messages
    assert "unexpected tensors `transformer.prefix_encoder.embedding.weight`" in messages


def test_shape_mismatch_names_the_file(
    legacy: dict[str, Any], state: dict[str, torch.Tensor]
) -> None:
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    with pytest.raises(LoadError) as err:
        check_tensors(shapes, dict(legacy, ffn_hidden_size=96), files=dict.fromkeys(shapes, "w.st"))
    assert {p.path for p in err.value.problems} == {"w.st"}
    assert "dense_4h_to_h.weight` has shape [64, 128]" in err.value.problems[0].message


def test_inv_freq_of_another_base_is_refused(legacy: dict[str, Any]) -> None:
    inv_freq = 1.0 / (5e6 ** (torch.arange(0, 8, 2).float() / 8))
    with pytest.raises(LoadError, match="another rope base"):
        native_tensors("transformer.rotary_pos_emb.inv_freq", inv_freq, legacy)


# --- conversion against the reference outputs of the remote-code implementation ------------------


def write_bin_shards(src: Path, dst: Path, shards: int = 2) -> list[Path]:
    """The fixture as `pytorch_model-0000i-of-0000n.bin` shards with index and config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst)
    state = load_file(src / "model.safetensors")
    names, paths, weight_map = sorted(state), [], {}
    for i in range(shards):
        path = dst / f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n].clone() for n in names[i::shards]}, path)
        weight_map.update(dict.fromkeys(names[i::shards], path.name))
        paths.append(path)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return paths


def assert_reproduces_reference(converted: Path) -> None:
    from transformers import GlmForCausalLM

    reference = load_file(FIXTURE / "reference.safetensors")
    model = GlmForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4
    # Plain greedy decoding; eos (2) and pad (0) come from the converted config.json.
    greedy = model.generate(reference["input_ids"], max_new_tokens=8, do_sample=False)
    assert torch.equal(greedy, reference["greedy_ids"])


@pytest.mark.parametrize("layout", ["safetensors", "sharded-bin"])
def test_conversion_reproduces_the_reference(layout: str, tmp_path: Path) -> None:
    src = FIXTURE
    if layout == "sharded-bin":
        src = tmp_path / "bin"
        write_bin_shards(FIXTURE, src)
    (tmp_path / "dst").mkdir()  # an empty destination is fine
    result = convert_checkpoint(src, tmp_path / "dst", progress=False, max_shard_bytes=150_000)
    assert len(result.shards) > 1 and result.num_tensors == 25
    assert result.shards[0] == f"model-00001-of-{len(result.shards):05d}.safetensors"
    assert_reproduces_reference(tmp_path / "dst")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def break_truncated_safetensors(src: Path) -> Path:
    state = load_file(FIXTURE / "model.safetensors")
    names = sorted(state)
    for i, part in enumerate((names[::2], names[1::2])):
        save_file({n: state[n] for n in part}, src / f"model-0000{i + 1}-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    truncate(src / "model-00002-of-00002.safetensors")
    return src / "model-00002-of-00002.safetensors"


def break_truncated_bin(src: Path) -> Path:
    paths = write_bin_shards(FIXTURE, src)
    truncate(paths[0])
    return paths[0]


def break_missing_shard(src: Path) -> Path:
    paths = write_bin_shards(FIXTURE, src)
    paths[1].unlink()
    return paths[1]


def break_layer_count(src: Path) -> Path:
    shutil.copy(FIXTURE / "model.safetensors", src)
    config = json.loads((FIXTURE / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, num_layers=3)))
    return src / "config.json"


def break_pickled_object(src: Path) -> Path:
    torch.save(
        {"args": argparse.Namespace(lr=0.1), **load_file(FIXTURE / "model.safetensors")},
        src / "pytorch_model.bin",
    )
    return src / "pytorch_model.bin"


def break_inv_freq(src: Path) -> Path:  # found while streaming, after the temp dir exists
    state = load_file(FIXTURE / "model.safetensors")
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (5e6 ** (torch.arange(0, 8, 2) / 8))
    save_file(state, src / "model.safetensors")
    return Path("transformer.rotary_pos_emb.inv_freq")


@pytest.mark.parametrize(
    "breaker",
    [
        break_truncated_safetensors,
        break_truncated_bin,
        break_missing_shard,
        break_layer_count,
        break_pickled_object,
        break_inv_freq,
    ],
)
def test_failed_conversion_leaves_nothing(breaker: Callable[[Path], Path], tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    if not (src / "config.json").exists():
        shutil.copy(FIXTURE / "config.json", src)
    culprit = breaker(src)
    with pytest.raises(LoadError) as err:
        convert_checkpoint(src, out / "dst", progress=False)
    assert str(culprit) in [p.path for p in err.value.problems], err.value
    assert list(out.iterdir()) == []  # neither dst nor the temporary directory


def test_destination_in_use_and_side_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    for name in ("tokenizer_config.json", "tokenizer.model", "tokenization_chatglm.py"):
        (src / name).write_text("x")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(OutputError, match="already exists and is not empty"):
        convert_checkpoint(src, dst, progress=False)
    assert (dst / "keep").exists()
    result = convert_checkpoint(src, dst, progress=False, overwrite=True)
    assert result.copied == ("tokenizer.model", "tokenizer_config.json")
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    with pytest.raises(OutputError, match="overwrite the source"):
        convert_checkpoint(src, src, progress=False, overwrite=True)


def test_ensure_native_converts_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    converted = ensure_native(FIXTURE, cache, progress=False).path
    assert converted.parent == cache and (converted / MARKER).is_file()
    shard = converted / "model-00001-of-00001.safetensors"
    stamp = shard.stat().st_mtime_ns
    assert ensure_native(FIXTURE, cache, progress=False).path == converted
    assert shard.stat().st_mtime_ns == stamp  # reused, not redone
    (converted / MARKER).unlink()  # an interrupted earlier run: redone
    assert ensure_native(FIXTURE, cache, progress=False).path == converted
    assert (converted / MARKER).is_file()
    assert ensure_native(converted, cache).path == converted  # already native
    assert_reproduces_reference(converted)
