"""Per-rank plans: the shard arithmetic against transformers' own tensor parallelism (a fake
process group, no processes), the pipeline split, and `glmdeploy plan` with one row per rank."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from glmdeploy.config.settings import Dtype, Quantization
from glmdeploy.distributed.rank_plan import rank_tensors
from glmdeploy.distributed.shard_table import shard_table
from glmdeploy.distributed.shards import layer_range, local_shape, shard_len, stage_units
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.types import Plan

# Uneven sizes on purpose: vocabulary 511, intermediate 99, 3 KV heads, MoE experts of 33.
CASES: dict[str, dict[str, Any]] = {
    "glm": dict(vocab_size=511, hidden_size=64, intermediate_size=99, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=3, head_dim=16, attention_bias=True,
                pad_token_id=0),
    "llama": dict(vocab_size=500, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                  mlp_bias=True, pad_token_id=0, tie_word_embeddings=False),
    "glm4_moe": dict(vocab_size=512, hidden_size=64, intermediate_size=96,
                     moe_intermediate_size=33, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                     pad_token_id=0, attention_bias=True, use_qk_norm=True),
}  # fmt: skip


def _config(model_type: str, **overrides: Any) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**{**CASES[model_type], **overrides})


@pytest.fixture
def fake_world() -> Iterator[Any]:
    """A fake process group of any size in this process: DTensor placement with no peers."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(tp: int, rank: int) -> Any:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp)
        return dist.init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def test_shards_follow_torch_chunk() -> None:
    assert [shard_len(511, 2, r) for r in range(2)] == [256, 255]
    assert [shard_len(10, 4, r) for r in range(4)] == [3, 3, 3, 1]
    assert [shard_len(5, 4, r) for r in range(4)] == [2, 2, 1, 0]
    assert local_shape((64, 128), "rowwise", "weight", 2, 1) == (64, 64)
    assert local_shape((64,), "rowwise", "bias", 2, 1) == (64,)  # added once, after the reduce


@pytest.mark.parametrize("model_type", sorted(CASES))
@pytest.mark.parametrize(("tp", "rank"), [(2, 0), (2, 1), (3, 2), (4, 3)])
def test_arithmetic_matches_transformers_tensor_parallelism(
    model_type: str, tp: int, rank: int, fake_world: Any
) -> None:
    from transformers import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from glmdeploy.model.skeleton import meta_model

    config = _config(model_type)
    anatomy, table = build_anatomy(config), shard_table(config)
    planned = rank_tensors(table, anatomy, Dtype.BF16, Quantization.NONE, tp, 1, rank)
    mesh = fake_world(tp, rank)
    model = meta_model(config)
    plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=tp))
    apply_tensor_parallelism(model, mesh, plan)
    real = {n: p.to_local() if hasattr(p, "to_local") else p for n, p in model.named_parameters()}
    real.update(dict(model.named_buffers()))
    assert {n: shape for n, (shape, _) in planned.items()} == {
        n: tuple(t.shape) for n, t in real.items()
    }
    assert sum(b for _, b in planned.values()) == sum(t.nbytes for t in real.values())


def test_one_rank_holds_what_the_anatomy_counts() -> None:
    config = _config("glm4_moe")
    anatomy, table = build_anatomy(config), shard_table(config)
    whole = rank_tensors(table, anatomy, Dtype.FP16, Quantization.NONE, 1, 1, 0)
    assert sum(b for _, b in whole.values()) == anatomy.total_bytes(Dtype.FP16)


def test_pipeline_stages_split_layers_like_transformers() -> None:
    assert [layer_range(s, 2, 5) for s in range(2)] == [(0, 3), (3, 5)]
    assert [layer_range(s, 3, 32) for s in range(3)] == [(0, 11), (11, 22), (22, 32)]
    tied = _config("llama", tie_word_embeddings=True, num_hidden_layers=3)
    anatomy = build_anatomy(tied)
    first, last = (stage_units(anatomy, s, 2, tied=True) for s in range(2))
    assert "model.embed_tokens" in first and "lm_head" not in first
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(last)  # the tied copy
    table = shard_table(tied)
    stages = [rank_tensors(table, anatomy, Dtype.BF16, Quantization.NONE, 1, 2, r) for r in (0, 1)]
    embed = 500 * 64 * 2
    total = anatomy.total_bytes(Dtype.BF16)
    rotary = sum(b for n, (_, b) in stages[0].items() if "rotary" in n)
    assert sum(b for s in stages for _, b in s.values()) == total + embed + rotary


