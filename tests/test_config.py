"""Every shipped config option composes and validates; schema, typed view and conf/ stay in step."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from glmdeploy.config import settings
from glmdeploy.config.compose import CONF_DIR, SCHEMA_PATH, compose_dict, group_options
from glmdeploy.config.deployments import load_deployment, load_deployments
from glmdeploy.config.settings import GpuMode, Strategy
from glmdeploy.problems import ConfigError

# Options with a mandatory value (`???`) get one here so that they compose to something valid.
REQUIRED = {
    ("gpus", "ids"): ["gpus.ids=[0,1]"],
    ("model", "local"): ["model.source.path={fixture}"],
    ("placement", "explicit"): [
        "placement.offload=cpu",
        "placement.map=[{modules:[model.embed_tokens,model.rotary_emb,model.layers.0-3,model.norm,"
        "lm_head],device:cpu}]",
    ],
    ("placement", "plan_file"): ["placement.plan_file={plan}"],
    ("launch", "multinode"): ["launch.node_rank=0", "launch.master_addr=127.0.0.1", "parallel=pp2"],
    # The tiny GLM has 2 KV heads: wider TP needs a larger model; transformers cannot do TP × PP.
    ("parallel", "tp4"): ["model=llama-3-70b"],
    ("parallel", "tp8"): ["model=llama-3-70b"],
    ("parallel", "tp2-pp2"): ["engine=vllm"],
}


def _all_options() -> list[tuple[str, str]]:
    found = sorted(
        (path.parent.relative_to(CONF_DIR).as_posix(), path.stem)
        for path in CONF_DIR.rglob("*.yaml")
        if path.parent != CONF_DIR
    )
    assert len(found) >= 30, "the recursive glob must see every group option"
    return found


@pytest.mark.parametrize(("group", "option"), _all_options())
def test_every_option_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    fixture = Path(__file__).resolve().parent / "fixtures" / "chatglm3-tiny"
    extra = [
        o.replace("{plan}", str(plan)).replace("{fixture}", str(fixture))
        for o in REQUIRED.get((group, option), [])
    ]
    if group == "precision" and option in ("int8", "int4"):
        extra.append("gpus=2x24gib")  # quantisation needs GPUs; a declared fleet will do
    job = load_deployment([f"{group}={option}", *extra])
    assert job.deployment.model.name


def test_every_option_opens_with_a_comment() -> None:
    for path in CONF_DIR.rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path} must open with a comment saying what it selects"


def test_shipped_yaml_is_plain_data() -> None:
    # No `_target_` anywhere: configs never instantiate arbitrary objects.
    for path in CONF_DIR.rglob("*.yaml"):
        assert "_target_" not in path.read_text(), path
        yaml.safe_load(path.read_text())


def _schema_props(node: dict[str, typing.Any]) -> dict[str, typing.Any]:
    for variant in node.get("oneOf", []):
        if variant.get("type") == "object":
            return typing.cast(dict[str, typing.Any], variant["properties"])
    return typing.cast(dict[str, typing.Any], node["properties"])


# schema object -> the dataclass that is its typed view
PAIRS = [
    ((), settings.Deployment),
    (("model",), settings.ModelSpec),
    (("model", "source"), settings.ModelSource),
    (("model", "architecture"), settings.Architecture),
    (("gpus",), settings.GpuSelection),
    (("precision",), settings.Precision),
    (("placement",), settings.Placement),
    (("runtime",), settings.Runtime),
    (("parallel",), settings.Parallel),
    (("launch",), settings.Launch),
    (("engine",), settings.Engine),
    (("serve",), settings.Serve),
]


@pytest.mark.parametrize(("path", "cls"), PAIRS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_schema_and_typed_view_have_the_same_keys(path: tuple[str, ...], cls: type) -> None:
    node = json.loads(SCHEMA_PATH.read_text())
    for key in path:
        node = _schema_props(node)[key]
    schema_keys = set(_schema_props(node))
    fields = {f.name for f in dataclasses.fields(cls)}
    assert schema_keys == fields


def test_every_schema_key_is_described() -> None:
    def walk(node: typing.Any, where: str) -> None:
        if isinstance(node, dict):
            for key, sub in node.get("properties", {}).items():
                assert "description" in sub, f"{where}.{key} has no description"
                walk(sub, f"{where}.{key}")
            for variant in node.get("oneOf", []):
                walk(variant, where)
            walk(node.get("items"), where)

    walk(json.loads(SCHEMA_PATH.read_text()), "")


def test_defaults_give_the_embedded_tiny_model() -> None:
    dep = load_deployment([]).deployment
    assert dep.model.source.kind is settings.SourceKind.EMBEDDED
    assert dep.gpus.mode is GpuMode.AUTO
    assert dep.placement.strategy is Strategy.AUTO


def test_profile_overrides_groups() -> None:
    dep = load_deployment(["profile=chatglm3-6b-2x24gib"]).deployment
    assert dep.model.name == "chatglm3-6b"
    assert [d.memory_gib for d in dep.gpus.declared] == [24, 24]
    assert dep.runtime.max_context_tokens == 8192


def test_dict_override_keeps_int_gpu_ids() -> None:
    dep = load_deployment(["gpus=ids", "gpus.ids=[2,3]", "gpus.max_memory_gib={2: 20, 3: 22.5}"])
    assert dict(dep.deployment.gpus.max_memory_gib) == {2: 20.0, 3: 22.5}


def test_explicit_map_override_with_ranges() -> None:
    job = load_deployment(
        [
            "gpus=2x24gib",
            "placement=explicit",
            "placement.map=[{modules:[model.embed_tokens,model.layers.0-1],device:0},"
            "{modules:[model.layers.2-3,model.norm,lm_head,model.rotary_emb],device:1}]",
        ]
    )
    entries = job.deployment.placement.map
    assert entries[0].modules == ("model.embed_tokens", "model.layers.0-1")
    assert entries[1].device == 1


def test_sweep_expands_and_validates_every_job() -> None:
    jobs = load_deployments(
        ["precision=fp32,bf16", "runtime.batch_size=1,2", "gpus=cpu"], sweep=True
    )
    assert len(jobs) == 4


def test_sweep_with_one_invalid_combination_names_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_deployments(["precision=fp32,int8", "gpus=cpu,2x24gib"], sweep=True)
    paths = [p.path for p in info.value.problems]
    assert paths == ["[precision=int8 gpus=cpu] precision.quantization"]
    assert "1 of 4 jobs" in info.value.title


def test_compose_returns_plain_containers() -> None:
    cfg = compose_dict(["gpus=4x24gib"])
    assert type(cfg["gpus"]["declared"]) is list
    assert group_options("gpus")[:2] == ["1x80gib", "2x24gib"]


def test_show_and_cfg_job_print_the_same_config(cli: typing.Any) -> None:
    args = ["profile=glm-4-9b-4x24gib", "runtime.batch_size=2"]
    shown = cli("show", *args)
    hydra = cli("show", "--cfg", "job", *args)
    assert shown.code == hydra.code == 0
    assert yaml.safe_load(shown.out) == yaml.safe_load(hydra.out)
    assert yaml.safe_load(shown.out)["runtime"]["batch_size"] == 2


def test_validate_never_imports_torch() -> None:
    code = (
        "import sys; from glmdeploy.cli.main import main; "
        "rc = main(['validate', 'profile=glm-4-9b-4x24gib']); "
        "heavy = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]; "
        "print(rc, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []"


def test_installed_entry_point_runs() -> None:
    exe = Path(sys.executable).parent / "glmdeploy"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "glmdeploy"]
    out = subprocess.run(
        [*cmd, "validate", "gpus=4x24gib", "placement.stratgy=x"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "placement.stratgy: unknown key" in out.stderr
    assert "did you mean 'strategy'?" in out.stderr
    assert "Traceback" not in out.stderr
