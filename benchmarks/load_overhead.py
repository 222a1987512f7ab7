"""Benchmark: glmdeploy's `load_model` vs a bare `from_pretrained` with the same cpu + disk map.

Both load the same materialised checkpoint (an embedded GLM, ~58 M parameters by default, fp32)
under the same explicit map (embedding and the first half of the blocks on cpu, the rest on disk),
interleaved in one process, after one untimed warm-up of each. glmdeploy's time includes checkpoint
resolution (cached), precision resolution, `from_pretrained` and the placement check. Prints a
Markdown table of medians over N runs and the ratio.

    python benchmarks/load_overhead.py [--repeats 7] [--size 50m|tiny]
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from glmdeploy.config.settings import (
    Architecture,
    Deployment,
    Dtype,
    GpuMode,
    GpuSelection,
    MapEntry,
    ModelSource,
    ModelSpec,
    Offload,
    Placement,
    Precision,
    Runtime,
    SourceKind,
    Strategy,
)  # fmt: skip
from glmdeploy.hardware.gpu_select import GpuAssignment
from glmdeploy.loading.embedded import materialize
from glmdeploy.loading.loader import LoadedModel, load_model
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.planning.types import DeviceSpec, Plan, device_map_for_transformers

SIZES = {
    "50m": Architecture(model_type="glm", vocab_size=32000, hidden_size=512,
                        intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                        attention_bias=True, partial_rotary_factor=0.5),
    "tiny": Architecture(model_type="glm", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=32768, attention_bias=True,
                         partial_rotary_factor=0.5),
}  # fmt: skip


def deployment(arch: Architecture) -> Deployment:
    half = arch.num_hidden_layers // 2
    last = arch.num_hidden_layers - 1
    entries = (
        MapEntry(("model.embed_tokens", "model.rotary_emb", f"model.layers.0-{half - 1}"), "cpu"),
        MapEntry((f"model.layers.{half}-{last}", "model.norm", "lm_head"), "disk"),
    )
    return Deployment(
        model=ModelSpec("bench", ModelSource(SourceKind.EMBEDDED, seed=0), arch),
        gpus=GpuSelection(GpuMode.CPU),
        precision=Precision(Dtype.FP32),
        placement=Placement(Strategy.EXPLICIT, offload=Offload.DISK, map=entries),
        runtime=Runtime(max_context_tokens=256),
    )


def timed(load: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    result = load()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", choices=sorted(SIZES), default="50m")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "parameters on the meta device"
    arch = SIZES[args.size]
    dep = deployment(arch)
    cpu_disk = [DeviceSpec("cpu", None, "cpu", 0), DeviceSpec("disk", None, "disk", 0)]
    plan: Plan = plan_placement(dep, build_anatomy(config_from_architecture(arch)), cpu_disk)
    device_map = device_map_for_transformers(plan)
    assignment = GpuAssignment(GpuMode.CPU, ())
    with tempfile.TemporaryDirectory() as tmp:
        cache, offload = Path(tmp) / "cache", Path(tmp) / "offload"
        materialise_s, checkpoint = timed(lambda: materialize(arch, 0, cache / "embedded"))

        def ours() -> LoadedModel:
            return load_model(dep, plan, assignment, cache_root=cache, offload_folder=offload)

        def bare() -> Any:
            return AutoModelForCausalLM.from_pretrained(
                checkpoint, device_map=device_map, dtype=torch.float32, offload_folder=offload
            )

        n_params = sum(p.numel() for p in bare().parameters())
        ours()  # warm-up: imports, page cache
        times: dict[str, list[float]] = {"glmdeploy": [], "bare": []}
        parts: dict[str, list[float]] = {"prepare": [], "from_pretrained": [], "verify": []}
        for run in range(args.repeats):
            order = (("glmdeploy", ours), ("bare", bare))
            for name, load in order if run % 2 == 0 else order[::-1]:
                seconds, result = timed(load)
                times[name].append(seconds)
                if isinstance(result, LoadedModel):
                    parts["prepare"].append(result.prepare_seconds)
                    parts["from_pretrained"].append(result.load_seconds)
                    parts["verify"].append(result.verify_seconds)
                del result
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"Load overhead, {args.size} GLM ({n_params / 1e6:.1f} M params, fp32), "
          f"map {sum(v == 'cpu' for v in device_map.values())} units cpu / "
          f"{sum(v == 'disk' for v in device_map.values())} disk, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved runs (first materialise: "
          f"{materialise_s:.2f} s, untimed)\n")  # fmt: skip
    print("| load | median ms | min ms | max ms | vs bare |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {ms[name]:.1f} | {min(values) * 1e3:.1f} | {max(values) * 1e3:.1f} "
              f"| {ms[name] / ms['bare']:.2f}× |")  # fmt: skip
    print()
    print("glmdeploy's parts (median ms): " + ", ".join(
        f"{name} {statistics.median(values) * 1e3:.1f}" for name, values in parts.items()
    ))  # fmt: skip


if __name__ == "__main__":
    main()
