"""`glmdeploy plan` end to end: tables, JSON, saved plans, seed-guide maps, sweeps, no CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SEED_GUIDE_MAP = (
    "placement.map=[{modules:[transformer.embedding.word_embeddings,transformer.layers.0-13],"
    "device:0},{modules:[transformer.layers.14-27,transformer.final_layer_norm,"
    "transformer.output_layer],device:1}]"
)


def test_plan_glm4_on_two_declared_24gib_cards(cli: Any) -> None:
    result = cli(
        "plan", "model=glm-4-9b-chat-hf", "gpus=2x24gib", "precision=bf16", "placement=balanced"
    )
    assert result.code == 0, result.err
    assert "GPU 0 → cuda:0" in result.out and "GPU 1 → cuda:1" in result.out
    assert "model.layers.0-19" in result.out and "model.layers.20-39" in result.out
    assert "fits: 2 device(s) hold weights" in result.out


def test_plan_json_is_the_plan(cli: Any) -> None:
    result = cli("plan", "--json", "profile=chatglm3-6b-2x24gib")
    payload = json.loads(result.out)
    assert payload["ok"] is True
    devices = {dev for _, dev in payload["plan"]["device_map"]}
    assert devices == {0, 1}
    assert payload["plan"]["fingerprint"]["dtype"] == "bf16"


def test_does_not_fit_names_fixes_and_exits_5(cli: Any) -> None:
    result = cli("plan", "model=llama-3-70b", "gpus=2x24gib", "precision=bf16")
    assert result.code == 5
    assert "does not fit: GPU 1 (RTX 4090) would need" in result.out
    assert "error: the deployment does not fit" in result.err
    assert "hint: placement.offload=cpu" in result.err
    assert "GPUs of 24.0 GiB would fit" in result.err


def test_saved_plan_round_trips_and_refuses_another_fleet(cli: Any, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    first = cli("plan", "--json", "--save", str(saved), "profile=chatglm3-6b-2x24gib")
    again = cli(
        "plan",
        "--json",
        "profile=chatglm3-6b-2x24gib",
        "placement=plan_file",
        f"placement.plan_file={saved}",
    )
    assert json.loads(first.out)["plan"] == json.loads(again.out)["plan"]
    other = cli(
        "plan",
        "profile=chatglm3-6b-2x24gib",
        "gpus=4x24gib",
        "placement=plan_file",
        f"placement.plan_file={saved}",
    )
    assert other.code == 2
    assert (
        "placement.plan_file (gpus): the saved plan was made for GPUs GPU 0 (24 GiB)" in other.err
    )


def test_seed_guide_map_is_rejected_with_native_names(cli: Any) -> None:
    result = cli("plan", "model=chatglm3-6b", "gpus=2x24gib", "placement=explicit", SEED_GUIDE_MAP)
    assert result.code == 2
    # ChatGLM3's own names are accepted; v1 names and the misspelling get both names.
    own = "in this model it is `transformer.encoder.layers.0-13` (native `model.layers.0-13`)"
    assert own in result.err
    assert (
        "a misspelling of `transformer.final_layernorm`); in this model it is "
        "`transformer.encoder.final_layernorm` (native `model.norm`)" in result.err
    )
    assert "transformer.output_layer" not in result.err


def test_correct_explicit_map_passes(cli: Any) -> None:
    result = cli(
        "plan",
        "model=chatglm3-6b",
        "gpus=2x24gib",
        "placement=explicit",
        "placement.map=[{modules:[model.embed_tokens,model.rotary_emb,model.layers.0-13],device:0},"
        "{modules:[model.layers.14-27,model.norm,lm_head],device:1}]",
    )
    assert result.code == 0, result.err
    assert "fits" in result.out


def test_single_device_map_with_a_typo_is_caught(cli: Any) -> None:
    result = cli(
        "plan",
        "gpus=1x80gib",
        "placement=explicit",
        "placement.map=[{modules:[model.embed_tokens,model.rotary_emb,model.layers.0-3,"
        "model.nrom,lm_head],device:0}]",
    )
    assert result.code == 2
    assert "model.nrom" in result.err and "did you mean 'model.norm'?" in result.err


def test_sweep_dry_run_lists_jobs_and_invalid_sweep_launches_nothing(cli: Any) -> None:
    dry = cli("plan", "-m", "--dry-run", "precision=bf16,fp16", "gpus=2x24gib,4x24gib")
    assert dry.code == 0
    assert dry.out.splitlines() == [
        "job 0: precision=bf16 gpus=2x24gib",
        "job 1: precision=bf16 gpus=4x24gib",
        "job 2: precision=fp16 gpus=2x24gib",
        "job 3: precision=fp16 gpus=4x24gib",
    ]
    bad = cli("plan", "-m", "precision=bf16,int8", "gpus=cpu,2x24gib")
    assert bad.code == 2
    assert "[precision=int8 gpus=cpu] precision.quantization" in bad.err


def test_planning_never_initialises_cuda() -> None:
    code = (
        "import torch; from glmdeploy.cli.main import main; "
        "rc = main(['plan', 'profile=glm-4-9b-4x24gib']); "
        "print(rc, torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False"
