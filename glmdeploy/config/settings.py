"""The typed, frozen view of a validated deployment config.

Everything after validation reads these objects, never raw dicts or DictConfigs. Each field here
has exactly one counterpart in `schemas/deployment.schema.json` (a test keeps the two in step); the
schema owns ranges and descriptions, `conf/` owns defaults.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from glmdeploy.config.serve_settings import Serve

GIB = 1024**3


class SourceKind(enum.StrEnum):
    """Where a model's weights come from."""

    EMBEDDED = "embedded"  # materialised locally from the architecture with seeded random weights
    LOCAL = "local"  # a checkpoint directory on disk
    HUB = "hub"  # a Hugging Face hub id (downloaded by transformers, pinned revision)
    NONE = "none"  # architecture only: plan, never load


class CheckpointLayout(enum.StrEnum):
    """The parameter naming of the checkpoint on disk."""

    NATIVE = "native"  # transformers' own names for `architecture.model_type`
    CHATGLM = "chatglm"  # legacy ChatGLM2/3 / GLM-4-chat remote-code names, converted on load


class GpuMode(enum.StrEnum):
    """Which of the GPUs that exist (`gpus.declared`, else this machine's) the deployment uses."""

    AUTO = "auto"  # every one this process may see (CUDA_VISIBLE_DEVICES narrows it)
    IDS = "ids"  # the physical ids in `gpus.ids`
    LEAST_USED = "least_used"  # the `gpus.count` ones with the least memory in use
    CPU = "cpu"  # no GPU at all


LEGACY_DECLARED_MODE = "declared"  # older option files: the same as auto on `gpus.declared`


def use_mode(mode: str, ids: object, count: object) -> GpuMode:
    """The typed `gpus.mode`: `auto` (and the legacy `declared`) narrow to `ids` when `gpus.ids`
    is given and to `least_used` when `gpus.count` is, so `gpus=8x80gib gpus.ids=[2,3]` reads as
    written."""
    if mode in (GpuMode.AUTO, LEGACY_DECLARED_MODE):
        if ids is not None:
            return GpuMode.IDS
        return GpuMode.AUTO if count is None else GpuMode.LEAST_USED
    return GpuMode(mode)


