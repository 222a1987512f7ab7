"""Build a model's `WorkspaceModel` by tracing its forward (`glmdeploy.model.workspace_trace`), with
the formula as the fallback (`glmdeploy.model.workspace.formula_workspace`).

Kept apart from `glmdeploy.model.workspace` (the data and its arithmetic), which planning reads
without importing the tracer.
"""

from __future__ import annotations

import time
from dataclasses import replace

from glmdeploy.config.settings import Dtype
from glmdeploy.model.anatomy import Anatomy, dtype_bytes
from glmdeploy.model.workspace import (
    GENERATE_FP32_COPIES,
    GENERATE_VOCAB_BYTES,
    TORCH_DTYPES,
    KindWorkspace,
    Polynomial,
    WorkspaceModel,
    block_kinds,
    formula_workspace,
)


def build_workspace(
    anatomy: Anatomy,
    dtype: Dtype,
    *,
    attn_implementation: str = "sdpa",
    experts_implementation: str | None = None,
    target: str = "cuda",
) -> WorkspaceModel:
    """Trace the workspace (see the module docstring); the formula if the trace fails.

    Args:
        anatomy: the model (its `hf_config` is rebuilt with a few layers on fake tensors).
        dtype: the resolved compute dtype.
        attn_implementation: as passed to `from_pretrained` (`sdpa` is transformers' default).
        experts_implementation: as passed to `from_pretrained`; None: transformers' default
            (`grouped_mm` for models whose experts support it, else `eager`).
        target: `cuda` or `cpu` (labels which kernel the attention numbers describe).
    """
    (model,) = build_workspaces(anatomy, dtype, (target,), attn_implementation=attn_implementation,
                                experts_implementation=experts_implementation)  # fmt: skip
    return model


def build_workspaces(
    anatomy: Anatomy,
    dtype: Dtype,
    targets: tuple[str, ...],
    *,
    attn_implementation: str = "sdpa",
    experts_implementation: str | None = None,
) -> tuple[WorkspaceModel, ...]:
    """`build_workspace` for several targets from one trace (the trace runs CPU kernels whatever
    the target; the target only says which kernel the numbers stand for)."""
    started = time.perf_counter()
    # flash-attn packages need CUDA; their footprint is modelled by sdpa's flash kernel
    flash_package = attn_implementation.startswith("flash_attention")
    traced_attn = "sdpa" if flash_package else attn_implementation
    try:
        from glmdeploy.model.workspace_trace import trace_kinds

        trace = trace_kinds(anatomy, TORCH_DTYPES[dtype], traced_attn, experts_implementation)
        if flash_package and trace.attention_kernel != "flash":
            raise RuntimeError(f"sdpa ran the {trace.attention_kernel} kernel, not flash")
    except Exception as exc:  # any failure (unsupported model, data-dependent code): formula
        note = f"trace failed ({type(exc).__name__}: {exc}); historical formula, not exact"
        model = formula_workspace(anatomy, dtype, attn_implementation, note=note)
        return tuple(replace(model, seconds=time.perf_counter() - started) for _ in targets)
    layers = block_kinds(anatomy)
    vocab = anatomy.vocab_size
    after_forward = Polynomial(  # the last-position logits + what generate makes of them
        per_sequence=vocab * (dtype_bytes(dtype) + 4 * GENERATE_FP32_COPIES),
        shared=vocab * GENERATE_VOCAB_BYTES,
    )
    kinds = []
    for traced in trace.kinds:
        phases = traced.phases
        if traced.kind == "head":
            phases = (*phases, after_forward)
        kinds.append(KindWorkspace(traced.kind, layers.get(traced.kind, ()), traced.entry, phases))
    kernel = trace.attention_kernel
    seconds = time.perf_counter() - started
    models = []
    for target in targets:
        if flash_package:
            assumed = f"{attn_implementation} modelled as sdpa's flash kernel (traced on CPU)"
        elif kernel == "flash" and target == "cuda" and dtype is Dtype.FP32:
            assumed = (
                "CUDA sdpa in fp32 modelled as memory-efficient attention (traced via CPU flash)"
            )
        elif kernel == "flash" and target == "cuda":
            assumed = (
                "CUDA sdpa modelled as flash attention (bf16/fp16, sm80+; traced via CPU flash)"
            )
        else:
            assumed = f"{target} {trace.attn_implementation} traced ({kernel} kernel)"
        models.append(
            WorkspaceModel(
                model_type=anatomy.model_type,
                dtype=dtype,
                target=target,
                attn_implementation=attn_implementation
                if flash_package
                else trace.attn_implementation,
                attention_kernel=kernel,
                experts_implementation=trace.experts_implementation,
                method="traced",
                kinds=tuple(kinds),
                note=f"{assumed}; unpadded prompts; generate prefill (logits_to_keep=1)",
                seconds=seconds,
            )
        )
    return tuple(models)
