"""The fit check with vLLM 0.33.0's memory rules, per rank (one rank per GPU).

Exact where vLLM's rule is arithmetic, an ESTIMATE where vLLM measures (formulas as coded below,
stated in the README):

    requested      = ceil(total × gpu_memory_utilization)     must be ≤ free at startup, where free
                     at startup = free − CUDA context (0.5 GiB) − communicators (0.5 GiB, world > 1)
    available KV   = requested − weights − overhead − activation peak − CUDA graphs
      weights      = the rank's tensor-parallel shares of its pipeline stage (shards.py), exact
      overhead     = 0.25 GiB of persistent buffers and non-torch memory            (estimate)
      activation   = 1.10 × max(MLP, MoE, QKV, logits) live tensors of the profiling run on
                     T = max_num_batched_tokens tokens over R = min(T, max_num_seqs) requests:
                     MLP T·(3F/tp + H)·b, MoE T·k·(3F_moe/tp + H)·b,
                     QKV T·((q/tp + 2·kv_rank)·d + H)·b,
                     logits (last stage) R·V·(b + 8)                                 (estimate)
      CUDA graphs  = 0 with enforce_eager, else sizes × layers × 0.25 MiB + the MLP/QKV term at
                     the largest capture size                                        (estimate)
    KV bytes/token = layers × 2 × max(1, kv_heads // tp) × head_dim × kv dtype bytes
    bytes/block    = bytes/token × block_size
    one request    fits when available − bytes/block ≥ ⌈max_model_len / block_size⌉ × bytes/block
    num_blocks     = min over ranks of available // bytes/block
    concurrency    = num_blocks / ⌈max_model_len / block_size⌉          (vLLM's logged figure)
    largest length = min over ranks of (available − bytes/block) // bytes/block × block_size
    fits           = every rank starts, one request fits, and num_blocks − 1 (the null block)
                     ≥ runtime.batch_size × ⌈max_model_len / block_size⌉
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from glmdeploy.config.settings import GIB
from glmdeploy.engines.vllm import facts


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions vLLM's memory depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_padded: int
    moe_intermediate: int = 0  # 0: no experts
    experts_per_token: int = 0
    first_moe_layer: int = 0  # layers before it are dense MLPs


@dataclass(frozen=True)
class RankInput:
    """One rank: where it runs, which layers it holds, and its weight bytes."""

    rank: int
    node: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    gpu_id: int
    gpu_name: str
    total_bytes: int
    free_bytes: int
    layers: tuple[int, int]  # [start, end)
    weights_bytes: int
    last_stage: bool


@dataclass(frozen=True)
class Settings:
    """The vLLM settings the arithmetic depends on, resolved."""

    tp_size: int
    world_size: int
    gpu_memory_utilization: float
    max_model_len: int
    model_max_len: int
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    capture_sizes: tuple[int, ...]  # empty: enforce_eager
    dtype_bytes: int
    kv_dtype_bytes: int
    batch_size: int


@dataclass(frozen=True)
class RankFit:
    """One rank's budget (bytes) and verdicts."""

    rank: int
    node: int
    tp_rank: int
    pp_rank: int
    gpu_id: int
    gpu_name: str
    layers: tuple[int, int]
    total_bytes: int
    requested_bytes: int
    free_at_start_bytes: int
    weights_bytes: int
    overhead_bytes: int
    activation_bytes: int
    cudagraph_bytes: int
    kv_available_bytes: int
    kv_heads: int
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    num_blocks: int
    starts: bool
    one_request_fits: bool
    largest_max_model_len: int
    min_gpu_memory_utilization: float  # for runtime.batch_size sequences of max_model_len

    @property
    def non_kv_bytes(self) -> int:
        return (
            self.weights_bytes + self.overhead_bytes + self.activation_bytes + self.cudagraph_bytes
        )


@dataclass(frozen=True)
class VllmFit:
    """The fit of a whole deployment: every rank, and what vLLM would report."""

    ranks: tuple[RankFit, ...]
    settings: Settings
    num_blocks: int
    concurrency: float
    kv_cache_tokens: int
    largest_max_model_len: int
    concurrency_at_largest: float  # vLLM's figure if max-model-len were the largest that fits
    min_gpu_memory_utilization: float | None  # None: no utilisation can make it fit
    max_gpu_memory_utilization: float  # the highest that still starts on every GPU
    fits: bool
    estimates: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ranks"] = [{**asdict(r), "non_kv_bytes": r.non_kv_bytes} for r in self.ranks]
        return data


def activation_bytes(shape: ModelShape, s: Settings, layers: tuple[int, int], last: bool) -> int:
    """ESTIMATE of the profiling run's transient peak on one rank (see the module docstring)."""
    tokens = s.max_num_batched_tokens
    requests = min(tokens, s.max_num_seqs)
    peak = _layer_peak(shape, s, layers, tokens)
    if last:
        peak = max(peak, requests * shape.vocab_padded * (s.dtype_bytes + 8))
    return math.ceil(facts.ACTIVATION_SLACK * peak)


