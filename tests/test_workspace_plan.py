"""Plans budget the traced workspace: a GPU's workspace column equals what a real forward allocates,
the MoE replication is counted, and the plan says which method and implementation it used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_workspace import config, real_peaks

from glmdeploy.config.deployments import load_deployment
from glmdeploy.config.settings import GIB, Dtype, MapEntry, Runtime, Strategy
from glmdeploy.model import workspace_cache, workspace_trace
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.deployment_plan import plan_deployment
from glmdeploy.planning.memory import activation_bytes, prefill_tokens
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.planning.types import DeviceSpec, Plan

from builders import make_deployment

GPUS = [DeviceSpec(0, 0, "GPU0", 4 * GIB), DeviceSpec(1, 1, "GPU1", 4 * GIB)]


def _runtime(batch: int, tokens: int) -> Runtime:
    return Runtime(max_context_tokens=tokens + 8, batch_size=batch, max_new_tokens=8)


@pytest.mark.parametrize("model_type", ["glm", "glm4_moe"])
def test_a_planned_gpu_budgets_what_a_real_forward_allocates(model_type: str) -> None:
    """Per GPU, the workspace column is the largest peak of the units it runs, measured on real
    tensors (LiveBytes, KV cache left out): layer 0 is budgeted like the later layers of its kind
    (which also hold the embedding output), the last GPU also runs the final norm and head."""
    cfg = config(model_type)
    anatomy = build_anatomy(cfg)
    batch, tokens = 3, 70
    split = (MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0-1"), 0),
             MapEntry(("model.layers.2", "model.norm", "lm_head"), 1))  # fmt: skip
    deployment = make_deployment(Strategy.EXPLICIT, map=split, precision=Dtype.BF16,
                                 runtime=_runtime(batch, tokens))  # fmt: skip
    plan = plan_placement(deployment, anatomy, GPUS)
    real = real_peaks(cfg, Dtype.BF16, "sdpa", batch, tokens)
    assert [r.workspace_bytes for r in plan.rows] == [
        real["layer1"],
        max(real["layer2"], real["head"]),
    ]
    assert real["layer0"] < real["layer1"]  # layer 0's input is the embedding output itself
    assert plan.workspace is not None and plan.workspace.method == "traced"
    assert plan.workspace.target == "cuda" and plan.workspace.attention_kernel == "flash"
    assert (plan.workspace.prefill_tokens, plan.workspace.batch_size) == (tokens, batch)
    kinds = {k.kind: k for k in plan.workspace.kinds}
    assert kinds["moe" if model_type == "glm4_moe" else "dense"].bytes == real["layer2"]
    assert plan.notes[0].startswith("workspace: traced for CUDA (sdpa: flash kernel")


def test_a_cpu_plan_uses_the_cpu_target() -> None:
    cfg = config("glm")
    deployment = make_deployment(precision=Dtype.FP32, runtime=_runtime(2, 40))
    plan = plan_placement(deployment, build_anatomy(cfg), [])
    assert plan.workspace is not None and plan.workspace.target == "cpu"
    assert "traced for CPU" in plan.notes[0]
    real = real_peaks(cfg, Dtype.FP32, "sdpa", 2, 40)  # the CPU runs every unit
    assert [r.workspace_bytes for r in plan.rows] == [max(real["layer1"], real["head"])]


def test_glm_4_5_air_plans_budget_the_grouped_mm_replication() -> None:
    """The shipped GLM-4.5-Air-sized option (its workspace ships with it): every GPU that runs MoE
    layers budgets ≥ 4× the old formula, which used a dense width for every token."""
    job = load_deployment(["model=glm-4.5-air", "gpus=8x80gib", "precision=bf16",
                           "runtime=long-context"])  # fmt: skip
    planned = plan_deployment(job.deployment)
    plan, anatomy, runtime = planned.plan, planned.anatomy, job.deployment.runtime
    term = plan.workspace
    assert term is not None and term.method == "traced"
    assert term.experts_implementation == "grouped_mm" and term.attention_kernel == "flash"
    kinds = {k.kind: k for k in term.kinds}
    assert (kinds["dense"].layers, kinds["moe"].layers) == (1, 45)
    formula = activation_bytes(anatomy, runtime, Dtype.BF16)
    assert formula // prefill_tokens(runtime) == (3 * 4096 + 3 * 10944) * 2
    assert kinds["moe"].bytes_per_token >= 4 * (3 * 4096 + 3 * 10944) * 2
    moe_gpus = [r for r in plan.rows if r.units and "model.layers" in r.units]
    assert moe_gpus and all(r.workspace_bytes >= 4 * formula for r in moe_gpus)
    assert all(r.workspace_bytes == kinds["moe"].bytes for r in moe_gpus)


def test_the_formula_is_the_fallback_and_the_plan_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(workspace_trace, "trace_kinds", broken)
    anatomy = build_anatomy(config("glm", hidden_size=96))  # not traced in this process yet
    runtime = _runtime(2, 50)
    plan = plan_placement(make_deployment(runtime=runtime), anatomy, GPUS[:1])
    assert plan.workspace is not None and plan.workspace.method == "formula"
    assert "RuntimeError: data-dependent control flow" in plan.workspace.note
    assert plan.notes[0].startswith("workspace: historical formula, not exact (trace failed")
    assert plan.rows[0].workspace_bytes == activation_bytes(anatomy, runtime, Dtype.BF16) + (
        2 * 512 * (2 + 8)  # the formula's logits, on the GPU of the head
    )
    workspace_cache.forget()


def test_the_plan_file_records_the_workspace_and_reads_back(tmp_path: Path) -> None:
    job = load_deployment(["model=glm-4-9b-chat-hf", "gpus=2x24gib", "precision=bf16",
                           "runtime=long-context"])  # fmt: skip
    plan = plan_deployment(job.deployment).plan
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["workspace"]["method"] == "traced"
    assert data["workspace"]["kinds"][0] == {
        "kind": "dense", "layers": 40, "bytes": plan.rows[0].workspace_bytes,
        "bytes_per_token": 142_608, "bytes_per_token2": 0,
    }  # fmt: skip
    assert Plan.from_dict(data) == plan
