"""What an export tells the user besides numbers: why it does not fit (with fixes to paste), and
the notes that qualify it (replicated KV heads, remote code, mapped quantisation, assumptions)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from glmdeploy.config.settings import GIB, Quantization
from glmdeploy.engines.vllm import facts
from glmdeploy.problems import Problem

if TYPE_CHECKING:
    from glmdeploy.config.settings import Deployment
    from glmdeploy.engines.vllm.checkpoint import VllmCheckpoint
    from glmdeploy.engines.vllm.fit import RankFit, VllmFit
    from glmdeploy.engines.vllm.shards import RankWeights
    from glmdeploy.hardware.nvml import GpuInfo
    from glmdeploy.model.anatomy import Anatomy

UTIL = "engine.gpu_memory_utilization"


def format_gib(n: float) -> str:
    """vLLM's own rounding (utils/mem_utils.py format_gib)."""
    return f"{round(n / GIB, 2)}"


def fit_problems(fit: VllmFit) -> list[Problem]:
    """Why the deployment does not fit, worst rank first, with the fixes that would make it."""
    s = fit.settings
    out: list[Problem] = []
    for r in _one_per_gpu(f for f in fit.ranks if not f.starts):
        out.append(
            Problem(
                UTIL,
                f"vLLM would not start on GPU {r.gpu_id} ({r.gpu_name}): "
                f"{format_gib(r.free_at_start_bytes)} GiB free after the CUDA context (estimate) "
                "is less than the "
                f"{format_gib(r.requested_bytes)} GiB requested ({s.gpu_memory_utilization} × "
                f"{format_gib(r.total_bytes)} GiB)",
                f"at most {fit.max_gpu_memory_utilization}",
                f"{UTIL}={fit.max_gpu_memory_utilization}, or free memory on that GPU",
            )
        )
    blocks = -(-s.max_model_len // s.block_size)
    starved = [f for f in fit.ranks if f.starts and f.kv_available_bytes <= 0]
    short = [
        f for f in fit.ranks if f.starts and f.kv_available_bytes > 0 and not f.one_request_fits
    ]
    for r in starved[:1]:
        out.append(
            Problem(
                UTIL,
                f"rank {r.rank} (GPU {r.gpu_id}): vLLM: No available memory for the cache blocks "
                f"(weights {format_gib(r.weights_bytes)} + activations "
                f"{format_gib(r.activation_bytes)} + CUDA graphs {format_gib(r.cudagraph_bytes)} + "
                f"other {format_gib(r.overhead_bytes)} GiB use all of the "
                f"{format_gib(r.requested_bytes)} GiB requested)",
            )
        )
    for r in sorted(short, key=lambda f: f.largest_max_model_len)[:1]:
        need = blocks * r.kv_bytes_per_block
        check = r.kv_available_bytes - r.kv_bytes_per_block
        estimate = (
            f"Based on the available memory, the estimated maximum model length is "
            f"{r.largest_max_model_len}. "
            if r.largest_max_model_len > 0
            else ""
        )
        out.append(
            Problem(
                "runtime.max_context_tokens",
                f"rank {r.rank} (GPU {r.gpu_id}): vLLM: To serve at least one request with the "
                f"model's max seq len ({s.max_model_len}), ({format_gib(need)} GiB KV cache is "
                "needed, which is larger than the available KV cache memory "
                f"({format_gib(check)} GiB). {estimate}".rstrip(),
                None,
                _length_hint(fit.ranks, s.batch_size, s.block_size),
            )
        )
    if not out and fit.num_blocks - 1 < s.batch_size * blocks:
        most = max((fit.num_blocks - 1) // blocks, 0)
        out.append(
            Problem(
                "runtime.batch_size",
                f"{s.batch_size} sequences of {s.max_model_len} tokens need "
                f"{s.batch_size * blocks + 1} KV blocks per rank; vLLM would have {fit.num_blocks} "
                f"(maximum concurrency {fit.concurrency:.2f}x)",
                f"at most {most}",
                f"runtime.batch_size={most}"
                if most
                else _length_hint(fit.ranks, s.batch_size, s.block_size),
            )
        )
    out += _utilization_fix(fit)
    return out


def _one_per_gpu(ranks: Iterable[RankFit]) -> list[RankFit]:
    seen: dict[int, RankFit] = {}
    for r in ranks:
        seen.setdefault(r.gpu_id, r)
    return list(seen.values())


def _length_hint(ranks: Sequence[RankFit], batch: int, block: int) -> str | None:
    """The longest max_model_len at which `batch` sequences fit on every rank."""
    with_kv = [r for r in ranks if r.kv_bytes_per_block]
    blocks = min((r.num_blocks for r in with_kv), default=0) - 1
    length = blocks // max(batch, 1) * block
    return f"runtime.max_context_tokens={length}" if length > 0 else None


def _utilization_fix(fit: VllmFit) -> list[Problem]:
    """A utilisation that makes it fit, when raising it is the fix (none if no value fits)."""
    now, needed = fit.settings.gpu_memory_utilization, fit.min_gpu_memory_utilization
    if needed is None:
        want = max(r.min_gpu_memory_utilization for r in fit.ranks)
        return [Problem(
            UTIL, f"no value fits: the deployment needs {want} of a GPU, and vLLM starts with at "
            f"most {fit.max_gpu_memory_utilization} (the rest is CUDA context and other processes)",
            None, "more GPUs (parallel.tp_size or parallel.pp_size), a shorter "
            "runtime.max_context_tokens, precision.quantization=int8, or larger GPUs",
        )]  # fmt: skip
    if needed > now:
        message = f"{now} is too little for this deployment: it fits from {needed}"
        expected = f"{needed} … {fit.max_gpu_memory_utilization}"
        return [Problem(UTIL, message, expected, f"{UTIL}={needed}")]
    return []


def export_notes(
    dep: Deployment,
    ckpt: VllmCheckpoint,
    anatomy: Anatomy,
    weights: RankWeights,
    gpus: Sequence[GpuInfo],
    partition: tuple[Sequence[int], str],
) -> tuple[str, ...]:
    """What qualifies the export, in the order a reader needs it."""
    tp, kv = dep.parallel.tp_size, anatomy.num_key_value_heads
    notes = list(ckpt.notes)
    impl = ckpt.implementation
    if impl is None:
        notes.append(
            f"{ckpt.architecture} is not among the architectures glmdeploy checked in "
            f"vLLM {facts.VLLM_VERSION}: the weight split assumes vLLM's standard "
            "parallel layers"
        )
    elif impl.backend == "transformers":
        notes.append(
            f"vLLM runs {ckpt.architecture} through its Transformers modeling backend "
            "(q/k/v and the MLP fused into its parallel layers)"
        )
    if tp > kv:
        notes.append(
            f"tp {tp} exceeds the model's {kv} KV heads: vLLM keeps 1 KV head per rank, "
            f"each head replicated on {tp // kv} ranks, so the KV cache costs {tp // kv}× "
            f"what an even split would (no saving beyond tp {kv})"
        )
    if dep.precision.quantization is Quantization.INT8:
        notes.append(
            f"precision.quantization=int8 becomes vLLM's {facts.ONLINE_FP8}: FP8 weights "
            "with one scale per output channel in every linear and expert layer (vLLM "
            f"{facts.VLLM_VERSION} has no bitsandbytes): a different numeric format"
        )
    if ckpt.quant_method:
        notes.append(
            f"the checkpoint is pre-quantised ({ckpt.quant_method}): its weights are "
            "sized as unquantised here, an upper bound"
        )
    if weights.unrecognised:
        shown = ", ".join(weights.unrecognised[:3])
        notes.append(
            f"{len(weights.unrecognised)} tensor(s) with an unknown split are counted "
            f"whole on every rank (an upper bound): {shown}"
        )
    if dep.gpus.max_memory_gib:
        notes.append("gpus.max_memory_gib does not limit vLLM; engine.gpu_memory_utilization does")
    local = dep.parallel.world_size // dep.launch.nnodes
    if len(gpus) > local:
        notes.append(
            f"{len(gpus) - local} selected GPU(s) stay unused: each node runs {local} rank(s)"
        )
    if dep.launch.nnodes > 1 and tp > local:
        notes.append(
            f"tensor parallelism spans nodes (tp {tp}, {local} GPU(s) per node): it "
            "all-reduces every layer over the network; keep tp within a node"
        )
    if getattr(anatomy.hf_config, "sliding_window", None):
        notes.append(
            "some layers may use sliding-window attention, which keeps less KV cache in "
            "vLLM: the check assumes full attention (an upper bound)"
        )
    if dep.parallel.pp_size > 1:
        notes.append(f"pipeline stages hold {list(partition[0])} layers: {partition[1]}")
    return tuple(notes)
