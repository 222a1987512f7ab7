"""Loading as planned on the CPU: materialising, cpu + disk dispatch, verification, checkpoints.

Plans come from the planner (`plan_placement`), so the predicted bytes checked are the planner's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from glmdeploy.config.deployments import load_deployment
from glmdeploy.config.settings import (
    CheckpointLayout,
    Deployment,
    Dtype,
    GpuMode,
    MapEntry,
    ModelSource,
    Offload,
    Placement,
    Runtime,
    SourceKind,
    Strategy,
)
from glmdeploy.hardware.gpu_select import AssignedGpu, GpuAssignment
from glmdeploy.inference.runner import generate
from glmdeploy.loading.embedded import CACHE_ENV, MARKER, cache_root, materialize
from glmdeploy.loading.loader import LoadedModel, load_model, resolve_checkpoint
from glmdeploy.loading.verify import verify_placement
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.planning.types import DeviceKey, DeviceSpec, Plan
from glmdeploy.problems import ConfigError, HardwareError, LoadError

from builders import TINY_ARCH, make_deployment

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "chatglm3-tiny"
CPU_DISK: dict[str, DeviceKey] = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
    "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk",
    "model.norm": "disk", "lm_head": "disk",
}  # fmt: skip
CPU = GpuAssignment(GpuMode.CPU, ())
SPECS = [DeviceSpec("cpu", None, "cpu", 0), DeviceSpec("disk", None, "disk", 0)]


# Tiny GLM deployments on the CPU, fp32, explicit maps with disk offload.
deployment = partial(
    make_deployment, Strategy.EXPLICIT, architecture=TINY_ARCH, name="test", gpus=GpuMode.CPU,
    precision=Dtype.FP32, offload=Offload.DISK, max_new_tokens=8,
)  # fmt: skip


def plan_for(dep: Deployment, hf: Any, device_map: dict[str, DeviceKey] | None = None) -> Plan:
    """The planner's plan: `auto` on the CPU when `device_map` is None, else that explicit map."""
    placement = Placement(Strategy.AUTO)
    if device_map is not None:
        entries = tuple(MapEntry((name,), device) for name, device in device_map.items())
        placement = Placement(Strategy.EXPLICIT, offload=Offload.DISK, map=entries)
    return plan_placement(replace(dep, placement=placement), build_anatomy(hf), SPECS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def offloaded(cache: Path) -> LoadedModel:
    """The tiny GLM of the `tiny-glm-cpu-disk` profile, loaded across cpu and disk."""
    dep = load_deployment(["profile=tiny-glm-cpu-disk"]).deployment
    assert dep.model.architecture is not None
    plan = plan_placement(
        dep, build_anatomy(config_from_architecture(dep.model.architecture)), SPECS
    )
    assert plan.device_map == CPU_DISK
    return load_model(dep, plan, CPU, cache_root=cache)


# --- materialising ---------------------------------------------------------------------------


def test_materialize_is_cached_and_deterministic(cache: Path, tmp_path: Path) -> None:
    first = materialize(TINY_ARCH, 0, cache / "embedded")
    assert (first / MARKER).is_file() and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert materialize(TINY_ARCH, 0, cache / "embedded") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    again = materialize(TINY_ARCH, 0, tmp_path)  # elsewhere, from scratch: the same weights
    weights = load_file(first / "model.safetensors")
    assert all(
        torch.equal(t, load_file(again / "model.safetensors")[k]) for k, t in weights.items()
    )
    other = materialize(TINY_ARCH, 1, tmp_path)
    assert other != again
    assert not torch.equal(load_file(other / "model.safetensors")["lm_head.weight"],
                           weights["lm_head.weight"])  # fmt: skip
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary directories left


def test_materialize_replaces_an_incomplete_directory(tmp_path: Path) -> None:
    first = materialize(TINY_ARCH, 3, tmp_path)
    (first / MARKER).unlink()  # as if interrupted before the marker
    (first / "model.safetensors").write_bytes(b"partial")
    again = materialize(TINY_ARCH, 3, tmp_path)
    assert again == first and (again / MARKER).is_file()
    assert load_file(again / "model.safetensors")


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "/somewhere/glm")
    assert cache_root() == Path("/somewhere/glm")
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "glmdeploy"


# --- cpu + disk: accelerate's real dispatch and offload hooks ------------------------------------


