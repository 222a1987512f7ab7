"""Where vLLM's ranks run (node, GPU) and which decoder layers each pipeline stage holds.

vLLM's layout is DP × PP × TP with TP innermost: global rank r has tp_rank = r % tp and
pp_rank = (r // tp) % pp (config/model.py get_layers_start_end_indices), and each node runs
world ÷ nnodes consecutive ranks on its visible GPUs in CUDA order. glmdeploy makes that order
the physical order (CUDA_DEVICE_ORDER=PCI_BUS_ID, CUDA_VISIBLE_DEVICES ascending) and assumes every
node has the GPUs `gpus` selects. Stages split the layers evenly (vLLM's default), or, when pp > 1
and the stages' GPUs differ, by glmdeploy's exact min-max split written to VLLM_PP_LAYER_PARTITION.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from glmdeploy.config.settings import Deployment
from glmdeploy.engines.vllm import facts
from glmdeploy.hardware.nvml import GpuInfo
from glmdeploy.planning.partition import min_max_split
from glmdeploy.problems import HardwareError, Problem

PP_PARTITION_ENV = "VLLM_PP_LAYER_PARTITION"


@dataclass(frozen=True)
class Slot:
    """One rank's place: node, local rank and the GPU it uses."""

    rank: int
    node: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    gpu: GpuInfo


def rank_slots(deployment: Deployment, gpus: Sequence[GpuInfo]) -> list[Slot]:
    """A slot per rank; `gpus` are the selected GPUs of one node, ascending physical id.

    Raises:
        HardwareError: a node has fewer selected GPUs than the ranks it must run.
    """
    p, nnodes = deployment.parallel, deployment.launch.nnodes
    local_world = p.world_size // nnodes
    if len(gpus) < local_world:
        where = "this node" if nnodes == 1 else "each node"
        message = (
            f"tp_size × pp_size = {p.world_size} ranks need {local_world} GPU(s) on "
            f"{where}, but gpus selects {len(gpus)}"
        )
        hint = "select more GPUs, lower parallel.tp_size/pp_size, or add nodes (launch.nnodes)"
        raise HardwareError([Problem("gpus", message, f"at least {local_world} GPUs", hint)])
    return [
        Slot(
            r,
            r // local_world,
            r % local_world,
            r % p.tp_size,
            (r // p.tp_size) % p.pp_size,
            gpus[r % local_world],
        )
        for r in range(p.world_size)
    ]


def used_gpus(deployment: Deployment, gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The GPUs each node uses: the first world ÷ nnodes selected ones."""
    return list(gpus[: deployment.parallel.world_size // deployment.launch.nnodes])


def stage_partition(
    slots: Sequence[Slot],
    pp_size: int,
    layer_loads: Sequence[int],
    stage_fixed: Sequence[int],
    utilization: float,
) -> tuple[list[int], str]:
    """Layers per pipeline stage, and a sentence saying how they were chosen.

    Args:
        slots: every rank's slot.
        pp_size: pipeline stages.
        layer_loads: bytes one rank needs per decoder layer (weights, KV cache, graphs).
        stage_fixed: bytes each stage's rank needs whatever its layers (embedding, head,
            activations, overhead).
        utilization: `engine.gpu_memory_utilization` (a stage's budget is its smallest GPU's
            ceil(total × utilization)).
    """
    default = facts.default_pp_partition(len(layer_loads), pp_size)
    if pp_size == 1:
        return default, "one stage"
    budgets = [
        min(math.ceil(s.gpu.total_bytes * utilization) for s in slots if s.pp_rank == stage)
        for stage in range(pp_size)
    ]
    if len(set(budgets)) == 1:
        return default, "vLLM's even split (every stage has the same GPUs)"
    bounds, _ = min_max_split(layer_loads, budgets, stage_fixed)
    parts = [b - a for a, b in itertools.pairwise(bounds)]
    if 0 in parts:
        return default, "vLLM's even split (a balanced split would leave a stage without layers)"
    return parts, f"balanced over unequal GPUs by glmdeploy ({PP_PARTITION_ENV})"


def stage_ranges(parts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) layer ranges of the stages."""
    out, start = [], 0
    for n in parts:
        out.append((start, start + n))
        start += n
    return out
