"""Real GPU loads (skipped without a GPU): every visible GPU, placement verified, tokens vs the CPU.

Each case runs in a fresh Python process: CUDA reads `CUDA_VISIBLE_DEVICES` once, when it
initialises, and other tests in this session may already have initialised it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.hardware.nvml import probe  # NVML only: collecting this file never initialises CUDA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not probe().gpus, reason="no CUDA GPU (NVML sees none)"),
]

SCRIPT = r"""
import json, os, sys
from dataclasses import replace
from pathlib import Path
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.hardware.gpu_select import apply_environment, select_gpus
from glmdeploy.hardware.nvml import probe
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.planning.types import DeviceSpec
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.hardware.precision import resolve_precision, selected_gpus
from glmdeploy.config.settings import *

cache, case = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, sys.argv[3])  # tests/, for the shared builders
from builders import TINY_ARCH, make_deployment
selection = GpuSelection(GpuMode.AUTO)
assignment = select_gpus(selection, probe(), os.environ)
apply_environment(assignment)  # before anything initialises CUDA
import torch
from transformers import AutoModelForCausalLM
from glmdeploy.loading.loader import load_model
from glmdeploy.inference.runner import bench, generate

first = assignment.devices[0].physical_id
placement = {
    "balanced": dict(strategy=Strategy.BALANCED, reserve_gib=0.5),
    "offload": dict(strategy=Strategy.EXPLICIT, reserve_gib=0.5, offload=Offload.DISK, map=(
        MapEntry(("model.embed_tokens", "model.rotary_emb", "model.layers.0"), first),
        MapEntry(("model.layers.1-2",), "cpu"),
        MapEntry(("model.layers.3", "model.norm", "lm_head"), "disk"))),
}.get(case, dict(strategy=Strategy.BALANCED))
dtype = Dtype.FP32 if case != "bf16" else Dtype.AUTO
dep = make_deployment(architecture=TINY_ARCH, source=ModelSource(SourceKind.EMBEDDED, seed=0),
                      gpus=selection, precision=dtype, max_new_tokens=8, **placement)
precision = resolve_precision(dep.precision, selected_gpus(assignment), model_type="glm")
dep = replace(dep, precision=replace(dep.precision, dtype=precision.dtype))  # plan what loads
devices = [DeviceSpec(d.physical_id, d.physical_id, d.name, d.capacity_bytes)
           for d in assignment.devices]
devices += [DeviceSpec("cpu", None, "cpu", 0), DeviceSpec("disk", None, "disk", 0)]
plan = plan_placement(dep, build_anatomy(config_from_architecture(TINY_ARCH)), devices)
loaded = load_model(dep, plan, assignment, cache_root=cache, precision=precision)
result = generate(loaded, dep.runtime)
ids = torch.tensor([result.prompt_ids[0]])
cpu = AutoModelForCausalLM.from_pretrained(loaded.checkpoint, dtype=torch.float32)
with torch.inference_mode():
    expected = cpu.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    gap = (loaded.model(ids.to(loaded.input_device)).logits.float().cpu() - cpu(ids).logits)
print(json.dumps({
    "gpus": len(assignment.devices), "plan": {k: str(v) for k, v in plan.device_map.items()},
    "loaded": loaded.to_dict(), "tokens": list(result.new_ids[0]), "cpu_tokens": expected,
    "max_logit_gap": gap.abs().max().item(),
    "bench": bench(loaded, dep.runtime, repeats=2).to_dict(),
    "cuda_params": sum(p.device.type == "cuda" for p in loaded.model.parameters()),
}))
"""


def run_case(case: str, tmp_path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), case, str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_balanced_over_every_gpu(tmp_path: Path) -> None:
    result = run_case("balanced", tmp_path)
    used = set(result["loaded"]["device_map"].values())
    assert used <= set(range(result["gpus"])) and len(used) >= min(result["gpus"], 2)
    assert result["tokens"] == result["cpu_tokens"]
    assert result["max_logit_gap"] < 1e-3
    for row in result["loaded"]["device_bytes"]:
        assert row["predicted_bytes"] == row["actual_bytes"]
    memory = {m["device"]: m for m in result["bench"]["memory"]}
    assert all(m["peak_allocated_bytes"] > 0 for k, m in memory.items() if k != "cpu")


def test_gpu_cpu_disk_offload(tmp_path: Path) -> None:
    result = run_case("offload", tmp_path)
    assert set(result["loaded"]["device_map"].values()) == {0, "cpu", "disk"}
    assert result["loaded"]["input_device"] == "cuda:0"
    assert result["tokens"] == result["cpu_tokens"]
    assert result["max_logit_gap"] < 1e-3
    for row in result["loaded"]["device_bytes"]:
        assert row["predicted_bytes"] == row["actual_bytes"]


def test_auto_precision_on_the_gpus(tmp_path: Path) -> None:
    result = run_case("bf16", tmp_path)
    assert result["loaded"]["precision"]["dtype"] in ("bf16", "fp16")
    assert len(result["tokens"]) == 8 and result["cuda_params"] > 0
    for row in result["loaded"]["device_bytes"]:
        assert row["predicted_bytes"] == row["actual_bytes"]