class Dtype(enum.StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Quantization(enum.StrEnum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


class Strategy(enum.StrEnum):
    AUTO = "auto"
    BALANCED = "balanced"
    BALANCED_LOW_0 = "balanced_low_0"
    SEQUENTIAL = "sequential"
    EXPLICIT = "explicit"
    PLAN_FILE = "plan_file"
    TRANSFORMERS = "transformers"  # transformers' own device_map="auto", for comparison


class Offload(enum.StrEnum):
    NONE = "none"
    CPU = "cpu"
    DISK = "disk"  # cpu first, then disk

    @property
    def devices(self) -> tuple[str, ...]:
        """The off-GPU devices this setting allows, in the order they fill."""
        return {"none": (), "cpu": ("cpu",), "disk": ("cpu", "disk")}[self.value]


@dataclass(frozen=True)
class Architecture:
    """The config.json values that determine tensor shapes, in transformers' native names."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    partial_rotary_factor: float | None = None
    rope_theta: float | None = None
    # Mixture-of-experts models (glm4_moe, qwen2_moe, …); zero/None for dense models.
    n_routed_experts: int = 0
    moe_intermediate_size: int | None = None
    num_experts_per_tok: int | None = None
    n_shared_experts: int | None = None
    first_k_dense_replace: int | None = None

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.AutoConfig.for_model` (None values left out)."""
        kwargs = {k: v for k, v in asdict(self).items() if v is not None and k != "model_type"}
        if not self.n_routed_experts:
            for key in ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok",
                        "n_shared_experts", "first_k_dense_replace"):  # fmt: skip
                kwargs.pop(key, None)
        rope: dict[str, Any] = {"rope_type": "default"}
        if self.rope_theta is not None:
            rope["rope_theta"] = kwargs.pop("rope_theta")
        if self.partial_rotary_factor is not None:
            rope["partial_rotary_factor"] = kwargs.pop("partial_rotary_factor")
        if len(rope) > 1:
            kwargs["rope_parameters"] = rope
        return kwargs


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    layout: CheckpointLayout = CheckpointLayout.NATIVE
    seed: int = 0  # embedded models only


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: ModelSource
    architecture: Architecture | None  # None: read from the local checkpoint's config.json


@dataclass(frozen=True)
class DeclaredGpu:
    name: str
    memory_gib: float
    compute_capability: tuple[int, int] = (8, 0)


@dataclass(frozen=True)
class GpuSelection:
    """What exists (`declared`, else this machine's GPUs as NVML reports them) and what to use."""

    mode: GpuMode = GpuMode.AUTO
    ids: tuple[int, ...] = ()  # physical ids as nvidia-smi shows them (mode=ids)
    count: int | None = None  # mode=least_used
    declared: tuple[DeclaredGpu, ...] = ()  # a fleet planned for instead of probing; ids 0..n-1
    max_memory_gib: Mapping[int, float] = field(default_factory=dict)  # physical id -> cap

    def describe(self) -> str:
        """`all visible GPUs`, `GPUs 2, 3 of 8 × 80 GiB (declared)`, `CPU`, …"""
        fleet = _fleet_text(self.declared)
        used = {
            GpuMode.AUTO: fleet or "all visible GPUs",
            GpuMode.IDS: f"GPU{'s' if len(self.ids) > 1 else ''} {', '.join(map(str, self.ids))}",
            GpuMode.LEAST_USED: f"{self.count} least used GPU(s)",
            GpuMode.CPU: "CPU",
        }[self.mode]
        if fleet and self.mode in (GpuMode.IDS, GpuMode.LEAST_USED):
            used += f" of {fleet}"
        return used


def _fleet_text(declared: tuple[DeclaredGpu, ...]) -> str:
    if not declared:
        return ""
    sizes = [f"{d.memory_gib:g} GiB" for d in declared]
    same = len(set(sizes)) == 1 and len(sizes) > 2
    return (f"{len(sizes)} × {sizes[0]}" if same else " + ".join(sizes)) + " (declared)"


@dataclass(frozen=True)
class Precision:
    dtype: Dtype
    quantization: Quantization = Quantization.NONE


@dataclass(frozen=True)
class MapEntry:
    """One record of an explicit map: module names or layer ranges, and where they go.

    `device` is a physical GPU id (the same ids as `gpus.ids`), "cpu" or "disk".
    Module patterns are exact module names, optionally with one inclusive range:
    `model.layers.0-13` means `model.layers.0` … `model.layers.13`.
    """

    modules: tuple[str, ...]
    device: int | str


@dataclass(frozen=True)
class Placement:
    strategy: Strategy
    reserve_gib: float = 1.0  # per GPU: CUDA context, allocator fragmentation
    gpu0_free_fraction: float = 0.3  # balanced_low_0: share of GPU 0's budget kept free
    offload: Offload = Offload.NONE
    cpu_memory_gib: float | None = None  # budget for cpu offload (None: 90% of free RAM)
    offload_folder: str | None = None
    map: tuple[MapEntry, ...] = ()
    plan_file: str | None = None


@dataclass(frozen=True)
class Runtime:
    max_context_tokens: int  # prompt + generated tokens per sequence
    batch_size: int = 1
    max_new_tokens: int = 32
    prompt: str = "The capital of France is"
    kv_cache_dtype: Dtype = Dtype.AUTO  # auto: the compute dtype
    max_queued_requests: int = 16  # serve: requests waiting beyond batch_size (then 429)
    temperature: float = 1.0  # serve: a request's default; 0 is greedy
    top_p: float = 1.0  # serve: a request's default
    max_tokens_per_request: int | None = None  # serve: None: what the context leaves


@dataclass(frozen=True)
class Parallel:
    """Ranks that run the model together: world size = tp_size × pp_size (1: one process)."""

    tp_size: int = 1
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


class Rendezvous(enum.StrEnum):
    STATIC = "static"  # fixed node ranks, node 0 at master_addr:master_port
    C10D = "c10d"  # torchrun's c10d rendezvous at that endpoint assigns node ranks


@dataclass(frozen=True)
class Launch:
    """Where the ranks run and how they meet (torchrun's flags and the ranks' environment)."""

    nnodes: int = 1
    node_rank: int = 0
    rendezvous: Rendezvous = Rendezvous.STATIC
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    join_timeout_s: float = 300.0
    omp_num_threads: int | None = None  # None: this node's cores divided among its ranks
    socket_ifname: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


class EngineName(enum.StrEnum):
    TRANSFORMERS = "transformers"  # glmdeploy loads and runs it (device map, or torchrun TP/PP)
    VLLM = "vllm"  # glmdeploy writes vLLM's config (and starts vLLM when it is installed)


@dataclass(frozen=True)
class Engine:
    """What runs the model; the vLLM settings apply with `name=vllm` only."""

    name: EngineName = EngineName.TRANSFORMERS
    gpu_memory_utilization: float = 0.92
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enforce_eager: bool = False


@dataclass(frozen=True)
class Deployment:
    model: ModelSpec
    gpus: GpuSelection
    precision: Precision
    placement: Placement
    runtime: Runtime
    parallel: Parallel = Parallel()
    launch: Launch = Launch()
    engine: Engine = Engine()
    serve: Serve = Serve()  # noqa: RUF009 -- frozen, like the defaults above

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, sort_keys=True)

    def summary(self) -> str:
        """One line for humans: model, GPUs, precision, placement, context."""
        gpus = self.gpus.describe()
        quant = (
            ""
            if self.precision.quantization is Quantization.NONE
            else f"/{self.precision.quantization}"
        )
        r = self.runtime
        p = self.parallel
        layout = f"placement {self.placement.strategy}"
        if p.world_size > 1:
            layout = f"tp {p.tp_size} × pp {p.pp_size}"
            layout += f" on {self.launch.nnodes} nodes" if self.launch.nnodes > 1 else ""
        engine = ", engine vllm" if self.engine.name is EngineName.VLLM else ""
        return (
            f"{self.model.name} on {gpus}, {self.precision.dtype}{quant}, "
            f"{layout}, {r.batch_size}×{r.max_context_tokens} tokens{engine}"
        )
