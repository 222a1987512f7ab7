"""`glmdeploy export vllm` and `plan engine=vllm` from the command line: files, records, JSON,
refusals, and a sweep tabulated by `report`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

BASE = ["model=glm-4-9b-chat-hf", "gpus=2x24gib", "parallel=tp2", "engine=vllm"]


def test_export_writes_the_config_the_record_and_prints_the_commands(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    run, out = tmp_path / "run", tmp_path / "deploy" / "glm.yaml"
    result = cli("export", "vllm", *BASE, "--out", str(out), f"hydra.run.dir={run}")
    assert result.code == 0, result.err
    config = yaml.safe_load(out.read_text())
    assert config == yaml.safe_load((run / "vllm.yaml").read_text())
    assert config["model"] == "THUDM/glm-4-9b-chat-hf"
    assert config["tensor-parallel-size"] == 2
    assert config["distributed-executor-backend"] == "mp"
    assert f"vllm serve --config {out.resolve()}" in result.out
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1 vllm serve" in result.out
    assert "vLLM would log: GPU KV cache size:" in result.out
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "ok" and record["command"] == "export"
    assert record["results"]["vllm"]["config"] == config
    assert sorted(record["results"]["vllm"]["written"]) == sorted(
        [str(out), str(run / "vllm.yaml")]
    )


def test_export_json_is_the_same_as_data(cli: Callable[..., Any], tmp_path: Path) -> None:
    result = cli("export", "vllm", *BASE, "--json", f"hydra.run.dir={tmp_path}")
    assert result.code == 0, result.err
    payload = json.loads(result.out)
    vllm = payload["results"]["vllm"]
    assert vllm["ok"] and vllm["vllm_version"] == "0.33.0"
    assert vllm["env"] == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert vllm["commands"][0]["argv"][:3] == ["vllm", "serve", "--config"]
    ranks = vllm["fit"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["kv_heads"] == 1
    assert vllm["config"] == yaml.safe_load((tmp_path / "vllm.yaml").read_text())


def test_multinode_commands_give_each_node_its_rank(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    result = cli("export", "vllm", "model=llama-3-8b", "gpus=2x24gib", "parallel=tp2-pp2",
                 "launch=multinode", "launch.node_rank=0", "launch.master_addr=10.0.0.1",
                 "engine=vllm", "--json", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.code == 0, result.err
    vllm = json.loads(result.out)["results"]["vllm"]
    assert {k: vllm["config"][k] for k in ("nnodes", "master-addr", "master-port")} == {
        "nnodes": 2, "master-addr": "10.0.0.1", "master-port": 29500}  # fmt: skip
    argvs = [c["argv"][4:] for c in vllm["commands"]]
    assert argvs == [["--node-rank", "0"], ["--node-rank", "1", "--headless"]]
    assert [(r["node"], r["pp_rank"], r["tp_rank"]) for r in vllm["fit"]["ranks"]] == [
        (0, 0, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)]  # fmt: skip


def test_plan_engine_vllm_shows_the_fit_and_does_not_fit_exits_5(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    ok = cli("plan", *BASE, f"hydra.run.dir={tmp_path / 'ok'}")
    assert ok.code == 0, ok.err
    assert "vLLM 0.33.0 fit check per rank" in ok.out and "fits: 1×4,096 tokens" in ok.out
    assert not (tmp_path / "ok" / "vllm.yaml").exists()  # plan checks; export writes
    bad = cli("export", "vllm", "model=glm-4-9b-chat-hf", "gpus=2x24gib", "engine=vllm",
              "runtime.max_context_tokens=131072", f"hydra.run.dir={tmp_path / 'bad'}")  # fmt: skip
    assert bad.code == 5
    assert "the deployment does not fit vLLM's memory rules" in bad.err
    assert "engine.gpu_memory_utilization" in bad.err or "runtime.max_context_tokens" in bad.err
    assert not (tmp_path / "bad" / "vllm.yaml").exists()
    record = json.loads((tmp_path / "bad" / "run.json").read_text())
    assert record["status"] == "failed" and record["results"]["vllm"]["ok"] is False


def test_commands_that_run_transformers_refuse_engine_vllm(cli: Callable[..., Any]) -> None:
    result = cli("load", "engine=vllm", "gpus=cpu")
    assert result.code == 2
    assert "engine.name: vllm: `glmdeploy load` runs the model with transformers" in result.err
    assert "glmdeploy export vllm" in result.err
    assert cli("export", "sglang").code == 2


def test_refusals_exit_2_before_anything_is_written(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    result = cli("export", "vllm", "model=chatglm3-6b", "gpus=2x24gib", "engine=vllm",
                 f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.code == 2
    assert "model.source.trust_remote_code: vLLM must run code from the checkpoint" in result.err
    assert not (tmp_path / "vllm.yaml").exists()


@pytest.mark.parametrize(
    ("out", "words"),
    [(".", "is a directory"), ("a-file/vllm.yaml", "a-file is a file, not a directory"),
     ("/proc/vllm.yaml", "virtual file system")],
)  # fmt: skip
def test_an_out_file_that_cannot_be_written_exits_2_before_anything_runs(
    cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, words: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("mine\n")
    result = cli("export", "vllm", *BASE, "--out", out, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.code == 2, result.err  # was an internal error (exit 1) after the fit check
    assert "cannot write the output" in result.err and words in result.err
    assert "--out vllm.yaml" in result.err and "Traceback" not in result.err
    assert (tmp_path / "a-file").read_text() == "mine\n" and not (tmp_path / "run").exists()


def test_embedded_model_exports_with_its_local_tokenizer(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    result = cli("export", "vllm", "engine=vllm", "gpus=1x80gib", "engine.enforce_eager=true",
                 f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.code == 0, result.err
    config = yaml.safe_load((tmp_path / "vllm.yaml").read_text())
    assert "skip-tokenizer-init" not in config and config["enforce-eager"] is True
    assert (Path(config["model"]) / "config.json").is_file()
    assert (Path(config["model"]) / "tokenizer.json").is_file()  # built locally with the model


@pytest.mark.slow
def test_export_sweep_and_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    argv = [sys.executable, "-m", "glmdeploy", "export", "vllm", "-m", "parallel.tp_size=1,2",
            "runtime.max_context_tokens=32768", "model=glm-4-9b-chat-hf", "gpus=2x24gib",
            "engine=vllm", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "sweep: 2 jobs of `glmdeploy export vllm`" in out.stderr
    for job in range(2):
        assert (sweep / str(job) / "vllm.yaml").is_file()
    report = subprocess.run([sys.executable, "-m", "glmdeploy", "report", str(sweep)],
                            capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for column in ("parallel.tp_size", "fits", "vllm_largest_max_model_len", "vllm_concurrency"):
        assert column in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line]
    concurrency = [float(r[header.index("vllm_concurrency")].rstrip("x")) for r in rows]
    assert concurrency[1] > 2 * concurrency[0]  # tp 2 halves weights and KV heads per rank
    assert [r[header.index("fits")] for r in rows] == ["yes"] * 2
