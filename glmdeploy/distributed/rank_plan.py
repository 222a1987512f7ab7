"""Per-rank plans for tensor and pipeline parallelism: each rank's shards and its memory budget.

One `BudgetRow` per rank, in rank order (torchrun's layout: rank = stage × tp_size + tp_rank,
node = rank ÷ ranks per node), through the same memory model as device-map plans
(`glmdeploy.planning.memory`):

    weights   = Σ the rank's local shard bytes (`rank_tensors`: the stage's units, each parameter
                split by its TP style, buffers whole)
    KV cache  = the stage's decoder layers × `kv_bytes_per_layer` ÷ tp_size (KV heads are split)
    workspace = the largest of the stage's units' workspaces and the head's, on every rank (the
                unsharded model's traced workspace: GLM's gate_up output is gathered on every TP
                rank, and the logits are gathered (TP) or broadcast (PP) to all ranks)
    reserve   = placement.reserve_gib on a GPU rank, 0 on a CPU rank
    capacity  = its GPU (after gpus.max_memory_gib), or the CPU budget ÷ ranks on the node

The per-tensor numbers (`rank_tensors`) are what the loader checks each rank against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from glmdeploy.config.settings import GIB, Deployment, Dtype, Quantization
from glmdeploy.distributed import rules
from glmdeploy.distributed.shard_table import ShardTable, math_prod, shard_table
from glmdeploy.distributed.shards import (
    SPLIT_AXIS,
    UnknownStyle,
    is_split,
    layer_range,
    local_shape,
    stage_units,
    style_for,
    unit_of,
    wildcard,
)
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.hf_config import hf_config_for
from glmdeploy.planning.budget import TOLERANCE, fingerprint, percent, size
from glmdeploy.planning.budget import _row as _budget_row
from glmdeploy.planning.memory import MemoryModel, deployment_memory
from glmdeploy.planning.types import (
    BudgetRow,
    DeviceSpec,
    ParallelLayout,
    Plan,
    PlanDoesNotFit,
    RankShare,
    Verdict,
    device_label,
)
from glmdeploy.planning.workspace_term import workspace_note
from glmdeploy.problems import ConfigError, Problem

TensorShards = dict[str, tuple[tuple[int, ...], int]]  # tensor -> (local shape, bytes)


def plan_ranks(
    deployment: Deployment,
    anatomy: Anatomy,
    devices: Sequence[DeviceSpec],
    *,
    weights_only: bool = False,
) -> Plan:
    """The per-rank plan of a `parallel` deployment on this node's `devices` (GPUs, then cpu).

    Every node is assumed to select the same GPUs as this one.

    Raises:
        ConfigError: transformers cannot run this layout (`glmdeploy.distributed.rules`).
        PlanDoesNotFit: a rank exceeds its budget; `.plan` is the plan.
    """
    p, nnodes = deployment.parallel, deployment.launch.nnodes
    table = table_for(deployment, anatomy)
    gpus = [d for d in devices if isinstance(d.key, int)]
    check_plannable(deployment, table, len(gpus))
    local = p.world_size // nnodes
    memory = deployment_memory(deployment, anatomy, gpus=bool(gpus), weights_only=weights_only)
    used = gpus[:local] or [next(d for d in devices if d.key == "cpu")]
    capacities = {d.key: d.capacity_bytes // (1 if gpus else local) for d in used}
    shares = tuple(
        _share(rank, p.tp_size, p.pp_size, local, len(anatomy.blocks))
        for rank in range(p.world_size)
    )
    rows = tuple(
        _row(
            share,
            deployment,
            anatomy,
            table,
            memory,
            used[share.local_rank if gpus else 0],
            capacities,
        )
        for share in shares
    )
    split, replicated = _split_lists(table, p.tp_size)
    layout = ParallelLayout(
        p.tp_size, p.pp_size, nnodes, "nccl" if gpus else "gloo", shares, split, replicated
    )
    notes = _notes(deployment, anatomy, table, layout, gpus, local)
    if memory.workspace is not None:
        notes.insert(0, workspace_note(memory.workspace))
    plan = Plan(
        strategy=f"tp {p.tp_size} × pp {p.pp_size}",
        device_map={},
        rows=rows,
        hops=(),
        verdict=rank_verdict(rows),
        notes=tuple(notes),
        fingerprint=fingerprint(anatomy, memory, deployment.runtime, used, capacities),
        parallel=layout,
        workspace=memory.workspace,
    )
    if not plan.fits:
        raise PlanDoesNotFit(_shortfalls(plan), plan)
    return plan


def rank_verdict(rows: Sequence[BudgetRow]) -> Verdict:
    """The plan's one verdict over its rank rows: the binding rank and its utilisation."""
    binding = max(rows, key=lambda r: r.utilisation)
    where = f"rank {binding.rank}, {device_label(binding.device)}"
    if binding.utilisation <= 1 + TOLERANCE:
        sentence = (
            f"fits: {len(rows)} ranks, peak {percent(binding.utilisation)} of a rank's budget "
            f"({where})"
        )
        return Verdict(True, binding.device, binding.utilisation, sentence)
    over = ", ".join(str(r.rank) for r in rows if r.utilisation > 1 + TOLERANCE)
    sentence = (
        f"does not fit: rank {over} over budget, peak {percent(binding.utilisation)} ({where} "
        f"would need {size(binding.total_bytes)} of its {size(binding.capacity_bytes)})"
    )
    return Verdict(False, binding.device, binding.utilisation, sentence)


