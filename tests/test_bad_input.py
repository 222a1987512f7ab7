"""Golden tests of bad input: exit code 2, the exact key path, a useful hint, no traceback."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.config.compose import CONF_DIR, compose_dict
from glmdeploy.config.locations import ConfigSource
from glmdeploy.problems import ConfigError

MAP_OK = "{modules:[model.embed_tokens,model.layers.0-1],device:0}"

# (overrides, expected path, a phrase the message/expected/hint must contain)
CASES: list[tuple[list[str], str, str]] = [
    # typos in groups, options and keys
    (["gpus=4x24"], "gpus", "did you mean '4x24gib'?"),
    (["gpu=auto"], "gpu", "did you mean 'gpus'?"),
    (["precision=bf61"], "precision", "did you mean 'bf16'?"),
    (["placement=balance"], "placement", "did you mean 'balanced'?"),
    (["model=chatglm3"], "model", "one of chatglm3-6b"),
    (["placement.stratgy=balanced"], "placement.stratgy", "did you mean 'strategy'?"),
    (["runtime.max_context=100"], "runtime.max_context", "did you mean 'max_context_tokens'?"),
    (["+gpus.max_memroy_gib={0: 20}"], "gpus.max_memroy_gib", "did you mean 'max_memory_gib'?"),
    (["model.architecture.hidden=64"], "model.architecture.hidden", "did you mean 'hidden_size'?"),
    # wrong values and types
    (["precision.dtype=bf17"], "precision.dtype", "did you mean 'bf16'?"),
    (["placement.strategy=greedy"], "placement.strategy", "one of auto, balanced"),
    (["runtime.batch_size=0"], "runtime.batch_size", ">= "),
    (["runtime.batch_size=two"], "runtime.batch_size", "integer"),
    (["runtime.max_context_tokens=1.5"], "runtime.max_context_tokens", "integer"),
    (["placement.reserve_gib=-1"], "placement.reserve_gib", ">= "),
    (["gpus.max_memory_gib={0: 0}"], "gpus.max_memory_gib.0", "> 0"),
    (
        ["model=chatglm3-6b", "model.source.trust_remote_code=maybe"],
        "model.source.trust_remote_code",
        "boolean",
    ),
    (["runtime.max_context_tokens=100000"], "runtime.max_context_tokens", "long-context model"),
    (
        ["runtime.max_new_tokens=5000", "runtime.max_context_tokens=4096"],
        "runtime.max_new_tokens",
        "raise runtime.max_context_tokens",
    ),
    # accelerate-style size strings
    (["gpus.max_memory_gib={0: 24gb}"], "gpus.max_memory_gib.0", "gigabits: 2.79 GiB"),
    (["gpus.max_memory_gib={0: 24GiB}"], "gpus.max_memory_gib.0", "a number of GiB"),
    (["placement.reserve_gib=2GB"], "placement.reserve_gib", "a number of GiB"),
    # GPU ids
    (["gpus=ids", "gpus.ids=[0,0,1]"], "gpus.ids", "each physical id once"),
    (["gpus=ids", "gpus.ids=[-1]"], "gpus.ids[0]", ">= "),
    (["gpus=ids"], "gpus.ids", "missing mandatory value"),
    (
        ["gpus=ids", "gpus.ids=[0]", "gpus.max_memory_gib={1: 20}"],
        "gpus.max_memory_gib.1",
        "not selected",
    ),
    (
        ["gpus.max_memory_gib={0: 20}", "+gpus.max_memory_gib.1=20"],
        "gpus.max_memory_gib.1",
        "'gpus.max_memory_gib={0: 20, 1: 24}'",
    ),
    (["gpus=cpu", "+gpus.ids=[1]"], "gpus.ids", "choose gpus=ids"),
    (["gpus=least_used", "gpus.count=0"], "gpus.count", ">= "),
    # precision vs hardware
    (["gpus=cpu", "precision=int4"], "precision.quantization", "a CUDA GPU"),
    (
        [
            "gpus=4x24gib",
            "precision=bf16",
            "gpus.declared=[{name:V100,memory_gib:32,compute_capability:[7,0]}]",
        ],
        "precision.dtype",
        "precision=fp16",
    ),
    # explicit maps
    (["placement=explicit"], "placement.map", "missing mandatory value"),
    (["placement.map=[" + MAP_OK + "]"], "placement.map", "choose placement=explicit first"),
    (
        [
            "gpus=2x24gib",
            "placement=explicit",
            "placement.map=[{modules:[model.layers.0-2],device:0},"
            "{modules:model.layers.2-3,device:1}]",
        ],
        "placement.map[1].modules",
        "overlaps",
    ),
    (
        [
            "gpus=2x24gib",
            "placement=explicit",
            "placement.map=[{modules:model.layers.3-1,device:0}]",
        ],
        "placement.map[0].modules",
        "empty range",
    ),
    (
        [
            "gpus=2x24gib",
            "placement=explicit",
            "placement.map=[{modules:model.norm,device:cuda:0}]",
        ],
        "placement.map[0].device",
        "physical id as an integer",
    ),
    (
        [
            "gpus=ids",
            "gpus.ids=[2,3]",
            "placement=explicit",
            "placement.map=[{modules:model.norm,device:0}]",
        ],
        "placement.map[0].device",
        "GPU 0 is not selected (selected: 2, 3)",
    ),
    (
        [
            "gpus=2x24gib",
            "placement=explicit",
            "placement.map=[{modules:'model.layers.*',device:0}]",
        ],
        "placement.map[0].modules",
        "no spaces or regexes",
    ),
    (
        ["gpus=2x24gib", "placement=explicit", "placement.map=[{modules:model.norm,device:disk}]"],
        "placement.map[0].device",
        "placement.offload=disk",
    ),
    (
        ["gpus=2x24gib", "placement=explicit", "placement.map=[{module:model.norm,device:0}]"],
        "placement.map[0].module",
        "did you mean 'modules'?",
    ),
    (
        ["placement=plan_file", "placement.plan_file=/nonexistent/plan.json"],
        "placement.plan_file",
        "does not exist",
    ),
    # model sources
    (["model=local"], "model.source.path", "missing mandatory value"),
    (["model=local", "model.source.path=/nonexistent"], "model.source.path", "not a directory"),
    (
        ["model=chatglm3-6b", "model.source.trust_remote_code=true"],
        "model.source.revision",
        "pin model.source.revision",
    ),
    (
        ["model=chatglm3-6b", "model.source.hub_id='not a hub id'"],
        "model.source.hub_id",
        "owner/name",
    ),
    # override syntax
    (["+runtime.batch_size=4"], "runtime.batch_size", "++runtime.batch_size"),
    (["~runtime.nope"], "runtime.nope", "no such key"),
    (["runtime.batch_size=[1"], "runtime.batch_size", "quote the whole override"),
    (["gpus=2x24gib,4x24gib"], "gpus=2x24gib,4x24gib", "--multirun"),
    (["runtime.max_context_tokens=${nope}"], "runtime.max_context_tokens", "interpolation failed"),
    # what bash brace expansion makes of an unquoted dict: two broken overrides
    (
        ["placement.map=[modules:a", "placement.map=[device:0"],
        "placement.map",
        "split by bash brace expansion",
    ),
]


@pytest.mark.parametrize(("overrides", "path", "phrase"), CASES, ids=lambda v: str(v)[:60])
def test_bad_input_is_reported(cli: Any, overrides: list[str], path: str, phrase: str) -> None:
    result = cli("validate", *overrides)
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert result.err.startswith("error: invalid deployment config (")
    lines = result.err.splitlines()
    blocks = [i for i, line in enumerate(lines) if line.startswith(f"  {path}: ")]
    assert blocks, f"no problem at {path!r} in:\n{result.err}"
    block = [lines[blocks[0]]]
    block += [line for line in lines[blocks[0] + 1 :] if line.startswith("    ")][:2]
    assert any(phrase in line for line in block), result.err


def test_all_problems_are_reported_at_once(cli: Any) -> None:
    result = cli(
        "validate",
        "gpus=4x24",
        "placement.stratgy=x",
        "runtime.batch_size=0",
        "precision.dtype=bf17",
    )
    assert result.err.startswith("error: invalid deployment config (4 problems)")


def test_json_output_carries_the_same_problems(cli: Any) -> None:
    import json

    result = cli("validate", "--json", "gpus=4x24")
    payload = json.loads(result.out)
    assert payload["ok"] is False and payload["exit_code"] == 2
    assert payload["problems"][0]["path"] == "gpus"
    assert payload["problems"][0]["hint"] == "did you mean '4x24gib'?"


def test_unknown_command_and_option(cli: Any) -> None:
    result = cli("valdate")
    assert result.code == 2 and "did you mean 'validate'?" in result.err
    result = cli("validate", "--jsn")
    assert result.code == 2 and "unknown option '--jsn'" in result.err


def test_broken_yaml_in_a_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "runtime" / "chat.yaml").write_text("max_context_tokens: [4096\n")
    with pytest.raises(ConfigError) as info:
        compose_dict([], ConfigSource(shipped_dir=conf))
    problem = info.value.problems[0]
    assert str(conf / "runtime" / "chat.yaml") in problem.message and problem.path == "runtime=chat"
    assert (conf / "runtime" / "chat.yaml").read_text() == "max_context_tokens: [4096\n"


def test_debug_shows_the_traceback() -> None:
    from glmdeploy.cli.main import main

    with pytest.raises(ConfigError):
        main(["validate", "--debug", "gpus=4x24"])


def test_a_null_value_is_described_once(cli: Any) -> None:
    result = cli("validate", "runtime.batch_size=null")
    assert result.code == 2
    # it said "found null null"
    assert "  runtime.batch_size: found null\n    expected: integer" in result.err
