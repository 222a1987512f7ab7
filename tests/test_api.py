"""The public Python API: the same objects and errors as the CLI, with no CLI in between."""

from __future__ import annotations

from pathlib import Path

import pytest

import glmdeploy
from glmdeploy.config.settings import GpuMode, Strategy


def test_compose_and_validate_return_the_typed_deployment() -> None:
    dep = glmdeploy.compose(["gpus=2x24gib", "precision=bf16", "placement=balanced"])
    assert isinstance(dep, glmdeploy.Deployment)
    assert dep.gpus.mode is GpuMode.AUTO and dep.placement.strategy is Strategy.BALANCED
    assert len(dep.gpus.declared) == 2  # all of a declared fleet
    config = glmdeploy.api.compose_config(["gpus=2x24gib"])
    assert glmdeploy.validate(config).gpus == dep.gpus


def test_compose_reports_every_problem_at_once() -> None:
    with pytest.raises(glmdeploy.ConfigError) as info:
        glmdeploy.compose(["gpus=4x24", "placement.stratgy=balanced"])
    assert [p.path for p in info.value.problems] == ["gpus", "placement.stratgy"]
    assert info.value.exit_code == 2


def test_plan_from_overrides_a_dict_or_a_deployment() -> None:
    overrides = ["model=glm-4-9b-chat-hf", "gpus=2x24gib", "precision=bf16", "placement=balanced"]
    planned = glmdeploy.plan(overrides)
    assert planned.plan.fits and planned.plan.device_map["model.layers.0"] == 0
    assert [r.device for r in planned.plan.rows] == [0, 1]
    again = glmdeploy.plan(glmdeploy.compose(overrides))
    assert again.plan.device_map == planned.plan.device_map


def test_plan_that_does_not_fit_raises_with_the_best_attempt() -> None:
    with pytest.raises(glmdeploy.PlanDoesNotFit) as info:
        glmdeploy.plan(["model=llama-3-70b", "gpus=2x24gib", "precision=bf16"])
    assert not info.value.plan.fits and info.value.exit_code == 5
    assert any(p.path == "gpus" for p in info.value.problems)  # the fixes come along


def test_load_generate_bench_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path))
    loaded = glmdeploy.load(["gpus=cpu", "runtime.max_new_tokens=4"])
    assert loaded.planned is not None and loaded.planned.plan.fits
    assert all(d.predicted_bytes == d.actual_bytes for d in loaded.device_bytes)
    first = glmdeploy.generate(loaded)
    assert len(first.new_ids[0]) == 4
    other = glmdeploy.generate(loaded, "Another prompt", max_new_tokens=2)
    assert other.prompt == "Another prompt" and len(other.new_ids[0]) == 2
    result = glmdeploy.bench(loaded, repeats=1)
    assert result.new_tokens == 4 and result.decode_tokens_per_s is not None
    with pytest.raises(glmdeploy.ConfigError):
        glmdeploy.generate(loaded, max_new_tokens=0)


def test_compose_with_a_user_config_dir(tmp_path: Path) -> None:
    (tmp_path / "gpus").mkdir()
    (tmp_path / "gpus" / "lab.yaml").write_text(
        "mode: declared\ndeclared:\n  - {name: L4, memory_gib: 24, compute_capability: [8, 9]}\n"
    )
    dep = glmdeploy.compose(["gpus=lab"], config_dir=tmp_path)
    assert dep.gpus.declared[0].name == "L4"
