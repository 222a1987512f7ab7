"""Tensor and pipeline parallelism on two GPUs with NCCL (skipped without two CUDA GPUs).

Each run is a fresh `glmdeploy` process: CUDA reads `CUDA_VISIBLE_DEVICES` once per process, and
the ranks get exactly the two selected GPUs (local rank r on cuda:r).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.hardware.nvml import probe  # NVML only: collecting this file never initialises CUDA

GPUS = probe().ids
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multigpu,
    pytest.mark.skipif(len(GPUS) < 2, reason="needs two CUDA GPUs (NVML sees fewer)"),
]
TWO = f"gpus.ids=[{GPUS[0] if GPUS else 0},{GPUS[1] if len(GPUS) > 1 else 1}]"
COMMON = [
    "gpus=ids",
    TWO,
    "precision=fp32",
    "runtime.max_new_tokens=8",
    "placement.reserve_gib=0.5",
]


def _glmdeploy(command: str, *argv: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "glmdeploy", command, "--json", *argv], text=True,
                          capture_output=True, timeout=600, env={**os.environ})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_nccl_ranks_generate_like_one_gpu(layout: str, tmp_path: Path) -> None:
    one = _glmdeploy("generate", *COMMON, f"hydra.run.dir={tmp_path / 'one'}")
    ranks = _glmdeploy("generate", *COMMON, f"parallel={layout}", f"launch.master_port={_port()}",
                       f"hydra.run.dir={tmp_path / 'ranks'}")  # fmt: skip
    assert ranks["plan"]["parallel"]["backend"] == "nccl"
    assert [r["device"] for r in ranks["plan"]["rows"]] == list(GPUS[:2])
    assert ranks["results"]["generate"]["new_ids"] == one["results"]["generate"]["new_ids"]
    for rank in ranks["results"]["ranks"]:
        assert rank["bytes"]["predicted_bytes"] == rank["bytes"]["actual_bytes"]
        assert f"GPU {GPUS[rank['rank']]} → cuda:{rank['rank']}" in rank["device"]


def test_bench_shows_each_ranks_gpu_memory(tmp_path: Path) -> None:
    result = _glmdeploy("bench", *COMMON, "parallel=tp2", f"launch.master_port={_port()}",
                        f"hydra.run.dir={tmp_path}")  # fmt: skip
    memory = {m["device"]: m for m in result["results"]["bench"]["memory"]}
    for rank in (0, 1):
        gpu = memory[f"rank {rank} · GPU {GPUS[rank]} → cuda:{rank}"]
        assert gpu["peak_allocated_bytes"] > 0