def _layer_peak(shape: ModelShape, s: Settings, layers: tuple[int, int], tokens: int) -> int:
    tp, b = s.tp_size, s.dtype_bytes
    kv_rank = facts.kv_heads_per_rank(shape.kv_heads, tp)
    peak = tokens * ((shape.heads // tp + 2 * kv_rank) * shape.head_dim + shape.hidden) * b
    start, end = layers
    moe = shape.experts_per_token > 0
    if not moe or start < shape.first_moe_layer:
        peak = max(peak, tokens * (3 * shape.intermediate // tp + shape.hidden) * b)
    if moe and end > shape.first_moe_layer:
        width = 3 * shape.moe_intermediate // tp + shape.hidden
        peak = max(peak, tokens * shape.experts_per_token * width * b)
    return peak


def cudagraph_bytes(shape: ModelShape, s: Settings, layers: tuple[int, int]) -> int:
    """ESTIMATE of vLLM's CUDA-graph term (0 when enforce_eager: no capture sizes)."""
    if not s.capture_sizes:
        return 0
    pieces = len(s.capture_sizes) * (layers[1] - layers[0]) * facts.CUDAGRAPH_BYTES_PER_PIECE
    return pieces + _layer_peak(shape, s, layers, max(s.capture_sizes))


def fit_check(ranks: Sequence[RankInput], shape: ModelShape, s: Settings) -> VllmFit:
    """Every rank's budget under vLLM's rules, and the deployment's verdict."""
    fits = tuple(_rank_fit(r, shape, s) for r in ranks)
    blocks_per_request = -(-s.max_model_len // s.block_size)
    with_kv = [f for f in fits if f.kv_bytes_per_block]
    num_blocks = min((f.num_blocks for f in with_kv), default=0)
    concurrency = num_blocks / blocks_per_request
    largest = min((f.largest_max_model_len for f in with_kv), default=0)
    needed = max(f.min_gpu_memory_utilization for f in fits)
    ceiling = min(f.free_at_start_bytes / f.total_bytes for f in fits)
    ceiling = math.floor(min(ceiling, 1.0) * 100) / 100
    ok = (
        all(f.starts and f.one_request_fits for f in fits)
        and num_blocks - 1 >= s.batch_size * blocks_per_request
    )
    return VllmFit(
        ranks=fits,
        settings=s,
        num_blocks=num_blocks,
        concurrency=concurrency,
        kv_cache_tokens=int(concurrency * s.max_model_len),
        largest_max_model_len=largest,
        concurrency_at_largest=num_blocks / -(-largest // s.block_size) if largest else 0.0,
        min_gpu_memory_utilization=needed if needed <= ceiling else None,
        max_gpu_memory_utilization=ceiling,
        fits=ok,
        estimates=ESTIMATES,
    )


ESTIMATES = {
    "other": "0.25 GiB of persistent buffers and non-torch memory after vLLM's snapshot",
    "activ.": "1.10 × the largest live tensors of the profiling run (MLP, MoE, QKV, logits)",
    "graphs": "capture sizes × layers × 0.25 MiB + the MLP/QKV tensors at the largest size "
    "(0 with engine.enforce_eager=true)",
    "startup": "0.5 GiB CUDA context (+0.5 GiB NCCL when tp × pp > 1) must fit in free memory",
}


def _rank_fit(r: RankInput, shape: ModelShape, s: Settings) -> RankFit:
    layers_on_rank = r.layers[1] - r.layers[0]
    kv_heads = facts.kv_heads_per_rank(shape.kv_heads, s.tp_size)
    per_token = layers_on_rank * 2 * kv_heads * shape.head_dim * s.kv_dtype_bytes
    per_block = per_token * s.block_size
    requested = math.ceil(r.total_bytes * s.gpu_memory_utilization)
    context = facts.CUDA_CONTEXT_BYTES + (facts.COMMUNICATOR_BYTES if s.world_size > 1 else 0)
    free_at_start = r.free_bytes - context
    activation = activation_bytes(shape, s, r.layers, r.last_stage)
    graphs = cudagraph_bytes(shape, s, r.layers)
    non_kv = r.weights_bytes + facts.PROFILE_OVERHEAD_BYTES + activation + graphs
    available = requested - non_kv
    blocks_per_request = -(-s.max_model_len // s.block_size)
    if per_block:
        num_blocks = max(available, 0) // per_block
        check = available - per_block  # one null block is held back
        fits_one = available > 0 and check >= blocks_per_request * per_block
        largest = min(max(check, 0) // per_block * s.block_size, s.model_max_len)
        need = non_kv + (s.batch_size * blocks_per_request + 1) * per_block
    else:  # a stage without attention layers keeps no KV cache
        num_blocks, fits_one, largest, need = 0, available > 0, s.model_max_len, non_kv
    return RankFit(
        rank=r.rank,
        node=r.node,
        tp_rank=r.tp_rank,
        pp_rank=r.pp_rank,
        gpu_id=r.gpu_id,
        gpu_name=r.gpu_name,
        layers=r.layers,
        total_bytes=r.total_bytes,
        requested_bytes=requested,
        free_at_start_bytes=free_at_start,
        weights_bytes=r.weights_bytes,
        overhead_bytes=facts.PROFILE_OVERHEAD_BYTES,
        activation_bytes=activation,
        cudagraph_bytes=graphs,
        kv_available_bytes=available,
        kv_heads=kv_heads,
        kv_bytes_per_token=per_token,
        kv_bytes_per_block=per_block,
        num_blocks=num_blocks,
        starts=free_at_start >= requested,
        one_request_fits=fits_one,
        largest_max_model_len=largest,
        min_gpu_memory_utilization=math.ceil(need / r.total_bytes * 100) / 100,
    )


def gib(n: int | float) -> float:
    return n / GIB
