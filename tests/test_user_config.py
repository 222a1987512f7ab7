"""A user's own directory of group options: found by flag and by environment variable, composed on
top of the shipped groups, validated like them, with errors that name the user's file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.config.deployments import load_deployment
from glmdeploy.config.locations import CONFIG_PATH_ENV, config_source
from glmdeploy.problems import ConfigError

OUR_SERVER = """\
# Our 2-GPU server, declared for planning.
mode: declared
declared:
  - {name: "A100 80GB", memory_gib: 80}
  - {name: "A100 80GB", memory_gib: 80}
max_memory_gib: null
"""
PROD = """\
# @package _global_
# Production: GLM-4-9B on our server.
defaults:
  - override /model: glm-4-9b-chat-hf
  - override /gpus: our-server
  - override /precision: bf16
runtime:
  max_context_tokens: 8192
"""


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    root = tmp_path / "deploy"
    (root / "gpus").mkdir(parents=True)
    (root / "profile").mkdir()
    (root / "gpus" / "our-server.yaml").write_text(OUR_SERVER)
    (root / "profile" / "prod.yaml").write_text(PROD)
    return root


def test_user_options_compose_on_top_of_the_shipped_groups(deploy: Path) -> None:
    job = load_deployment(["profile=prod"], config_source([deploy]))
    dep = job.deployment
    assert dep.model.name == "glm-4-9b-chat-hf"  # a shipped option, chosen by the user's profile
    assert [g.memory_gib for g in dep.gpus.declared] == [80, 80]
    assert dep.runtime.max_context_tokens == 8192


def test_a_user_option_replaces_a_shipped_one_of_the_same_name(tmp_path: Path) -> None:
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "chat.yaml").write_text(
        "# our chat\nmax_context_tokens: 2048\nbatch_size: 2\n"
    )
    dep = load_deployment([], config_source([tmp_path])).deployment
    assert (dep.runtime.max_context_tokens, dep.runtime.batch_size) == (2048, 2)


def test_invalid_user_option_names_its_file(deploy: Path) -> None:
    (deploy / "gpus" / "broken.yaml").write_text(
        "mode: declared\ndeclared:\n  - {name: X, memory_gib: -3}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_deployment(["gpus=broken"], config_source([deploy]))
    problem = info.value.problems[0]
    assert problem.path == "gpus.declared[0].memory_gib"
    assert str(deploy / "gpus" / "broken.yaml") in problem.message


def test_broken_yaml_in_a_user_dir_is_located(deploy: Path, cli: Any) -> None:
    (deploy / "gpus" / "bad.yaml").write_text("mode: [declared\n")
    result = cli("validate", "--config-dir", str(deploy), "gpus=bad")
    assert result.code == 2 and "Traceback" not in result.err
    assert str(deploy / "gpus" / "bad.yaml") in result.err and ", line " in result.err


def test_flag_and_environment_variable(deploy: Path, cli: Any, monkeypatch: Any) -> None:
    assert cli("validate", "--config-dir", str(deploy), "gpus=our-server").code == 0
    assert cli("validate", "gpus=our-server").code == 2  # not found without the directory
    monkeypatch.setenv(CONFIG_PATH_ENV, str(deploy))
    result = cli("validate", "gpus=our-server", "--json")
    assert result.code == 0 and json.loads(result.out)["ok"] is True


def test_unknown_option_lists_the_users_options_too(deploy: Path, cli: Any) -> None:
    result = cli("validate", "-cd", str(deploy), "gpus=our-servr")
    assert result.code == 2 and "did you mean 'our-server'?" in result.err


def test_missing_directory_and_config_name_are_config_errors(deploy: Path, cli: Any) -> None:
    result = cli("validate", "--config-dir", str(deploy / "nope"))
    assert result.code == 2 and "does not exist" in result.err and "--config-dir" in result.err
    result = cli("validate", "--config-dir", str(deploy), "--config-name", "nope")
    assert result.code == 2 and "no config 'nope.yaml'" in result.err


@pytest.mark.parametrize("text", ["", "defaults:\n  - _self_\nmodel: {}\n"])
def test_a_user_config_yaml_is_refused_not_composed_as_the_root(
    deploy: Path, cli: Any, text: str
) -> None:
    """It replaced the shipped root config: every group 'missing' and a Hydra change the user never
    made ('hydra.job_logging: changed by a config file')."""
    (deploy / "config.yaml").write_text(text)
    result = cli("validate", "--config-dir", str(deploy))
    assert result.code == 2 and "(1 problem)" in result.err, result.err
    assert f"{deploy / 'config.yaml'}: has the name of glmdeploy's root config" in result.err
    assert "--config-name mine" in result.err and "job_logging" not in result.err


def test_an_option_that_is_not_a_regular_file_is_named(deploy: Path, cli: Any) -> None:
    """A fifo or a link to /dev/zero was 'unknown option X, did you mean X?'."""
    import os

    os.mkfifo(deploy / "gpus" / "fifo.yaml")
    (deploy / "gpus" / "zero.yaml").symlink_to("/dev/zero")
    for name in ("fifo", "zero"):
        result = cli("validate", "--config-dir", str(deploy), f"gpus={name}")
        assert result.code == 2, result.err
        assert f"{deploy / 'gpus' / name}.yaml is not a regular file" in result.err
        assert "did you mean" not in result.err
    listed = cli("validate", "--config-dir", str(deploy), "gpus=nope")
    assert "fifo" not in listed.err and "zero" not in listed.err and "our-server" in listed.err


def test_config_name_in_a_user_dir_is_validated(deploy: Path, cli: Any) -> None:
    (deploy / "prod.yaml").write_text(
        "defaults:\n  - config\n  - override gpus: our-server\n  - _self_\n"
        "runtime:\n  max_context_tokens: 0\n"
    )
    result = cli("validate", "--config-dir", str(deploy), "--config-name", "prod")
    assert result.code == 2 and "runtime.max_context_tokens" in result.err
    assert str(deploy / "prod.yaml") not in result.err or "set in" in result.err


def test_sweep_children_see_the_user_dir(deploy: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "glmdeploy", "plan", "-m", "--config-dir", str(deploy),
         "profile=prod", "precision=bf16,fp16", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for job in ("0", "1"):
        record = json.loads((sweep / job / "run.json").read_text())
        assert record["status"] == "ok" and record["choices"]["gpus"] == "our-server"
