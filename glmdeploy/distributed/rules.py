"""What transformers' tensor and pipeline parallelism cannot run, refused before anything starts.

Pure functions of the architecture facts and the config (no torch, no transformers import): the
config rules (`glmdeploy.config.rules`) call them with the model option's architecture at
`validate` time; the per-rank planner calls them again with the facts of a local checkpoint's
config.json, together with the checks that need transformers (a TP/PP plan) or the machine (GPUs).
Each problem says why and names the fix, including `engine=vllm` where vLLM can do what
transformers cannot (it replicates KV heads, and combines TP with PP).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from glmdeploy.config.settings import Deployment, EngineName
from glmdeploy.problems import Problem

# transformers 5.24 expands the TP plan before pipeline parallelism swaps out other stages' layers:
# every rank raises KeyError in apply_tensor_parallelism. Newer versions are not known to be broken.
TP_WITH_PP_BROKEN_UP_TO = (5, 24)
VLLM = "engine=vllm"


@dataclass(frozen=True)
class ModelFacts:
    """The architecture numbers tensor and pipeline parallelism depend on."""

    model_type: str
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int
    moe_intermediate_size: int | None = None  # mixture-of-experts models only


@dataclass(frozen=True)
class ParallelRequest:
    """What the config asks for, as plain values (from a config dict or a `Deployment`)."""

    tp_size: int
    pp_size: int
    strategy: str = "auto"
    offload: str = "none"
    quantization: str = "none"

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


def runs_on_torchrun(deployment: Deployment) -> bool:
    """Whether glmdeploy runs this deployment as torchrun ranks (world size > 1, transformers)."""
    return deployment.parallel.world_size > 1 and deployment.engine.name is EngineName.TRANSFORMERS


def request_of(deployment: Deployment) -> ParallelRequest:
    p, placement = deployment.parallel, deployment.placement
    return ParallelRequest(
        p.tp_size,
        p.pp_size,
        str(placement.strategy),
        str(placement.offload),
        str(deployment.precision.quantization),
    )


def transformers_parallel_problems(
    request: ParallelRequest, model: ModelFacts | None, version: tuple[int, int] | None
) -> list[Problem]:
    """Everything transformers' native TP/PP refuses or crashes on, for `engine=transformers`.

    Args:
        request: tp/pp sizes, placement and quantisation.
        model: the architecture facts (None: not known yet; the planner checks them later).
        version: the installed transformers' (major, minor); None: not installed.
    """
    tp, pp = request.tp_size, request.pp_size
    if request.world_size == 1:
        return []
    out = _placement_problems(request)
    if tp > 1 and pp > 1 and version is not None and version <= TP_WITH_PP_BROKEN_UP_TO:
        out.append(
            Problem(
                "parallel",
                f"tp_size={tp} with pp_size={pp}: transformers {version[0]}.{version[1]} cannot "
                "combine tensor and pipeline parallelism (every rank fails with KeyError in "
                "apply_tensor_parallelism: the TP plan names layers that PP has removed)",
                "tensor or pipeline parallelism alone",
                f"{VLLM} runs TP × PP; with transformers, one of them: parallel.pp_size=1 "
                f"(tp {tp}) or parallel.tp_size=1 (pp {pp})",
            )
        )
    if tp > 1 and request.quantization != "none":
        out.append(
            Problem(
                "precision.quantization",
                f"{request.quantization} with tp_size={tp}: bitsandbytes weights cannot be "
                "sharded (transformers has no tensor-parallel support for them)",
                "quantization=none with tensor parallelism",
                "precision=bf16 or fp16, or pipeline parallelism alone (parallel.tp_size=1)",
            )
        )
    if model is not None:
        out += _model_problems(tp, pp, model)
    return out


def _placement_problems(request: ParallelRequest) -> list[Problem]:
    out = []
    why = (
        "a device map places modules in one process; parallel ranks each load their own share "
        "(transformers: device_map and tensor parallelism are mutually exclusive)"
    )
    if request.strategy != "auto":
        out.append(
            Problem(
                "placement.strategy",
                f"{request.strategy} with parallel tp_size={request.tp_size} × "
                f"pp_size={request.pp_size}: {why}",
                "placement=auto (not used by parallel ranks)",
                "placement=auto, or parallel=none to keep the device map",
            )
        )
    if request.offload != "none":
        out.append(
            Problem(
                "placement.offload",
                f"{request.offload} with parallel ranks: offload is part of a device map; every "
                "rank keeps its whole share in its own memory",
                "placement.offload=none",
                "placement.offload=none (more ranks hold less each), or parallel=none",
            )
        )
    return out


def _model_problems(tp: int, pp: int, model: ModelFacts) -> list[Problem]:
    out: list[Problem] = []
    if tp > 1:
        heads = [
            ("num_attention_heads", model.num_attention_heads, "attention heads"),
            ("num_key_value_heads", model.num_key_value_heads, "KV heads"),
        ]
        for key, count, what in heads:
            if count % tp:
                out.append(_head_problem(key, count, what, tp))
        sizes = [
            ("intermediate_size", model.intermediate_size),
            ("moe_intermediate_size", model.moe_intermediate_size),
        ]
        for key, size in sizes:
            if size is not None and size % tp:
                out.append(
                    Problem(
                        "parallel.tp_size",
                        f"{tp} does not divide {key} {size} of {model.model_type}: the MLP "
                        "shards would differ in size (and vLLM refuses it)",
                        f"a divisor of {size}",
                        _divisor_hint(size, tp),
                    )
                )
    if pp > model.num_hidden_layers:
        out.append(
            Problem(
                "parallel.pp_size",
                f"{pp} pipeline stages for {model.num_hidden_layers} decoder layers: a stage "
                "would hold no layer",
                f"at most {model.num_hidden_layers}",
                f"parallel.pp_size={model.num_hidden_layers} or fewer",
            )
        )
    return out


def _head_problem(key: str, count: int, what: str, tp: int) -> Problem:
    kv = key == "num_key_value_heads"
    detail = (
        "transformers splits K/V by head and does not replicate them (it loads, then every "
        "rank crashes at the first forward)"
        if kv
        else "each rank must hold whole heads"
    )
    hint = _divisor_hint(count, tp)
    if kv:
        hint += f"; {VLLM} replicates KV heads, so tp_size={tp} works there"
    return Problem(
        "parallel.tp_size",
        f"{tp} does not divide the model's {count} {what} ({key}): {detail}",
        f"a divisor of {count}",
        hint,
    )


def _divisor_hint(n: int, tp: int) -> str:
    fits = [d for d in range(2, tp) if n % d == 0]
    if fits:
        return f"parallel.tp_size={fits[-1]}"
    return "parallel=none, or pipeline parallelism (parallel.pp_size)"


def gpu_count_problems(
    world_size: int, nnodes: int, gpus_per_node: int | None, where: str = "gpus"
) -> list[Problem]:
    """Each rank needs a GPU of its own: world size ÷ nodes ≤ the GPUs selected per node.

    `gpus_per_node` None: not known here (gpus=auto or least_used before probing); 0: the ranks
    run on the CPU (gloo), any number of them.
    """
    local = world_size // max(nnodes, 1)
    if not gpus_per_node or local <= gpus_per_node:
        return []
    nodes = f" on each of {nnodes} nodes" if nnodes > 1 else ""
    return [
        Problem(
            where,
            f"{local} ranks per node need {local} GPUs{nodes}, but {gpus_per_node} "
            f"{'is' if gpus_per_node == 1 else 'are'} selected",
            f"at least {local} GPUs per node (tp_size × pp_size ÷ launch.nnodes)",
            "select more GPUs, spread the ranks over more nodes (launch.nnodes), or use fewer "
            "ranks; gpus=cpu runs them as CPU processes (gloo)",
        )
    ]


def installed_transformers() -> tuple[int, int] | None:
    """(major, minor) of the installed transformers, read from its metadata (no import)."""
    try:
        text = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = [int(p) for p in text.split(".")[:2] if p.isdigit()]
    return (parts[0], parts[1]) if len(parts) == 2 else None