def test_plan_shows_one_row_per_rank(cli: Any, tmp_path: Path) -> None:
    result = cli("plan", "parallel=tp2", "gpus=cpu", "precision=fp32", f"hydra.run.dir={tmp_path}")
    assert result.code == 0, result.err
    assert "parallel: tp 2 × pp 1, 2 ranks, gloo" in result.out
    assert "model.layers.*.self_attn.k_proj.weight [32, 64] → [16, 64]: output rows" in result.out
    assert "whole on every rank: model.layers.*.input_layernorm.weight" in result.out
    assert "1 of 2 KV heads per rank" in " ".join(result.out.split())  # wrapped at 132 columns
    saved = json.loads((tmp_path / "plan.json").read_text())
    plan = Plan.from_dict(saved)
    assert json.loads(json.dumps(plan.to_dict())) == saved
    assert plan.parallel is not None and [r.rank for r in plan.rows] == [0, 1]
    # The tiny GLM in fp32: 856 320 parameter bytes, all but the norms split in two.
    assert [r.weights_bytes for r in plan.rows] == [429_344, 429_344]
    assert (tmp_path / "plan.png").stat().st_size > 0


def test_pipeline_plan_names_each_stage(cli: Any, tmp_path: Path) -> None:
    result = cli(
        "plan", "--json", "parallel=pp2", "gpus=cpu", "precision=fp32", f"hydra.run.dir={tmp_path}"
    )
    assert result.code == 0, result.err
    plan = json.loads(result.out)["plan"]
    assert [r["units"] for r in plan["rows"]] == [
        "model.embed_tokens, model.rotary_emb, model.layers.0-1",
        "model.rotary_emb, model.layers.2-3, model.norm, lm_head",
    ]
    assert [r["weights_bytes"] for r in plan["rows"]] == [428_064, 428_320]
    kv = [r["kv_bytes"] for r in plan["rows"]]
    assert kv[0] == kv[1] == 2 * 4096 * 2 * 16 * 2 * 4  # 2 layers × 4096 tokens × 2 heads × …


def test_gpu_ranks_on_a_declared_fleet(cli: Any, tmp_path: Path) -> None:
    result = cli(
        "plan",
        "--json",
        "model=glm-4-9b-chat-hf",
        "gpus=4x24gib",
        "precision=bf16",
        "parallel=tp2",
        "runtime=long-context",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.code == 0, result.err
    payload = json.loads(result.out)
    rows = payload["plan"]["rows"]
    assert [(r["rank"], r["device"]) for r in rows] == [(0, 0), (1, 1)]
    assert payload["plan"]["parallel"]["backend"] == "nccl"
    assert any("GPU 2, 3 selected but unused" in n for n in payload["plan"]["notes"])
    # KV heads are split: half of the 40 layers × 2 heads × 128 × 2 × 2 bytes × 32768 tokens.
    assert rows[0]["kv_bytes"] == 40 * 128 * 2 * 2 * 32768
    # Workspace: the unsharded model's traced peaks, the largest of the blocks' and the head's
    # (the logits are gathered on every rank).
    workspace = payload["plan"]["workspace"]
    assert workspace["method"] == "traced" and workspace["target"] == "cuda"
    kinds = {k["kind"]: k["bytes"] for k in workspace["kinds"]}
    assert set(kinds) == {"dense", "head"} and kinds["dense"] > kinds["head"]
    assert [r["workspace_bytes"] for r in rows] == [kinds["dense"]] * 2


def test_a_rank_over_budget_is_named(cli: Any, tmp_path: Path) -> None:
    result = cli(
        "plan",
        "model=glm-4-9b-chat-hf",
        "gpus=2x24gib",
        "precision=bf16",
        "parallel=tp2",
        "runtime=long-context",
        "runtime.batch_size=8",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.code == 5
    assert "rank 0 on GPU 0 needs" in result.err and "parallel.tp_size" in result.err
    assert json.loads((tmp_path / "run.json").read_text())["plan"]["parallel"]["tp_size"] == 2


def test_quantised_pipeline_counts_quantised_bytes() -> None:
    config = _config("llama")
    anatomy, table = build_anatomy(config), shard_table(config)
    stages = [rank_tensors(table, anatomy, Dtype.BF16, Quantization.INT8, 1, 2, r) for r in (0, 1)]
    linear = stages[0]["model.layers.0.mlp.down_proj.weight"]
    assert linear == ((64, 100), 64 * 100 + 4 * 64)  # int8 weights + one fp32 scale per row
    assert torch.Size(stages[1]["lm_head.weight"][0]) == torch.Size([500, 64])


def test_a_per_rank_plan_replays(cli: Any, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("plan", "parallel=pp2", "gpus=cpu", f"hydra.run.dir={run}").code == 0
    replayed = cli("replay", str(run))
    assert replayed.code == 0, replayed.err
    assert "reproduced: same plan" in replayed.out


def test_a_rank_whose_shards_differ_from_the_plan_is_named() -> None:
    from glmdeploy.distributed.rank_load import check_shards

    expected = {"a.weight": ((32, 64), 8192), "b.weight": ((64,), 256)}
    actual = {"a.weight": ((64, 64), 16384), "c.bias": ((4,), 16)}
    problems = check_shards(actual, expected, 1)
    assert [p.path for p in problems] == ["rank 1"] * 3
    assert [p.message for p in problems] == [
        "a.weight: planned [32, 64] (8192 bytes), loaded [64, 64] (16384 bytes)",
        "b.weight: planned [64], not loaded on this rank",
        "c.bias: loaded [4] (16 bytes), not in this rank's plan",
    ]
    assert check_shards(expected, expected, 0) == []