def table_for(deployment: Deployment, anatomy: Anatomy) -> ShardTable:
    hf_config = anatomy.hf_config
    return shard_table(hf_config if hf_config is not None else hf_config_for(deployment.model))


def check_plannable(deployment: Deployment, table: ShardTable, gpus: int) -> None:
    """The parallel rules on the model's own config (local checkpoints too), its TP/PP plans and
    this machine's GPU count. Raises ConfigError with every problem."""
    p = deployment.parallel
    version = rules.installed_transformers()
    problems = rules.transformers_parallel_problems(
        rules.request_of(deployment), table.facts, version
    )
    missing = [
        ("tp_size", p.tp_size, table.has_tp_plan, "tensor", "base_model_tp_plan"),
        ("pp_size", p.pp_size, table.has_pp_plan, "pipeline", "base_model_pp_plan"),
    ]
    for key, n_ranks, present, what, attr in missing:
        if n_ranks > 1 and not present:
            hint = "parallel=none (a device map), or engine=vllm"
            if table.model_type == "chatglm":
                hint = "convert it to native GLM first: model.source.layout=chatglm"
            problems.append(
                Problem(
                    f"parallel.{key}",
                    f"{table.model_type} ({table.model_class}) has no {what}-parallel plan in "
                    f"transformers (its config class has no {attr})",
                    f"an architecture with {attr}, e.g. glm, glm4, glm4_moe, llama, qwen2",
                    hint,
                )
            )
    problems += rules.gpu_count_problems(p.world_size, deployment.launch.nnodes, gpus)
    if problems:
        raise ConfigError(problems, "transformers cannot run this parallel layout")


