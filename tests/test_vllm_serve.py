"""`serve_with_vllm`: runs `vllm serve --config FILE` with the exported environment, forwards
SIGTERM and returns vLLM's exit code; without vLLM it prints the command and exits 3.

vLLM cannot run here (no GPU, and it is not a dependency), so a stand-in `vllm` executable on PATH
records the arguments and environment it was started with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from glmdeploy.config.deployments import load_deployment
from glmdeploy.config.settings import Deployment
from glmdeploy.engines.vllm.serve import serve_with_vllm

FAKE_VLLM = """\
#!{python}
import json, os, signal, sys, time
log = os.environ["FAKE_VLLM_LOG"]
def record(**extra):
    env = {{k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "VLLM_"))}}
    with open(log, "w") as f:
        json.dump({{"argv": sys.argv[1:], "env": env, **extra}}, f)
def on_term(signum, frame):
    record(signal=signum)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
record()
print("fake vLLM: serving", flush=True)
if os.environ.get("FAKE_VLLM_WAIT"):
    time.sleep(60)
sys.exit(int(os.environ.get("FAKE_VLLM_EXIT", "0")))
"""


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `vllm` on PATH that logs its argv and environment to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(FAKE_VLLM.format(python=sys.executable))
    exe.chmod(0o755)
    log = tmp_path / "vllm-call.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path / "cache"))
    return log


def _deployment(*extra: str) -> Deployment:
    overrides = ["model=glm-4-9b-chat-hf", "gpus=mixed-10-24-24gib", "engine=vllm", *extra]
    return load_deployment(overrides).deployment


def test_runs_vllm_serve_with_the_config_and_environment(
    fake_vllm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = _deployment("parallel.pp_size=3", "engine.gpu_memory_utilization=0.88")
    assert serve_with_vllm(deployment, host="0.0.0.0", port=8123, json_out=False) == 0
    call = json.loads(fake_vllm.read_text())
    assert call["argv"][:2] == ["serve", "--config"]
    config = yaml.safe_load(Path(call["argv"][2]).read_text())
    assert (config["host"], config["port"], config["pipeline-parallel-size"]) == (
        "0.0.0.0",
        8123,
        3,
    )
    assert call["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert sum(map(int, call["env"]["VLLM_PP_LAYER_PARTITION"].split(","))) == 40
    out = capsys.readouterr().out
    assert "starting vLLM" in out
    assert "vLLM would log: GPU KV cache size:" in out


def test_returns_vllms_exit_code_and_json(
    fake_vllm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_VLLM_EXIT", "7")
    assert serve_with_vllm(_deployment("parallel.pp_size=3", "engine.gpu_memory_utilization=0.88"),
                           host="127.0.0.1", port=8000, json_out=True) == 7  # fmt: skip
    payload = json.loads(capsys.readouterr().out)
    assert payload["exit_code"] == 7 and payload["ok"] is False


def test_without_vllm_prints_the_command_and_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm executable; the package is not installed
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path / "cache"))
    deployment = _deployment("gpus=2x24gib", "parallel=tp2")
    assert serve_with_vllm(deployment, host="127.0.0.1", port=8000, json_out=False) == 3
    out = capsys.readouterr().out
    assert "vLLM is not installed here" in out
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1 vllm serve --config" in out
    assert "pip install vllm==0.33.0" in out


def test_sigterm_is_forwarded_to_vllm(fake_vllm: Path, tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        from glmdeploy.config.deployments import load_deployment
        from glmdeploy.engines.vllm.serve import serve_with_vllm
        d = load_deployment(["model=llama-3-8b", "gpus=1x80gib", "engine=vllm"]).deployment
        sys.exit(serve_with_vllm(d, host="127.0.0.1", port=8000, json_out=False))
    """)
    env = {**os.environ, "FAKE_VLLM_WAIT": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not fake_vllm.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fake_vllm.exists(), proc.communicate(timeout=5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(fake_vllm.read_text())["signal"] == signal.SIGTERM
