"""The anatomy cache: content keys without torch, JSON round trips, corrupt and concurrent entries,
shipped anatomies equal to fresh builds, and a second plan that imports neither torch nor
transformers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from glmdeploy.config.settings import (
    CheckpointLayout,
    Dtype,
    ModelSource,
    ModelSpec,
    SourceKind,
    Strategy,
)
from glmdeploy.model import anatomy_cache, workspace_cache, workspace_trace
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.anatomy_cache import (
    SHIPPED_DIR,
    CacheEntry,
    anatomy_for,
    cached_anatomy,
    entry_key,
    entry_path,
    key_inputs,
    load_entry,
    save_entry,
)
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.model.shipped_anatomies import (
    SHIPPED_DTYPES,
    SHIPPED_TARGETS,
    build_entries,
    shipped_models,
)
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.model.workspace import WORKSPACE_FORMAT, WorkspaceModel
from glmdeploy.model.workspace_cache import workspace_for, workspace_key
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.planning.types import DeviceSpec

from builders import TINY_ARCH, make_deployment

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Not a shipped option (3 layers), so nothing but this test's cache knows it.
ODD_ARCH = dataclasses.replace(TINY_ARCH, num_hidden_layers=3)
ODD = ModelSpec("odd", ModelSource(SourceKind.NONE), ODD_ARCH)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache directory, and nothing held in memory."""
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path / "cache"))
    anatomy_cache.forget()
    yield tmp_path / "cache"
    anatomy_cache.forget()


def test_an_anatomy_round_trips_through_plain_json() -> None:
    anatomy = build_anatomy(config_from_architecture(ODD_ARCH))
    text = json.dumps(anatomy.to_dict())
    again = Anatomy.from_dict(json.loads(text))
    assert again == anatomy and again.hf_config is None
    assert again.units[1].params == anatomy.units[1].params  # tallies, field by field
    with pytest.raises(KeyError):
        Anatomy.from_dict({k: v for k, v in anatomy.to_dict().items() if k != "units"})


def test_keys_are_computed_without_torch_and_follow_the_inputs(tmp_path: Path) -> None:
    code = (
        "import sys; from builders import TINY_ARCH; from glmdeploy.config.settings import *; "
        "from glmdeploy.model.anatomy_cache import key_inputs; "
        "key_inputs(ModelSpec('t', ModelSource(SourceKind.NONE), TINY_ARCH)); "
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tests)  # fmt: skip
    assert out.stdout.strip() == "[]"
    inputs = key_inputs(ODD)
    assert inputs is not None and {"transformers", "torch", "format", "config"} <= set(inputs)
    wider = ModelSpec("w", ODD.source, dataclasses.replace(ODD_ARCH, hidden_size=128))
    assert entry_key(inputs) != entry_key(key_inputs(wider) or {})
    # A local checkpoint: config.json bytes, the code beside it, the layout.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "chatglm3-tiny", ckpt)
    local = ModelSpec("l", ModelSource(SourceKind.LOCAL, path=str(ckpt)), None)
    first = entry_key(key_inputs(local) or {})
    (ckpt / "modeling_chatglm.py").write_text("# other code\n")
    second = entry_key(key_inputs(local) or {})
    chatglm = dataclasses.replace(local.source, layout=CheckpointLayout.CHATGLM)
    third = entry_key(key_inputs(dataclasses.replace(local, source=chatglm)) or {})
    assert first != second
    assert third == second  # its config.json says chatglm: the layout is read as planning reads it
    gone = ModelSpec("g", ModelSource(SourceKind.LOCAL, path=str(tmp_path / "none")), None)
    assert key_inputs(gone) is None


def test_a_built_anatomy_is_cached_and_read_back_without_building(cache: Path) -> None:
    assert cached_anatomy(ODD) is None
    built = anatomy_for(ODD)
    path = entry_path(entry_key(key_inputs(ODD) or {}))
    assert path.is_file() and path.parent == cache / "anatomy"
    anatomy_cache.forget()
    read = cached_anatomy(ODD)
    assert read == built and read is not None and read.hf_config is None
    assert json.loads(path.read_text())["format"] == "glmdeploy.anatomy/1"


CORRUPT = ["{oops", "[]", '{"format": "glmdeploy.anatomy/1"}', '{"format": "x/999", "key": "K"}']


