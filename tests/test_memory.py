"""The memory model's terms against real transformers objects and their documented formulas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from glmdeploy.config.settings import (
    GIB,
    Dtype,
    MapEntry,
    Offload,
    Placement,
    Precision,
    Quantization,
    Runtime,
    Strategy,
)
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.memory import (
    activation_bytes,
    budget_bytes,
    kv_bytes_per_layer,
    kv_cache_bytes,
    logits_bytes,
    memory_model,
    prefill_tokens,
    reserve_bytes,
)
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.planning.types import DeviceSpec, device_map_for_transformers

from builders import make_deployment

GLM = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
           pad_token_id=None)  # fmt: skip


def tiny(**overrides: Any) -> tuple[Any, Anatomy]:
    cfg = AutoConfig.for_model("glm", **{**GLM, **overrides})
    return cfg, build_anatomy(cfg)


@pytest.mark.parametrize(
    ("torch_dtype", "dtype", "batch"),
    [(torch.float32, Dtype.FP32, 1), (torch.bfloat16, Dtype.BF16, 2)],
)
def test_kv_term_equals_a_real_dynamic_cache(
    torch_dtype: torch.dtype, dtype: Dtype, batch: int
) -> None:
    cfg, anatomy = tiny()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype).eval()
    prompt, new = 5, 7
    out = model.generate(
        torch.randint(0, 512, (batch, prompt)), max_new_tokens=new, min_new_tokens=new,
        do_sample=False, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    cache = getattr(out, "cache", None) or out.past_key_values
    actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    # The last generated token is never fed back: the cache holds prompt + new − 1 positions.
    runtime = Runtime(max_context_tokens=prompt + new - 1, batch_size=batch)
    assert kv_cache_bytes(anatomy, runtime, dtype, n_layers=4) == actual


def test_kv_formula_for_glm_4_9b_is_40_kib_per_token() -> None:
    cfg = AutoConfig.for_model(
        "glm4", vocab_size=151552, hidden_size=4096, intermediate_size=13696,
        num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
    )  # fmt: skip
    anatomy = build_anatomy(cfg)
    per_token = kv_bytes_per_layer(anatomy, Runtime(max_context_tokens=1), Dtype.BF16) * 40
    assert per_token == 40 * 1024
    assert kv_cache_bytes(anatomy, Runtime(max_context_tokens=131072), Dtype.BF16, 40) == 5 * GIB


def test_workspace_formulas() -> None:
    _, anatomy = tiny()
    runtime = Runtime(max_context_tokens=100, batch_size=3, max_new_tokens=20)
    assert prefill_tokens(runtime) == 80
    assert prefill_tokens(Runtime(max_context_tokens=10, max_new_tokens=32)) == 1
    assert logits_bytes(anatomy, runtime, Dtype.BF16) == 3 * 512 * (2 + 2 * 4)
    sdpa = activation_bytes(anatomy, runtime, Dtype.BF16)
    assert sdpa == 3 * 80 * (3 * 64 + 3 * 128) * 2
    eager = activation_bytes(anatomy, runtime, Dtype.BF16, attn_implementation="eager")
    assert eager - sdpa == 3 * 4 * 80 * 80 * (4 + 2)


def test_reserve_budget_and_dtype_resolution() -> None:
    placement = Placement(Strategy.BALANCED, reserve_gib=1.5)
    assert reserve_bytes(placement) == int(1.5 * GIB)
    assert budget_bytes(24 * GIB, reserve_bytes(placement)) == int(22.5 * GIB)
    # precision=auto follows the one rule the loader uses (glmdeploy.hardware.precision), not
    # the checkpoint's dtype: fp32 on the CPU, bf16 on GPUs that have it, fp16 on those without.
    _, typed = tiny(dtype="bfloat16")
    auto = make_deployment(Strategy.BALANCED, precision=Dtype.AUTO)
    cpu = plan_placement(auto, typed, [])
    assert cpu.fingerprint.dtype == "fp32"
    a100 = DeviceSpec(0, 0, "A100", 80 * GIB, (8, 0))
    assert plan_placement(auto, typed, [a100]).fingerprint.dtype == "bf16"
    t4 = DeviceSpec(0, 0, "T4", 16 * GIB, (7, 5))
    assert plan_placement(auto, typed, [t4]).fingerprint.dtype == "fp16"
    with pytest.raises(ValueError, match="resolved"):
        memory_model(typed, Precision(Dtype.AUTO), auto.runtime, placement)


def test_memory_model_per_unit_terms_and_weights_only() -> None:
    _, anatomy = tiny()
    runtime = Runtime(max_context_tokens=64, kv_cache_dtype=Dtype.FP32)
    placement = Placement(Strategy.BALANCED)
    mm = memory_model(anatomy, Precision(Dtype.BF16, Quantization.INT8), runtime, placement)
    assert mm.dtype == Dtype.BF16 and mm.kv_dtype == Dtype.FP32
    assert mm.unit_weights == tuple(u.bytes(Dtype.BF16, Quantization.INT8) for u in anatomy.units)
    assert [kv > 0 for kv in mm.unit_kv] == [u.kind == "block" for u in anatomy.units]
    assert mm.reserve == GIB
    # No workspace model given: the historical formula, composed as it always was (activations on
    # every GPU holding a unit, the logits on top where the final norm and head are).
    activations = activation_bytes(anatomy, runtime, Dtype.BF16)
    logits = logits_bytes(anatomy, runtime, Dtype.BF16)
    after = {u.name: u.kind for u in anatomy.units[anatomy.index("model.norm") :]}
    assert after == {"model.norm": "norm", "lm_head": "head"}
    assert mm.unit_workspace == tuple(
        activations + (logits if u.name in after else 0) for u in anatomy.units
    )
    assert mm.workspace is not None and mm.workspace.method == "formula"
    assert mm.workspace_of([0, 1]) == activations and mm.workspace_of([]) == 0
    bare = memory_model(anatomy, Precision(Dtype.BF16), runtime, placement, weights_only=True)
    assert (bare.reserve, sum(bare.unit_workspace), sum(bare.unit_kv)) == (0, 0, 0)
    assert bare.workspace is None


SPLIT_MAP = (
    MapEntry(("model.embed_tokens", "model.layers.0-1"), "cpu"),
    # accelerate offloads parameters only: the rotary buffers stay on the execution device (cpu)
    MapEntry(("model.rotary_emb", "model.layers.2-3", "model.norm", "lm_head"), "disk"),
)


@pytest.mark.parametrize("entries", [SPLIT_MAP, ()], ids=["cpu+disk", "whole-cpu"])
def test_predicted_bytes_equal_what_transformers_loads(
    tmp_path: Path, entries: tuple[MapEntry, ...]
) -> None:
    cfg = AutoConfig.for_model("glm", **GLM)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    devices = [DeviceSpec("cpu", None, "RAM", 10**9), DeviceSpec("disk", None, "SSD", 10**9)]
    strategy = Strategy.EXPLICIT if entries else Strategy.BALANCED
    deployment = make_deployment(strategy, offload=Offload.DISK, map=entries, max_context_tokens=16)
    plan = plan_placement(deployment, build_anatomy(cfg), devices)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", device_map=device_map_for_transformers(plan),
        offload_folder=str(tmp_path / "offload"), dtype=torch.bfloat16,
    )  # fmt: skip
    loaded: dict[str, int] = {}
    for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
        where = "disk" if tensor.device.type == "meta" else tensor.device.type  # meta: offloaded
        loaded[where] = loaded.get(where, 0) + tensor.nbytes
    assert loaded == {r.device: r.weights_bytes for r in plan.rows}
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)