def test_cpu_disk_load_is_as_planned(offloaded: LoadedModel) -> None:
    model = offloaded.model
    assert model.hf_device_map == CPU_DISK == offloaded.device_map
    disk_weight = model.model.layers[2].self_attn.q_proj.weight
    assert disk_weight.device.type == "meta"  # offloaded: read from disk on every forward pass
    assert model.model.layers[2].self_attn.q_proj._hf_hook.offload
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert offloaded.input_device == torch.device("cpu")


def test_predicted_bytes_equal_actual_bytes(offloaded: LoadedModel) -> None:
    rows = {d.device: d for d in offloaded.device_bytes}
    assert set(rows) == {"cpu", "disk"}
    for row in rows.values():
        assert row.predicted_bytes == row.actual_bytes > 0
    assert json.dumps(offloaded.to_dict())


def test_offloaded_model_generates_like_a_plain_load(offloaded: LoadedModel) -> None:
    plain = AutoModelForCausalLM.from_pretrained(offloaded.checkpoint, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    with torch.inference_mode():
        assert torch.equal(offloaded.model(ids).logits, plain(ids).logits)
        expected = plain.generate(ids, max_new_tokens=12, do_sample=False)[0, 6:].tolist()
    result = generate(offloaded, Runtime(max_context_tokens=64, max_new_tokens=12), ids)
    assert list(result.new_ids[0]) == expected


def test_whole_cpu_plan_from_the_planner(cache: Path) -> None:
    dep = deployment(source=ModelSource(SourceKind.EMBEDDED, seed=0))
    plan = plan_for(dep, config_from_architecture(TINY_ARCH))
    assert set(plan.device_map.values()) == {"cpu"}
    loaded = load_model(dep, plan, CPU, cache_root=cache)
    (row,) = loaded.device_bytes
    assert row.predicted_bytes == row.actual_bytes > 0
    assert not hasattr(loaded.model, "hf_device_map")  # one device: no hooks


# --- verification --------------------------------------------------------------------------------


def test_verification_lists_every_misplaced_module(offloaded: LoadedModel) -> None:
    wrong = {**CPU_DISK, "model.layers.1": "disk", "model.layers.2": "cpu"}
    with pytest.raises(LoadError) as err:
        verify_placement(offloaded.model, wrong)
    found = {p.path: p.message for p in err.value.problems}
    assert "planned on disk, found cpu: model.layers.1." in found["model.layers.1"]
    assert "planned on cpu, found disk: model.layers.2." in found["model.layers.2"]
    assert "hf_device_map" in found


def test_a_one_device_plan_with_a_typo_is_caught(cache: Path) -> None:
    # transformers checks neither names nor coverage of a one-device map (DESIGN.md §5).
    dep = deployment(source=ModelSource(SourceKind.EMBEDDED, seed=0))
    good = plan_for(dep, config_from_architecture(TINY_ARCH))
    typo = {("model.layer.3" if k == "model.layers.3" else k): v for k, v in CPU_DISK.items()}
    plan = replace(good, device_map=dict.fromkeys(typo, "cpu"))
    with pytest.raises(LoadError) as err:
        load_model(dep, plan, CPU, cache_root=cache)
    (problem,) = err.value.problems
    assert problem.path == "model.layers.3" and "not in the plan's device map" in problem.message


def test_plan_for_another_precision_is_refused(cache: Path) -> None:
    dep = deployment(source=ModelSource(SourceKind.EMBEDDED, seed=0))
    plan = plan_for(dep, config_from_architecture(TINY_ARCH))
    plan = replace(plan, fingerprint=replace(plan.fingerprint, dtype="bf16"))
    with pytest.raises(ConfigError) as err:
        load_model(dep, plan, CPU, cache_root=cache)
    assert [p.path for p in err.value.problems] == ["precision.dtype"]


def test_gpu_plans_need_cuda_and_real_gpus(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dep = deployment(source=ModelSource(SourceKind.EMBEDDED, seed=0))
    plan = plan_for(dep, config_from_architecture(TINY_ARCH))
    plan = replace(plan, device_map=dict.fromkeys(plan.device_map, 3))
    gpu = AssignedGpu(3, 0, "Fake", "GPU-0", 8 << 30, 8 << 30, (8, 0))
    declared = GpuAssignment(GpuMode.AUTO, (gpu,), source="declared")
    with pytest.raises(HardwareError, match="declared GPUs are for planning"):
        load_model(dep, plan, declared, cache_root=cache)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HardwareError, match="CUDA is not available"):
        load_model(dep, plan, GpuAssignment(GpuMode.IDS, (gpu,)), cache_root=cache)


# --- checkpoints ---------------------------------------------------------------------------------


def load_legacy(directory: Path, cache: Path, device_map: dict[str, DeviceKey] | None) -> Any:
    source = ModelSource(SourceKind.LOCAL, path=str(directory), layout=CheckpointLayout.CHATGLM)
    dep = deployment(source=source, architecture=None)
    native, _ = resolve_checkpoint(dep, cache, progress=False)
    plan = plan_for(dep, AutoConfig.from_pretrained(native), device_map)
    return load_model(dep, plan, CPU, cache_root=cache, progress=False)


def assert_reference(loaded: LoadedModel) -> None:
    reference = load_file(FIXTURE / "reference.safetensors")
    ids = reference["input_ids"]
    with torch.inference_mode():
        logits = loaded.model(ids).logits
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4
    result = generate(loaded, Runtime(max_context_tokens=64, max_new_tokens=8, batch_size=2), ids)
    new = reference["greedy_ids"][:, ids.shape[1] :]
    assert [list(row) for row in result.new_ids] == new.tolist()


@pytest.mark.parametrize("device_map", [None, "cpu+disk"])
def test_chatglm3_fixture_reproduces_the_reference(tmp_path: Path, device_map: Any) -> None:
    layers = {f"model.layers.{i}": ("cpu" if i == 0 else "disk") for i in range(2)}
    split: dict[str, DeviceKey] = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                                   **layers, "model.norm": "disk", "lm_head": "disk"}  # fmt: skip
    loaded = load_legacy(FIXTURE, tmp_path, split if device_map else None)
    assert loaded.tokenizer is None and "converted" in loaded.checkpoint
    assert all(d.predicted_bytes == d.actual_bytes for d in loaded.device_bytes)
    assert_reference(loaded)