@pytest.mark.parametrize("content", CORRUPT)
def test_a_corrupt_entry_is_ignored_and_rebuilt(cache: Path, content: str) -> None:
    key = entry_key(key_inputs(ODD) or {})
    path = entry_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("K", key))
    assert cached_anatomy(ODD) is None
    assert anatomy_for(ODD).names[-1] == "lm_head"
    entry = load_entry(key)
    assert entry is not None and entry.anatomy == anatomy_for(ODD)


WELL_FORMED_BUT_WRONG = [
    ("head_dim", -5),  # made a plan with a long context loop for ever
    ("num_key_value_heads", 0),
    ("hidden_size", True),
    ("units", []),  # a plan of nothing "fitted"
    ("units.0.kind", "bogus"),
    ("units.0.n_params", -1),
    ("units.1.params.compute", -1000),
    ("units.1.params.compute", 1.5),
]


@pytest.mark.parametrize(("where", "value"), WELL_FORMED_BUT_WRONG)
def test_an_entry_with_impossible_values_is_ignored_and_rebuilt(
    cache: Path, where: str, value: object
) -> None:
    built = anatomy_for(ODD)
    path = entry_path(entry_key(key_inputs(ODD) or {}))
    data = json.loads(path.read_text())
    *parents, last = where.split(".")
    node = data["anatomy"]
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    path.write_text(json.dumps(data))
    anatomy_cache.forget()
    assert cached_anatomy(ODD) is None
    assert anatomy_for(ODD) == built
    entry = load_entry(entry_key(key_inputs(ODD) or {}))
    assert entry is not None and entry.anatomy == built


def test_an_entry_with_another_key_inside_is_not_served(cache: Path) -> None:
    key = entry_key(key_inputs(ODD) or {})
    other = anatomy_for(ModelSpec("t", ODD.source, TINY_ARCH))  # 4 layers
    save_entry(CacheEntry(key, {}, other))  # filed under the wrong key by hand
    text = entry_path(key).read_text().replace(f'"key": "{key}"', '"key": "another"')
    entry_path(key).write_text(text)
    anatomy_cache.forget()
    assert len(anatomy_for(ODD).blocks) == 3


def test_concurrent_writers_leave_one_valid_entry(cache: Path) -> None:
    entry = CacheEntry(entry_key(key_inputs(ODD) or {}), key_inputs(ODD) or {}, anatomy_for(ODD),
                       {"workspace": {"note": "extra data rides along"}})  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda _: save_entry(entry), range(32)))
    read = load_entry(entry.key)
    assert read is not None and read.anatomy == entry.anatomy
    assert read.extras == {"workspace": {"note": "extra data rides along"}}
    assert sorted(p.name for p in entry_path(entry.key).parent.iterdir()) == [f"{entry.key}.json"]


def test_a_traced_workspace_is_kept_in_the_entry_and_read_back_without_tracing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace_cache.forget()
    anatomy = anatomy_for(ODD)
    traced = workspace_for(ODD, anatomy, Dtype.FP32, target="cpu")
    assert traced.method == "traced" and traced.target == "cpu"
    key = entry_key(key_inputs(ODD) or {})
    stored = json.loads(entry_path(key).read_text())["extras"]["workspace"]
    assert stored["format"] == WORKSPACE_FORMAT
    assert list(stored["models"]) == ["fp32/sdpa/default/cpu"]
    # Another process: the anatomy and its workspace come from the file; nothing is traced.
    anatomy_cache.forget()
    workspace_cache.forget()
    monkeypatch.setattr(workspace_trace, "trace_kinds", _no_tracing)
    again = workspace_for(ODD, anatomy_for(ODD), Dtype.FP32, target="cpu")
    assert again == replace(traced, seconds=0.0)
    # Another dtype is traced (here: the trace fails, so the formula, stored as such) and added.
    formula = workspace_for(ODD, anatomy_for(ODD), Dtype.BF16, target="cuda")
    assert formula.method == "formula" and "no tracing here" in formula.note
    models = json.loads(entry_path(key).read_text())["extras"]["workspace"]["models"]
    assert set(models) == {"fp32/sdpa/default/cpu", "bf16/sdpa/default/cuda"}
    workspace_cache.forget()


