"""`glmdeploy validate` checks explicit maps as `plan` does where the model's anatomy is at hand
without torch (shipped or cached), and says when it could check their form only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.model import anatomy_cache

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOO_MANY_LAYERS = (
    "placement.map=[{modules:[model.embed_tokens,model.rotary_emb,model.layers.0-13],device:0},"
    "{modules:[model.layers.14-40,model.norm,lm_head],device:1}]"
)
GOOD_ON_ONE_GPU = (
    "placement.map=[{modules:[model.embed_tokens,model.rotary_emb,model.layers.0-3,model.norm,"
    "lm_head],device:0}]"
)


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_layers_that_do_not_exist_are_refused_by_both(cli: Any, command: str) -> None:
    args = ["model=chatglm3-6b", "gpus=2x24gib", "placement=explicit", TOO_MANY_LAYERS]
    result = cli(command, *args)
    assert result.code == 2
    assert "placement.map[1].modules: 'model.layers.14-40' reaches layer 40" in result.err
    assert "the model has 28 layers" in result.err and "write model.layers.14-27" in result.err
    assert "expected: layers 0-27" in result.err


def test_a_misspelt_module_is_caught_with_its_correction(cli: Any) -> None:
    typo = GOOD_ON_ONE_GPU.replace("model.norm", "model.nrom")
    result = cli("validate", "gpus=1x80gib", "placement=explicit", typo)
    assert result.code == 2 and "did you mean 'model.norm'?" in result.err


def test_a_full_check_says_so_in_json(cli: Any) -> None:
    result = cli("validate", "--json", "gpus=1x80gib", "placement=explicit", GOOD_ON_ONE_GPU)
    assert result.code == 0, result.err
    job = json.loads(result.out)["jobs"][0]
    assert job["map_check"] == "full" and job["notes"] == []
    plain = cli("validate", "gpus=1x80gib")
    assert "map_check" not in plain.out and "note:" not in plain.err


def test_gpus_chosen_by_the_machine_are_left_to_plan(cli: Any) -> None:
    result = cli("validate", "gpus=auto", "placement=explicit", GOOD_ON_ONE_GPU)
    assert result.code == 0, result.err
    assert "its GPU ids are checked by `glmdeploy plan`: gpus=auto" in result.err


def test_an_uncached_checkpoint_gets_a_form_only_check_and_says_so(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path / "empty"))
    anatomy_cache.forget()
    local = ["model=local", f"model.source.path={FIXTURES / 'chatglm3-tiny'}", "gpus=cpu",
             "placement=explicit", "placement.offload=cpu",
             "placement.map=[{modules:[model.nowhere],device:cpu}]"]  # fmt: skip
    result = cli("validate", "--json", *local)
    assert result.code == 0, result.err
    assert json.loads(result.out)["jobs"][0]["map_check"] == "form"
    assert "note: placement.map: checked its form only" in result.err
    assert cli("plan", *local, f"hydra.run.dir={tmp_path / 'run'}").code == 2  # caches it
    again = cli("validate", *local)
    assert again.code == 2 and "model.nowhere" in again.err
    anatomy_cache.forget()


def test_every_job_of_a_sweep_is_checked(cli: Any) -> None:
    args = ["-m", "model=chatglm3-6b,glm-4-9b-chat-hf", "gpus=2x24gib", "placement=explicit",
            TOO_MANY_LAYERS]  # fmt: skip
    result = cli("validate", *args)
    assert result.code == 2
    assert "[model=chatglm3-6b gpus=2x24gib placement=explicit " in result.err
    assert "reaches layer 40, but the model has 28 layers" in result.err
    assert "[model=glm-4-9b-chat-hf gpus=2x24gib " in result.err  # 40 layers: 0-39
    assert "reaches layer 40, but the model has 40 layers" in result.err
