"""Builders for the typed settings the tests construct by hand: the tiny GLM and a `Deployment`.

Test modules import this as `from builders import ...` (pytest's default "prepend" import mode
puts `tests/` on `sys.path`). Keep it free of torch imports: the GPU test's subprocesses import it
before choosing the GPUs CUDA may see.
"""

from __future__ import annotations

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
)

# The tiny GLM of `conf/model/tiny-glm.yaml` (~0.2 M parameters).
TINY_ARCH = Architecture(
    model_type="glm", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
    attention_bias=True, partial_rotary_factor=0.5,
)  # fmt: skip


def make_deployment(
    strategy: Strategy | str = Strategy.BALANCED,
    *,
    architecture: Architecture | None = None,
    source: ModelSource | None = None,
    name: str = "tiny",
    gpus: GpuSelection | GpuMode = GpuMode.AUTO,
    precision: Precision | Dtype = Dtype.BF16,
    reserve_gib: float = 1.0,
    gpu0_free_fraction: float = 0.3,
    offload: Offload = Offload.NONE,
    map: tuple[MapEntry, ...] = (),
    max_context_tokens: int = 64,
    max_new_tokens: int = 32,
    runtime: Runtime | None = None,
) -> Deployment:
    """A deployment placed with `strategy`; by default plan-only: no weights, all GPUs, bf16.

    `source` defaults to `SourceKind.NONE`; `gpus` and `precision` take the whole section or just
    its mode / dtype; the other placement defaults are `Placement`'s own; `runtime`, when given,
    replaces the runtime built from `max_context_tokens` and `max_new_tokens`.
    """
    return Deployment(
        model=ModelSpec(name, source or ModelSource(SourceKind.NONE), architecture),
        gpus=gpus if isinstance(gpus, GpuSelection) else GpuSelection(gpus),
        precision=precision if isinstance(precision, Precision) else Precision(precision),
        placement=Placement(
            Strategy(strategy),
            reserve_gib=reserve_gib,
            gpu0_free_fraction=gpu0_free_fraction,
            offload=offload,
            map=map,
        ),
        runtime=runtime or Runtime(max_context_tokens, max_new_tokens=max_new_tokens),
    )
