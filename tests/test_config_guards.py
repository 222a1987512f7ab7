"""What composition lets through: null keys deleted, Hydra settings and hub ids that would run code,
sizes bounded before any work, Hydra's own flags answered in glmdeploy's format."""

from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from glmdeploy.config.compose import compose_tolerant
from glmdeploy.config.rules import semantic_problems
from glmdeploy.config.settings import GpuMode, GpuSelection
from glmdeploy.config.validate import check
from glmdeploy.hardware.gpu_select import select_gpus
from glmdeploy.hardware.nvml import HardwareSnapshot
from glmdeploy.problems import HardwareError

PIN = "0123456789abcdef0123456789abcdef01234567"
NO_GPUS = HardwareSnapshot((), None, None, "no NVML here", "none")


def test_deleting_a_null_key_unsets_it(cli: Any, tmp_path: Path) -> None:
    # The README's own example: `show` prints gpus.max_memory_gib as null.
    composed = compose_tolerant(["~gpus.max_memory_gib"])
    assert composed.problems == [] and composed.config is not None
    assert composed.config["gpus"]["max_memory_gib"] is None
    assert composed.applied == ["gpus.max_memory_gib=null"]
    assert cli("validate", "~gpus.max_memory_gib").code == 0
    shown = cli("show", "--cfg", "job", "~gpus.max_memory_gib")
    assert shown.code == 0 and yaml.safe_load(shown.out)["gpus"]["max_memory_gib"] is None
    # through Hydra's own runner too, which cannot delete a null key itself
    result = cli("plan", "~gpus.max_memory_gib", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.code == 0, result.err
    assert (tmp_path / "run" / "run.json").is_file()


def test_deleting_a_key_that_is_not_there_is_still_an_error(cli: Any) -> None:
    result = cli("validate", "~gpus.max_memroy_gib")
    assert result.code == 2 and "gpus.max_memroy_gib: cannot delete: no such key" in result.err


def test_the_documented_hydra_settings_pass(cli: Any, tmp_path: Path) -> None:
    result = cli("validate", f"hydra.run.dir={tmp_path}", "hydra.job.chdir=false")
    assert result.code == 0, result.err
    result = cli("validate", "-m", "precision=bf16,fp16", f"hydra.sweep.dir={tmp_path}")
    assert result.code == 0, result.err


def test_a_hydra_callback_on_the_command_line_never_runs(cli: Any, tmp_path: Path) -> None:
    marker = tmp_path / "made-by-a-callback"
    argv = ["+hydra.callbacks.x._target_=os.makedirs", f"+hydra.callbacks.x.name={marker}"]
    for command in ("plan", "validate", "show"):
        result = cli(command, *argv, f"hydra.run.dir={tmp_path / 'run'}")
        assert result.code == 2 and "hydra.callbacks.x._target_: " in result.err
    result = cli("validate", "--cfg", "job", *argv)
    assert result.code == 2
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_package_overrides_cannot_place_options_under_hydra(cli: Any) -> None:
    result = cli("validate", "gpus@hydra.callbacks=cpu")
    assert result.code == 2 and "package overrides" in result.err


def _evil_checkpoint(root: Path, marker: Path) -> None:
    """A directory that transformers would load as a local checkpoint, running its code."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "configuration_evil.EvilConfig",
                },
            }
        )
    )
    (root / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )


def test_a_hub_id_that_names_a_local_directory_never_runs_its_code(
    cli: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    marker = tmp_path / "remote-code-ran"
    _evil_checkpoint(tmp_path / "org" / "evil", marker)
    monkeypatch.chdir(tmp_path)
    hub = [
        "model.source.kind=hub",
        "+model.source.trust_remote_code=true",
        "+model.source.layout=native",
    ]
    for hub_id in ("org/evil", "org/evil/..", "./org/evil"):
        argv = [f"+model.source.hub_id={hub_id}", f"+model.source.revision={PIN}"]
        result = cli("load", "gpus=cpu", "precision=fp32", *hub, *argv)
        assert result.code == 2, result.err
        assert "model.source.hub_id: " in result.err and "Traceback" not in result.err
        assert not marker.exists(), f"remote code ran for hub id {hub_id!r}"
    assert "also a path here" in result.err or "never a path" in result.err


def test_the_loader_refuses_what_validation_would(tmp_path: Path, monkeypatch: Any) -> None:
    """Defence in depth: a Deployment built without validation still cannot load a path."""
    import dataclasses

    from glmdeploy.config.deployments import load_deployment
    from glmdeploy.config.settings import SourceKind
    from glmdeploy.loading.loader import resolve_checkpoint
    from glmdeploy.problems import ConfigError

    marker = tmp_path / "remote-code-ran"
    _evil_checkpoint(tmp_path / "org" / "evil", marker)
    monkeypatch.chdir(tmp_path)
    dep = load_deployment(["gpus=cpu"]).deployment
    for hub_id, revision in (("org/evil/..", PIN), ("org/evil", PIN), ("THUDM/x", "main")):
        source = dataclasses.replace(
            dep.model.source, kind=SourceKind.HUB, hub_id=hub_id, revision=revision,
            trust_remote_code=True,
        )  # fmt: skip
        bad = dataclasses.replace(dep, model=dataclasses.replace(dep.model, source=source))
        with pytest.raises(ConfigError) as info:
            resolve_checkpoint(bad, tmp_path / "cache")
        assert info.value.problems[0].path.startswith("model.source.")
    assert not marker.exists()


@functools.cache
def _hub_config() -> dict[str, Any]:
    cfg = compose_tolerant(["model=glm-4-9b-chat-hf"]).config
    assert cfg is not None
    return cfg


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab_-./9Z", min_size=1, max_size=12))
def test_hub_ids_follow_huggingface_hubs_own_rules(hub_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(hub_id)
        valid = True
    except HFValidationError:
        valid = False
    cfg = copy.deepcopy(_hub_config())
    cfg["model"]["source"]["hub_id"] = hub_id
    refused = any(p.path == "model.source.hub_id" for p in check(cfg))
    assert refused is not valid, hub_id


def test_trust_remote_code_needs_a_full_commit_at_validation(cli: Any) -> None:
    base = ["model=glm-4-9b-chat-hf", "+model.source.trust_remote_code=true"]
    for revision in ("main", "v1.0", PIN[:12], PIN.upper()):
        result = cli("validate", *base, f"model.source.revision={revision}")
        assert result.code == 2 and "model.source.revision: " in result.err, revision
    assert cli("validate", *base, f"model.source.revision={PIN}").code == 0


def test_duplicate_gpu_ids_are_found_in_linear_time() -> None:
    ids = [0, 1] * 50_000
    start = time.perf_counter()
    cfg = compose_tolerant(["gpus=ids"]).config
    assert cfg is not None
    cfg["gpus"]["ids"] = ids
    problems = semantic_problems(cfg)
    assert any("GPU 0, 1 listed more than once" in p.message for p in problems)
    with pytest.raises(HardwareError) as info:
        select_gpus(GpuSelection(GpuMode.IDS, ids=tuple(ids)), NO_GPUS, {})
    assert any("listed 50000 times" in p.message for p in info.value.problems)
    assert time.perf_counter() - start < 2


def test_a_long_list_is_refused_before_hydra_parses_it(cli: Any) -> None:
    start = time.perf_counter()
    result = cli("validate", "gpus=ids", "gpus.ids=[" + ",".join(map(str, range(10_000))) + "]")
    assert result.code == 2 and "gpus.ids: " in result.err
    assert result.err.startswith("error: invalid deployment config (1 problem)")
    assert time.perf_counter() - start < 2


def test_a_list_over_the_schema_bound_is_one_problem(cli: Any) -> None:
    result = cli("validate", "gpus=ids", "gpus.ids=[" + ",".join(map(str, range(2000, 2100))) + "]")
    assert result.code == 2
    assert result.err.startswith("error: invalid deployment config (1 problem)"), result.err
    assert "at most this many items: 64" in result.err


def test_integral_floats_are_not_integers() -> None:
    cfg = compose_tolerant([]).config
    assert cfg is not None
    cfg["model"]["architecture"]["vocab_size"] = 512.0
    (problem,) = check(cfg)
    assert problem.path == "model.architecture.vocab_size"
    assert problem.expected == "integer" and problem.hint == "write 512"


def test_hydra_mode_prints_a_valid_config(cli: Any) -> None:
    result = cli("validate", "--cfg", "job", "runtime.batch_size=2")
    assert result.code == 0 and yaml.safe_load(result.out)["runtime"]["batch_size"] == 2
    result = cli("show", "--cfg", "job", "-p", "runtime")
    assert result.code == 0 and "max_context_tokens" in result.out
    result = cli("validate", "--info", "defaults")
    assert result.code == 0 and "Defaults List" in result.out


def test_show_refuses_a_sweep(cli: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("show", "-m", "precision=bf16,fp16")
    assert result.code == 2 and "validate -m" in result.err
    assert list(tmp_path.iterdir()) == []