def rank_tensors(
    table: ShardTable,
    anatomy: Anatomy,
    dtype: Dtype,
    quantization: Quantization,
    tp: int,
    pp: int,
    rank: int,
) -> TensorShards:
    """Every tensor rank `rank` holds, with its local shape and bytes in `dtype`.

    Raises:
        ConfigError: the TP plan uses a style glmdeploy cannot size.
    """
    stage, tp_rank = divmod(rank, tp)
    kept = set(stage_units(anatomy, stage, pp, table.tie_word_embeddings))
    out: TensorShards = {}
    for entry in table.tensors:
        unit = unit_of(entry.name, anatomy.names)
        if unit is not None and unit not in kept:
            continue
        style = style_for(entry.name, table.tp_plan) if entry.is_param else None
        try:
            shape = local_shape(entry.shape, style, entry.name.rsplit(".", 1)[-1], tp, tp_rank)
        except UnknownStyle as exc:
            hint = "parallel.tp_size=1, or engine=vllm"
            raise ConfigError([Problem("parallel.tp_size", str(exc), hint=hint)]) from exc
        full = entry.tally.bytes(dtype, quantization)
        out[entry.name] = (shape, full * math_prod(shape) // entry.numel if entry.numel else 0)
    return out


def _share(rank: int, tp: int, pp: int, local: int, layers: int) -> RankShare:
    stage, tp_rank = divmod(rank, tp)
    node, local_rank = divmod(rank, local)
    return RankShare(rank, node, local_rank, stage, tp_rank, layer_range(stage, pp, layers))


def _row(
    share: RankShare,
    deployment: Deployment,
    anatomy: Anatomy,
    table: ShardTable,
    memory: MemoryModel,
    spec: DeviceSpec,
    capacities: dict[int | str, int],
) -> BudgetRow:
    p, precision = deployment.parallel, deployment.precision
    tensors = rank_tensors(
        table, anatomy, precision.dtype, precision.quantization, p.tp_size, p.pp_size, share.rank
    )
    params = {e.name for e in table.tensors if e.is_param}
    units = stage_units(anatomy, share.stage, p.pp_size, table.tie_word_embeddings)
    index = {name: i for i, name in enumerate(anatomy.names)}
    weights = sum(nbytes for _, nbytes in tensors.values())
    kv = sum(memory.unit_kv[index[u]] for u in units) // p.tp_size
    head = [i for i, u in enumerate(anatomy.units) if u.kind == "head"]
    workspace = memory.workspace_of([*(index[u] for u in units), *head])
    reserve = memory.reserve if isinstance(spec.key, int) else 0
    # The device-map budget row (utilisation rule included), with this rank's own shards.
    row = _budget_row(spec, anatomy, memory, [index[u] for u in units], weights, kv, workspace,
                      reserve, capacities[spec.key])  # fmt: skip
    n_params = sum(math_prod(shape) for n, (shape, _) in tensors.items() if n in params)
    return dataclasses.replace(row, n_params=n_params, rank=share.rank)


def _split_lists(table: ShardTable, tp: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Wildcard names of the split parameters (with rank 0's shard) and of the whole tensors."""
    split: dict[str, str] = {}
    whole: dict[str, None] = {}
    for entry in table.tensors:
        style = style_for(entry.name, table.tp_plan) if entry.is_param else None
        name = wildcard(entry.name)
        if tp > 1 and is_split(style) and style is not None:
            local = local_shape(entry.shape, style, name.rsplit(".", 1)[-1], tp, 0)
            axis = "whole (bias)" if local == entry.shape else SPLIT_AXIS.get(style, style)
            split.setdefault(name, f"{name} {list(entry.shape)} → {list(local)}: {axis}")
        else:
            whole.setdefault(name)
    return tuple(split.values()), tuple(whole)


def _notes(
    deployment: Deployment,
    anatomy: Anatomy,
    table: ShardTable,
    layout: ParallelLayout,
    gpus: Sequence[DeviceSpec],
    local: int,
) -> list[str]:
    tp, pp = layout.tp_size, layout.pp_size
    notes = []
    where = "their own GPU (nccl)" if gpus else "the CPU as processes (gloo)"
    nodes = f"{layout.nnodes} nodes × {local}" if layout.nnodes > 1 else f"{local}"
    notes.append(f"{tp * pp} ranks ({nodes} per node) under torchrun, each on {where}")
    if tp > 1:
        kv = anatomy.num_key_value_heads
        notes.append(
            f"tensor parallel over {tp} ranks: {len(layout.split)} parameter(s) split (each rank "
            f"holds 1/{tp}), {len(layout.replicated)} whole on every rank; KV cache: "
            f"{kv // tp} of {kv} KV heads per rank; every layer all-reduces across the ranks"
        )
    for stage in range(pp if pp > 1 else 0):
        start, end = layer_range(stage, pp, len(anatomy.blocks))
        ranks = [s.rank for s in layout.ranks if s.stage == stage]
        extra = [
            u
            for u in stage_units(anatomy, stage, pp, table.tie_word_embeddings)
            if anatomy.unit(u).kind != "block"
        ]
        notes.append(
            f"pipeline stage {stage} (rank {', '.join(map(str, ranks))}): layers {start}-"
            f"{end - 1} ({end - start} of {len(anatomy.blocks)}), with {', '.join(extra)}"
        )
    spare = [d.key for d in gpus[local:]]
    if spare:
        notes.append(
            f"GPU {', '.join(map(str, spare))} selected but unused: {local} rank(s) per node"
        )
    if layout.nnodes > 1:
        notes.append("every node is assumed to select the same GPUs as this one")
    return notes


def _shortfalls(plan: Plan) -> list[Problem]:
    out = []
    for row in plan.rows:
        if row.utilisation <= 1 + TOLERANCE:
            continue
        need = (row.total_bytes - row.reserve_bytes) / GIB
        have = max(row.capacity_bytes - row.reserve_bytes, 0) / GIB
        out.append(
            Problem(
                f"parallel (rank {row.rank})",
                f"rank {row.rank} on {device_label(row.device)} needs {need:.2f} GiB, "
                f"its budget is {have:.2f} GiB (weights {row.weights_bytes / GIB:.2f}, KV "
                f"{row.kv_bytes / GIB:.2f}, workspace {row.workspace_bytes / GIB:.2f})",
                hint="more ranks (parallel.tp_size / pp_size), a shorter context or smaller "
                "batch (runtime.max_context_tokens, runtime.batch_size), or larger GPUs",
            )
        )
    return out