BAD_WORKSPACES = [{"format": 999, "models": {}}, {"format": 1, "models": []}, "oops",
                  {"format": 1, "models": {"fp32/sdpa/default/cpu": {"kinds": []}}}]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_WORKSPACES)
def test_corrupt_workspace_data_is_traced_again(cache: Path, bad: object) -> None:
    workspace_cache.forget()
    anatomy = anatomy_for(ODD)
    key = entry_key(key_inputs(ODD) or {})
    entry = load_entry(key)
    assert entry is not None
    save_entry(replace(entry, extras={"workspace": bad}))
    model = workspace_for(ODD, anatomy, Dtype.FP32, target="cpu")
    assert model.method == "traced"
    stored = json.loads(entry_path(key).read_text())["extras"]["workspace"]
    assert WorkspaceModel.from_dict(stored["models"]["fp32/sdpa/default/cpu"]) == replace(
        model, seconds=0.0
    )
    workspace_cache.forget()


def _no_tracing(*args: object) -> object:
    raise RuntimeError("no tracing here")


def test_an_unwritable_cache_costs_a_rebuild_not_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path / "file"))
    anatomy_cache.forget()
    assert anatomy_for(ODD).names[0] == "model.embed_tokens"
    anatomy_cache.forget()


def test_the_transformers_strategy_rebuilds_the_live_config_for_a_cached_anatomy(
    cache: Path,
) -> None:
    anatomy_for(ODD)
    anatomy_cache.forget()
    anatomy = anatomy_for(ODD)
    assert anatomy.hf_config is None
    deployment = make_deployment(Strategy.TRANSFORMERS, architecture=ODD_ARCH)
    plan = plan_placement(deployment, anatomy, [DeviceSpec(0, 0, "GPU", 4 * 2**30)])
    assert set(plan.device_map.values()) == {0}


def test_shipped_anatomies_equal_fresh_builds() -> None:
    """Regenerate with `python -m glmdeploy.model.shipped_anatomies` when this fails."""
    built = build_entries()
    assert set(built) == set(shipped_models()) and "glm-4.5-air" in built
    shipped = {p.stem for p in SHIPPED_DIR.glob("*.json")}
    assert shipped == {e.key for e in built.values()}, "stale or missing shipped anatomies"
    wanted = {workspace_key(d, "sdpa", None, t) for d in SHIPPED_DTYPES for t in SHIPPED_TARGETS}
    assert {"bf16/sdpa/default/cuda", "fp32/sdpa/default/cpu"} <= wanted
    for name, entry in built.items():
        found = load_entry(entry.key)
        assert found is not None and found.anatomy == entry.anatomy, name
        assert found.inputs == json.loads(json.dumps(entry.inputs)), name
        # the traced workspaces warm plans need, equal to fresh traces
        assert found.extras == json.loads(json.dumps(entry.extras)), name
        models = found.extras["workspace"]["models"]
        assert set(models) == wanted, name
        assert {m["method"] for m in models.values()} == {"traced"}, name


def test_glm_4_5_air_has_its_qkv_biases() -> None:
    air = shipped_models()["glm-4.5-air"]
    assert air.architecture is not None and air.architecture.attention_bias
    anatomy = cached_anatomy(air)
    assert anatomy is not None
    for block in anatomy.blocks:
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert f"model.layers.{block.layer_index}.self_attn.{proj}.bias" in block.tensors


def _plan_in_fresh_process(cache: Path, *overrides: str) -> tuple[list[str], str]:
    code = (
        "import sys; from glmdeploy.cli.main import main; "
        f"code = main(['plan', *{list(overrides)!r}]); "
        "print([m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]); "
        "sys.exit(code)"
    )
    env = {**os.environ, "GLMDEPLOY_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')), out.stdout


def test_a_second_plan_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    cache, run = tmp_path / "cache", f"hydra.run.dir={tmp_path / 'run'}"
    local = ["model=local", f"model.source.path={FIXTURES / 'chatglm3-tiny'}", "gpus=cpu", run]
    first, _ = _plan_in_fresh_process(cache, *local)
    assert "torch" in first  # nothing cached, nothing shipped: built
    second, shown = _plan_in_fresh_process(cache, *local)
    assert second == [] and "fits" in shown
    shipped, _ = _plan_in_fresh_process(
        tmp_path / "empty", "model=glm-4.5-air", "gpus=8x80gib", run
    )
    assert shipped == []  # a shipped option's first plan too
