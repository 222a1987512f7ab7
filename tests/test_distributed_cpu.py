"""Tensor and pipeline parallelism for real: torchrun ranks on the CPU (gloo), one node or two on
loopback, against one process; failures, timeouts and Ctrl-C leave a true record and no process.

Each test uses its own free port and `launch.omp_num_threads=1` (two ranks × all cores thrash), and
kills whatever it started if it fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

import glmdeploy

pytestmark = pytest.mark.slow
COMMON = ["gpus=cpu", "precision=fp32", "launch.omp_num_threads=1", "runtime.max_new_tokens=8"]
WAIT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leftovers(marker: Path) -> list[psutil.Process]:
    """Processes whose command line names `marker` (the test's run directories live there)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and str(marker) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def no_leftovers(marker: Path, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not leftovers(marker)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `glmdeploy ARGS` in a session of its own; whatever is left is killed afterwards."""
    procs: list[subprocess.Popen[str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(*argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "glmdeploy", *argv],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    for proc in leftovers(tmp_path):
        proc.kill()


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """One process on the CPU: the greedy tokens and the prompt's last logits."""
    loaded = glmdeploy.load([*COMMON])
    ids = glmdeploy.generate(loaded).new_ids
    prompt = torch.tensor([list(glmdeploy.generate(loaded).prompt_ids[0])])
    with torch.inference_mode():
        logits = loaded.model(input_ids=prompt).logits[:, -1]
    return {"new_ids": [list(i) for i in ids], "logits": logits}


def _json(text: str) -> dict[str, Any]:
    return dict(json.loads(text))


def _wait_for_rank(run_dir: Path, rank: int, status: str = "running") -> int:
    """The pid of `rank` once its record says `status` (the process group exists)."""
    deadline = time.monotonic() + WAIT_S
    path = run_dir / f"rank-{rank}.json"
    while time.monotonic() < deadline:
        try:
            record = json.loads(path.read_text())
            if record["status"] == status:
                return int(record["pid"])
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never reached {status}")


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_generate_matches_one_process(
    layout: str, cli: Any, tmp_path: Path, reference: dict[str, Any]
) -> None:
    run = tmp_path / "run"
    result = cli(
        "generate",
        "--json",
        f"parallel={layout}",
        *COMMON,
        f"launch.master_port={free_port()}",
        f"hydra.run.dir={run}",
    )
    assert result.code == 0, result.err
    payload = _json(result.out)
    assert payload["results"]["generate"]["new_ids"] == reference["new_ids"]
    logits = load_file(run / "logits.safetensors")["last_logits"]
    assert (logits - reference["logits"]).abs().max().item() <= 1e-5
    # Every rank holds exactly the bytes its row of the plan predicted.
    planned = [row["weights_bytes"] for row in payload["plan"]["rows"]]
    ranks = payload["results"]["ranks"]
    assert [r["status"] for r in ranks] == ["ok", "ok"]
    assert [r["bytes"]["actual_bytes"] for r in ranks] == planned
    assert [r["bytes"]["predicted_bytes"] for r in ranks] == planned
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "ok" and record["results"]["torchrun"]["exit_code"] == 0
    assert (run / "torchrun").is_dir()  # torchrun's logs stay in the run directory
    assert no_leftovers(tmp_path)


def test_two_nodes_on_loopback_form_one_deployment(
    cli: Any,
    started: Callable[..., subprocess.Popen[str]],
    tmp_path: Path,
    reference: dict[str, Any],
) -> None:
    """Node 1 in a process of its own, node 0 in this one: one world of two ranks."""
    port = free_port()
    args = [
        "generate",
        "--json",
        "parallel=tp2",
        *COMMON,
        "launch=multinode",
        "launch.master_addr=127.0.0.1",
        f"launch.master_port={port}",
        "launch.join_timeout_s=120",
    ]
    node1 = started(*args, "launch.node_rank=1", f"hydra.run.dir={tmp_path / 'node1'}")
    node0 = cli(*args, "launch.node_rank=0", f"hydra.run.dir={tmp_path / 'node0'}")
    out1, err1 = node1.communicate(timeout=WAIT_S)
    assert (node0.code, node1.returncode) == (0, 0), node0.err + err1
    assert "run on node 1: glmdeploy generate" in node0.err
    for node, out in enumerate([node0.out, out1]):
        results = _json(out)["results"]
        assert results["generate"]["new_ids"] == reference["new_ids"]
        [rank] = results["ranks"]
        assert (rank["rank"], rank["node"], rank["status"]) == (node, node, "ok")
        assert rank["bytes"]["predicted_bytes"] == rank["bytes"]["actual_bytes"]
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_a_node_that_never_joins_ends_in_a_clear_error_in_time(
    rendezvous: str, cli: Any, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = cli(
        "generate",
        "parallel=tp2",
        *COMMON,
        "launch=multinode",
        f"launch.rendezvous={rendezvous}",
        "launch.master_addr=127.0.0.1",
        f"launch.master_port={free_port()}",
        "launch.node_rank=0",
        "launch.join_timeout_s=5",
        f"hydra.run.dir={run}",
    )
    assert result.code == 3, result.err
    assert "the 2 nodes did not all join within 5 s" in result.err
    assert "Traceback" not in result.err
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["error"]["exit_code"] == 3
    assert record["results"]["torchrun"]["seconds"] < 5 + 20  # torchrun's own start-up included
    assert no_leftovers(tmp_path)


def test_the_legacy_chatglm3_checkpoint_runs_with_tp2(
    cli: Any, chatglm3_tiny: Path, tmp_path: Path
) -> None:
    """Converted to native GLM; the second reference prompt as bytes (no tokenizer)."""
    reference = load_file(chatglm3_tiny / "reference.safetensors")
    prompt = "".join(map(chr, reference["input_ids"][1].tolist()))
    (tmp_path / "conf" / "runtime").mkdir(parents=True)
    (tmp_path / "conf" / "runtime" / "reference.yaml").write_text(
        "# The fixture's second reference prompt.\n"
        f"max_context_tokens: 64\nmax_new_tokens: 8\nprompt: {json.dumps(prompt)}\n"
    )
    run = tmp_path / "run"
    result = cli(
        "generate",
        "--json",
        "--config-dir",
        str(tmp_path / "conf"),
        "runtime=reference",
        "model=local",
        f"model.source.path={chatglm3_tiny}",
        "parallel=tp2",
        "gpus=cpu",
        "precision=fp32",
        "launch.omp_num_threads=1",
        f"launch.master_port={free_port()}",
        f"hydra.run.dir={run}",
    )
    assert result.code == 0, result.err
    generated = _json(result.out)["results"]["generate"]
    assert generated["prompt_ids"] == [reference["input_ids"][1].tolist()]
    assert generated["new_ids"] == [reference["greedy_ids"][1, 7:].tolist()]
    logits = load_file(run / "logits.safetensors")["last_logits"][0]
    assert (logits - reference["logits"][1, -1]).abs().max().item() <= 1e-5
    assert no_leftovers(tmp_path)


def test_a_rank_that_dies_takes_the_others_down_and_is_named(cli: Any, tmp_path: Path) -> None:
    run = tmp_path / "run"

    def kill_rank_1() -> None:
        os.kill(_wait_for_rank(run, 1), signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    result = cli(
        "bench",
        "parallel=tp2",
        *COMMON,
        "runtime.max_new_tokens=4000",
        f"launch.master_port={free_port()}",
        f"hydra.run.dir={run}",
    )
    killer.join(timeout=5)
    assert result.code == 1, result.err
    assert "rank 1 of 2 failed: died (exit code -9 (SIGKILL))" in result.err
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "rank 1 of 2 failed" in record["error"]["title"]
    statuses = {r["rank"]: r["status"] for r in record["results"]["ranks"]}
    assert statuses[1] == "running" and statuses[0] in ("failed", "interrupted")
    assert no_leftovers(tmp_path)


def test_ctrl_c_stops_every_rank_and_marks_the_record_interrupted(
    started: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = started(
        "bench",
        "parallel=pp2",
        *COMMON,
        "runtime.max_new_tokens=4000",
        f"launch.master_port={free_port()}",
        f"hydra.run.dir={run}",
    )
    for rank in (0, 1):
        _wait_for_rank(run, rank)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130, err
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert {r["status"] for r in record["results"]["ranks"]} == {"interrupted"}
    assert no_leftovers(tmp_path)


def test_bench_reports_every_rank_beside_one_process(cli: Any, tmp_path: Path) -> None:
    """A sweep `parallel=none,pp2` as the report sees it: one table for both layouts."""
    sweep = tmp_path / "sweep"
    for job, layout in enumerate(["none", "pp2"]):
        result = cli(
            "bench",
            "--json",
            f"parallel={layout}",
            *COMMON,
            "runtime.max_new_tokens=4",
            f"launch.master_port={free_port()}",
            f"hydra.run.dir={sweep / str(job)}",
        )
        assert result.code == 0, result.err
    bench = json.loads((sweep / "1" / "run.json").read_text())["results"]["bench"]
    assert [m["device"] for m in bench["memory"]] == ["rank 0 · cpu", "rank 1 · cpu"]
    assert all(m["peak_rss_bytes"] > 0 for m in bench["memory"])
    assert bench["decode_tokens_per_s"] > 0
    table = cli("report", str(sweep))
    assert table.code == 0, table.err
    header, _, none, pp2 = table.out.splitlines()[:4]
    assert "| parallel |" in header and "decode_tokens_per_s" in header
    assert "peak_gib[cpu]" in header and "peak_gib[rank 1 · cpu]" in header
    assert none.startswith("| 0 | ok | none |") and pp2.startswith("| 1 | ok | pp2 |")
    assert no_leftovers(tmp_path)
