"""The per-device memory model: weights, KV cache, workspace and reserve, each with its formula.

A GPU holding units U with decoder blocks L ⊆ U needs

    load(U)  = weights(U) + kv(|L|) + workspace(U)           (what the plan puts there)
    total(U) = load(U) + reserve                              (what nvidia-smi would show)
    budget   = capacity − reserve, capacity = min(total memory, gpus.max_memory_gib)
    utilisation = load(U) / budget                            (fits when ≤ 1 on every GPU)

workspace(U) = max over u ∈ U of `MemoryModel.unit_workspace[u]`: the prefill peak of the unit's
kind, from the model's traced `WorkspaceModel` (`glmdeploy.model.workspace_cache`), or from the
historical formula (`activation_bytes`, `logits_bytes`) where tracing is impossible
(`glmdeploy.planning.workspace_term` has the rule). CPU and disk devices hold weights only: no
reserve, KV cache or workspace (offloaded units run on the execution GPU, which pays for their KV
cache, workspace and a streaming buffer; see `glmdeploy.planning.strategies`). Nothing here imports
torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from glmdeploy.config.settings import (
    GIB,
    Deployment,
    Dtype,
    Placement,
    Precision,
    Quantization,
    Runtime,
)
from glmdeploy.model.anatomy import Anatomy, dtype_bytes
from glmdeploy.model.workspace import (
    WorkspaceModel,
    formula_activations,
    formula_logits,
    formula_workspace,
)
from glmdeploy.model.workspace_cache import workspace_for
from glmdeploy.planning.workspace_term import WorkspaceTerm, unit_workspace, workspace_term


def weights_bytes(
    anatomy: Anatomy, names: set[str], dtype: Dtype, quantization: Quantization
) -> int:
    """Σ `Unit.bytes(dtype, quantization)` over the units (parameters + buffers; formula there)."""
    return sum(u.bytes(dtype, quantization) for u in anatomy.units if u.name in names)


def kv_bytes_per_layer(anatomy: Anatomy, runtime: Runtime, kv_dtype: Dtype) -> int:
    """KV cache of one decoder layer at full context:

    batch_size × max_context_tokens × num_key_value_heads × head_dim × 2 (K and V) × size(kv dtype)

    This is what transformers' `DynamicCache` holds for a full-attention layer after
    max_context_tokens positions (GLM-4-9B, bf16: 40 layers × 2 × 128 × 2 × 2 = 40 KiB per token).
    Sliding-window layers would hold less; they are counted at full context (an upper bound).
    """
    return (
        runtime.batch_size
        * runtime.max_context_tokens
        * anatomy.num_key_value_heads
        * anatomy.head_dim
        * 2
        * dtype_bytes(kv_dtype)
    )


def kv_cache_bytes(anatomy: Anatomy, runtime: Runtime, kv_dtype: Dtype, n_layers: int) -> int:
    """KV cache of `n_layers` decoder layers on one device: n_layers × `kv_bytes_per_layer`."""
    return n_layers * kv_bytes_per_layer(anatomy, runtime, kv_dtype)


def prefill_tokens(runtime: Runtime) -> int:
    """The longest prompt: max_context_tokens − max_new_tokens (at least 1).

    transformers runs the whole prompt through the model in one step (no chunked prefill), so this
    is the token count that sizes activations.
    """
    return max(1, runtime.max_context_tokens - runtime.max_new_tokens)


def logits_bytes(anatomy: Anatomy, runtime: Runtime, dtype: Dtype) -> int:
    """The historical formula's logits workspace, on the device of the head (the fallback's):

    batch_size × vocab_size × (size(dtype) + 2 × 4)   (`formula_logits`)

    generate() passes `logits_to_keep=1`, so the head computes one position per sequence in prefill
    and in decode (tokens kept = 1); generate then copies those logits to fp32 and the logits
    processors / softmax make one more fp32 tensor of the same size (2 copies; measured: 1 to 4,
    see `glmdeploy.model.workspace.GENERATE_FP32_COPIES`).
    """
    return formula_logits(anatomy, dtype).bytes(prefill_tokens(runtime), runtime.batch_size)


def activation_bytes(
    anatomy: Anatomy, runtime: Runtime, dtype: Dtype, attn_implementation: str = "sdpa"
) -> int:
    """The historical formula's activation workspace of one GPU while it runs its blocks during
    prefill (the fallback's; the traced workspace replaces it, see the module docstring):

    batch_size × T × (3 × hidden_size + 3 × intermediate_size) × size(dtype),  T = prefill_tokens
    (`formula_activations`)

    Alive at a block's peak: the residual stream, the normed input and the attention output
    (3 × hidden) and the MLP's gate/up projection and activated product (2 + 1 × intermediate;
    MoE models use the dense `intermediate_size`, the widest per-token MLP). `eager` attention also
    materialises the scores: + batch_size × num_attention_heads × T² × (4 + size(dtype)) (fp32
    softmax and its cast); sdpa/flash kernels do not. Each GPU that holds a unit gets this once:
    GPUs run one after another, and activations do not outlive a GPU's turn.
    """
    model = formula_activations(anatomy, dtype, attn_implementation)
    return model.bytes(prefill_tokens(runtime), runtime.batch_size)


def reserve_bytes(placement: Placement) -> int:
    """Per-GPU reserve for the CUDA context and allocator fragmentation: `placement.reserve_gib`."""
    return int(placement.reserve_gib * GIB)


def budget_bytes(capacity_bytes: int, reserve: int) -> int:
    """What a GPU can give the plan: capacity (user cap or total) − reserve."""
    return capacity_bytes - reserve


@dataclass(frozen=True)
class MemoryModel:
    """The memory terms of one deployment, per unit (in `anatomy.units` order) and per GPU.

    Attributes:
        dtype: the resolved compute dtype.
        kv_dtype: the resolved KV cache dtype (`runtime.kv_cache_dtype`, auto: the compute dtype).
        quantization: `precision.quantization`.
        unit_weights: `Unit.bytes` per unit (parameters + buffers).
        unit_buffers: the buffers' share of `unit_weights` (they stay on the execution device when
            the unit is offloaded).
        unit_params: parameter elements per unit.
        unit_kv: the KV cache each unit brings (`kv_bytes_per_layer` for blocks, 0 otherwise).
        unit_workspace: the workspace of a device while it runs the unit (`unit_workspace`); a
            device's workspace is the largest of its units' (`workspace_of`).
        reserve: `reserve_bytes`, on every selected GPU.
        workspace: where `unit_workspace` comes from (None when weights only).
    """

    dtype: Dtype
    kv_dtype: Dtype
    quantization: Quantization
    unit_weights: tuple[int, ...]
    unit_buffers: tuple[int, ...]
    unit_params: tuple[int, ...]
    unit_kv: tuple[int, ...]
    unit_workspace: tuple[int, ...]
    reserve: int
    workspace: WorkspaceTerm | None = None

    def workspace_of(self, units: Iterable[int]) -> int:
        """The workspace of a device that runs `units` (indices): the largest of theirs."""
        return max((self.unit_workspace[i] for i in units), default=0)


def memory_model(
    anatomy: Anatomy,
    precision: Precision,
    runtime: Runtime,
    placement: Placement,
    *,
    weights_only: bool = False,
    workspace: WorkspaceModel | None = None,
) -> MemoryModel:
    """The memory terms for this deployment; `weights_only` zeroes KV, workspace and reserve.

    `precision.dtype` must be concrete (`glmdeploy.hardware.precision.resolve_dtype`).
    `workspace` is the model's (`glmdeploy.model.workspace_cache.workspace_for`); None: the
    historical formula (`formula_workspace`).
    """
    dtype = precision.dtype
    dtype_bytes(dtype)  # raises for `auto`
    kv_dtype = dtype if runtime.kv_cache_dtype is Dtype.AUTO else runtime.kv_cache_dtype
    per_layer = 0 if weights_only else kv_bytes_per_layer(anatomy, runtime, kv_dtype)
    term: WorkspaceTerm | None = None
    per_unit = (0,) * len(anatomy.units)
    if not weights_only:
        model = workspace if workspace is not None else formula_workspace(anatomy, dtype)
        tokens = prefill_tokens(runtime)
        per_unit = unit_workspace(anatomy, model, tokens, runtime.batch_size)
        term = workspace_term(model, tokens, runtime.batch_size)
    return MemoryModel(
        dtype=dtype,
        kv_dtype=kv_dtype,
        quantization=precision.quantization,
        unit_weights=tuple(u.bytes(dtype, precision.quantization) for u in anatomy.units),
        unit_buffers=tuple(
            u.persistent_buffers.bytes(dtype) + u.other_buffers.bytes(dtype) for u in anatomy.units
        ),
        unit_params=tuple(u.n_params for u in anatomy.units),
        unit_kv=tuple(per_layer if u.kind == "block" else 0 for u in anatomy.units),
        unit_workspace=per_unit,
        reserve=0 if weights_only else reserve_bytes(placement),
        workspace=term,
    )


def deployment_memory(
    deployment: Deployment, anatomy: Anatomy, *, gpus: bool, weights_only: bool = False
) -> MemoryModel:
    """`memory_model` of a deployment, with its model's workspace traced for the kernels of the
    target (CUDA when the plan has GPUs, else the CPU's; `workspace_for`, cached)."""
    workspace = None
    if not weights_only:
        workspace = workspace_for(deployment.model, anatomy, deployment.precision.dtype,
                                  target="cuda" if gpus else "cpu")  # fmt: skip
    return memory_model(anatomy, deployment.precision, deployment.runtime, deployment.placement,
                        weights_only=weights_only, workspace=workspace)  # fmt: skip
