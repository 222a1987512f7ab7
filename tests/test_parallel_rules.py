"""What transformers' tensor/pipeline parallelism cannot run is refused by `validate` (architecture
facts) or `plan` (a checkpoint's config, the TP/PP plans, the GPUs), exit 2, before any rank
starts; engine=vllm, which can, is named where it applies and skips these checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from glmdeploy.distributed.rules import (
    ModelFacts,
    ParallelRequest,
    gpu_count_problems,
    transformers_parallel_problems,
)

TINY = ModelFacts("glm", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  num_hidden_layers=4)  # fmt: skip

# (overrides, the problem's path, words its message or hint must contain)
REFUSED_BY_VALIDATE = [
    (["parallel=tp4"], "parallel.tp_size", ["2 KV heads", "engine=vllm replicates KV heads"]),
    (["parallel.tp_size=3"], "parallel.tp_size", ["4 attention heads", "each rank must hold"]),
    (["parallel=tp2", "model.architecture.intermediate_size=129"], "parallel.tp_size",
     ["intermediate_size 129", "MLP shards"]),
    (["model=glm-4.5-air", "gpus=cpu", "parallel=tp2",
      "model.architecture.moe_intermediate_size=1407"], "parallel.tp_size",
     ["moe_intermediate_size 1407"]),
    (["parallel.pp_size=5"], "parallel.pp_size", ["5 pipeline stages for 4 decoder layers"]),
    (["model=llama-3-70b", "parallel=tp4", "gpus=2x24gib"], "gpus",
     ["4 ranks per node need 4 GPUs", "2 are selected"]),
    (["model=llama-3-70b", "parallel=tp8", "gpus=2x24gib", "launch=multinode",
      "launch.master_addr=10.0.0.1", "launch.node_rank=0"], "gpus", ["on each of 2 nodes"]),
    (["parallel=pp2", "launch=multinode", "launch.nnodes=4", "launch.master_addr=10.0.0.1",
      "launch.node_rank=0"], "launch.nnodes", ["cannot share 2 ranks"]),
    (["parallel=tp2", "placement=balanced"], "placement.strategy",
     ["mutually exclusive", "placement=auto"]),
    (["parallel=pp2", "placement.offload=cpu"], "placement.offload", ["every rank keeps"]),
    (["parallel=tp2-pp2"], "parallel", ["cannot combine tensor and pipeline", "engine=vllm"]),
    (["parallel=tp2", "precision=int8", "gpus=2x24gib"], "precision.quantization",
     ["bitsandbytes weights cannot be sharded"]),
]  # fmt: skip

REFUSED_BY_PLAN = [
    (["model.architecture.model_type=gpt2", "parallel=tp2"], "parallel.tp_size",
     ["gpt2 (GPT2LMHeadModel) has no tensor-parallel plan", "base_model_tp_plan"]),
    (["model.architecture.model_type=diffllama", "parallel=pp2"], "parallel.pp_size",
     ["has no pipeline-parallel plan", "base_model_pp_plan"]),
]  # fmt: skip


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize(("overrides", "path", "words"), REFUSED_BY_VALIDATE)
def test_validate_refuses_with_the_reason(
    cli: Any, overrides: list[str], path: str, words: list[str]
) -> None:
    result = cli("validate", *overrides)
    assert result.code == 2, result.out
    assert f"  {path}: " in result.err
    for word in words:
        assert word in result.err


@pytest.mark.parametrize(("overrides", "path", "words"), REFUSED_BY_PLAN)
def test_plan_refuses_what_needs_transformers_to_know(
    cli: Any, overrides: list[str], path: str, words: list[str], tmp_path: Path
) -> None:
    before = _descendants()
    result = cli("generate", "gpus=cpu", *overrides, f"hydra.run.dir={tmp_path}")
    assert result.code == 2
    assert f"  {path}: " in result.err
    for word in words:
        assert word in result.err
    assert not (tmp_path / "launch.json").exists() and _descendants() <= before  # nothing started


def test_a_job_with_an_invalid_layout_starts_nothing(cli: Any, tmp_path: Path) -> None:
    before = _descendants()
    result = cli("generate", "parallel=tp4", "gpus=cpu", f"hydra.run.dir={tmp_path}")
    assert result.code == 2 and "2 KV heads" in result.err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert _descendants() <= before


def test_a_local_checkpoint_is_checked_when_planned(
    cli: Any, chatglm3_tiny: Path, tmp_path: Path
) -> None:
    """No architecture facts in the config: the checkpoint's own (2 KV heads) decide, at plan."""
    overrides = ["model=local", f"model.source.path={chatglm3_tiny}", "parallel=tp4", "gpus=cpu"]
    assert cli("validate", *overrides).code == 0
    result = cli("plan", *overrides, "runtime.max_context_tokens=64", f"hydra.run.dir={tmp_path}")
    assert result.code == 2 and "the model's 2 KV heads" in result.err


def test_vllm_skips_the_transformers_rules(cli: Any) -> None:
    for layout in ("parallel=tp4", "parallel=tp2-pp2"):
        assert cli("validate", layout, "engine=vllm").code == 0


def test_problems_as_data() -> None:
    ok = transformers_parallel_problems(ParallelRequest(2, 1), TINY, (5, 24))
    assert ok == []
    both = transformers_parallel_problems(ParallelRequest(2, 2), TINY, (5, 24))
    assert [p.path for p in both] == ["parallel"]
    assert transformers_parallel_problems(ParallelRequest(2, 2), TINY, (5, 25)) == []
    assert transformers_parallel_problems(ParallelRequest(1, 1, "balanced"), TINY, (5, 24)) == []
    assert gpu_count_problems(4, 1, 0) == []  # CPU ranks: any number
    assert gpu_count_problems(4, 2, 2) == []
    assert [p.path for p in gpu_count_problems(4, 1, 2)] == ["gpus"]


def test_the_python_api_does_not_load_ranks_in_process() -> None:
    import glmdeploy
    from glmdeploy.problems import ConfigError

    with pytest.raises(ConfigError, match="run under torchrun"):
        glmdeploy.load(["parallel=tp2", "gpus=cpu"])