def test_chatglm3_fixture_from_bin_shards(tmp_path: Path) -> None:
    source = tmp_path / "bin"
    source.mkdir()
    shutil.copy(FIXTURE / "config.json", source)
    state = load_file(FIXTURE / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, source / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_reference(load_legacy(source, tmp_path / "cache", None))


@pytest.fixture
def native_copy(cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "native"
    shutil.copytree(materialize(TINY_ARCH, 0, cache / "embedded"), target)
    return target


def load_native(directory: Path, cache: Path) -> LoadedModel:
    dep = deployment(source=ModelSource(SourceKind.LOCAL, path=str(directory)), architecture=None)
    return load_model(
        dep, plan_for(dep, config_from_architecture(TINY_ARCH)), CPU, cache_root=cache
    )


def test_truncated_or_missing_weights_name_the_file(native_copy: Path, cache: Path) -> None:
    weights = native_copy / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(LoadError) as err:
        load_native(native_copy, cache)
    assert err.value.problems[0].path == str(weights)
    assert "truncated" in err.value.problems[0].message
    weights.unlink()
    with pytest.raises(LoadError, match="no weights found"):
        load_native(native_copy, cache)


def test_missing_tensors_and_mismatched_config(native_copy: Path, cache: Path) -> None:
    weights = native_copy / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, weights)
    with pytest.raises(LoadError) as err:
        load_native(native_copy, cache)
    assert "missing in the checkpoint: model.norm.weight" in str(err.value)
    save_file(state, weights)
    config = json.loads((native_copy / "config.json").read_text())
    (native_copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(LoadError) as err:
        load_native(native_copy, cache)
    (problem,) = err.value.problems
    assert problem.path == str(native_copy / "config.json") and "shapes differ" in problem.message


def test_embedded_without_architecture_and_source_none() -> None:
    with pytest.raises(ConfigError, match="an embedded model needs one"):
        resolve_checkpoint(
            deployment(source=ModelSource(SourceKind.EMBEDDED), architecture=None), Path("/x")
        )
    with pytest.raises(ConfigError, match="nothing to load"):
        resolve_checkpoint(deployment(source=ModelSource(SourceKind.NONE)), Path("/x"))
    hub = ModelSource(SourceKind.HUB, hub_id="org/model", revision="main", trust_remote_code=True)
    with pytest.raises(ConfigError, match="pinned revision"):
        resolve_checkpoint(deployment(source=hub), Path("/x"))
