"""The activation workspace of a model's prefill, per unit kind, as plain data: traced or a formula.

A unit kind is a decoder-block structure (`dense`, `moe`; GLM-4.5-Air's first
`first_k_dense_replace` layers are `dense`) or `head` (final norm, output head and the logits
that `generate` keeps). For each kind, `WorkspaceModel` holds the bytes a device needs, beyond
weights and KV cache, while it runs one unit of that kind in prefill, as exact polynomials in the
batch size B and prompt length T (`Polynomial`). They include the stream the model holds across
blocks (the embedding output and the block's input hidden state, rotary cos/sin, any attention
mask), so a device's workspace is the largest of its kinds' (`workspace_bytes`), not their sum.

`build_workspace` measures them (`method="traced"`) by running transformers' own forward code for
one unit of each kind at real width on fake tensors (`glmdeploy.model.workspace_trace`, which is
where torch is imported, lazily) and counting live storages op by op; when that fails it falls back
to the planner's historical formula (`method="formula"`, `formula_workspace`), which is not exact.
Models are plain data (`to_dict`/`from_dict`): the anatomy cache keeps them
(`glmdeploy.model.workspace_cache`); bump `WORKSPACE_FORMAT` when what they record changes.

Trace and target: the trace runs CPU kernels on fake tensors. On CPU (torch 2.13) `sdpa` dispatches
to the CPU flash kernel for unpadded causal prefill in bf16, fp16 and fp32: no T² buffer. On CUDA,
`sdpa` with bf16/fp16, head_dim ≤ 256, no mask and sm80+ dispatches to flash attention (GQA
included), whose output tensors are the same (output + fp32 logsumexp): the CPU trace is used as
the model of the CUDA kernel. `eager` attention materialises B × heads × T² scores (quadratic term).
Padded batches (a real attention mask) are not modelled: they add a B×T² mask and, for GQA models,
K/V repeated to every head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from glmdeploy.config.settings import Dtype
from glmdeploy.model.anatomy import Anatomy, dtype_bytes

# What generate allocates after the prefill forward, next to the (B, 1, vocab) logits, measured on
# transformers 5.24 (tests/test_workspace.py): greedy decoding keeps one fp32 copy of the last
# logits per sequence; sampling with a temperature three; greedy with `min_new_tokens` (as `bench`
# runs it) four, plus an int64 arange and a bool mask over the vocabulary shared by the batch.
GENERATE_FP32_COPIES = 4  # per sequence, vocab-sized fp32 tensors
GENERATE_VOCAB_BYTES = 9  # per vocabulary entry, shared: int64 arange + bool isin mask
FORMULA_LOGITS_COPIES = 2  # the historical formula's fp32 copies of the logits
FORMULA_WIDTHS = (3, 3)  # the formula's hidden- and intermediate-sized tensors alive at a peak
TORCH_DTYPES = {Dtype.BF16: "bfloat16", Dtype.FP16: "float16", Dtype.FP32: "float32"}
WORKSPACE_FORMAT = (
    1  # of `WorkspaceModel.to_dict`; bump when it, or what the tracer measures, changes
)


@dataclass(frozen=True)
class Polynomial:
    """Bytes as B·(per_token·T + per_token2·T² + per_sequence) + shared_per_token·T
    + shared_per_token2·T² + shared, for batch B and prompt length T. Shared terms are tensors with
    no batch dimension (position-only rotary tables, a broadcast mask, per-expert counters)."""

    per_token: int = 0
    per_token2: int = 0
    per_sequence: int = 0
    shared_per_token: int = 0
    shared_per_token2: int = 0
    shared: int = 0

    def bytes(self, tokens: int, batch: int = 1) -> int:
        return (
            batch * (self.per_token * tokens + self.per_token2 * tokens**2 + self.per_sequence)
            + self.shared_per_token * tokens
            + self.shared_per_token2 * tokens**2
            + self.shared
        )

    def coefficients(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Polynomial:
        return cls(**{f.name: _integer(data[f.name]) for f in fields(cls)})

    def dominates(self, other: Polynomial) -> bool:
        """Every coefficient ≥ the other's: at least as large for every B, T ≥ 0."""
        return all(a >= b for a, b in zip(self.coefficients(), other.coefficients(), strict=True))


@dataclass(frozen=True)
class KindWorkspace:
    """The workspace of one unit kind.

    Attributes:
        kind: `dense`, `moe` (with `/layer_type` when attention types differ), or `head`.
        layers: decoder layer indices of this kind (empty for `head`).
        entry: live bytes when a unit of this kind starts (the stream held across blocks).
        phases: the candidate peaks (one per op that can be the largest); the peak is their max.
    """

    kind: str
    layers: tuple[int, ...]
    entry: Polynomial
    phases: tuple[Polynomial, ...]

    def bytes(self, tokens: int, batch: int = 1) -> int:
        """Peak bytes (beyond weights and KV cache) while a unit of this kind runs in prefill."""
        return max(p.bytes(tokens, batch) for p in self.phases)

    def transient_bytes(self, tokens: int, batch: int = 1) -> int:
        """`bytes` above what was already live when the unit started (`entry`)."""
        return self.bytes(tokens, batch) - self.entry.bytes(tokens, batch)

    def leading(self, tokens: int, batch: int = 1) -> Polynomial:
        """The phase that is the peak at (tokens, batch)."""
        return max(self.phases, key=lambda p: p.bytes(tokens, batch))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KindWorkspace:
        phases = tuple(Polynomial.from_dict(p) for p in data["phases"])
        if not phases:
            raise ValueError(f"unit kind {data['kind']!r} has no phases")
        return cls(str(data["kind"]), tuple(_integer(i) for i in data["layers"]),
                   Polynomial.from_dict(data["entry"]), phases)  # fmt: skip


@dataclass(frozen=True)
class WorkspaceModel:
    """Per-kind prefill workspace of one model, dtype and attention/experts implementation.

    Attributes:
        model_type: `config.model_type`.
        dtype: the compute dtype it was traced in (coefficients do not scale: retrace per dtype).
        target: `cuda` or `cpu`: which device's kernels the attention entry describes.
        attn_implementation: what transformers chose (`sdpa` by default, `eager`, …).
        attention_kernel: the kernel behind it: `flash` (no T² buffer), `eager` or `math`
            (T² scores), `formula`.
        experts_implementation: the MoE experts path (`grouped_mm` by default), None without MoE.
        method: `traced` or `formula` (the trace failed; `note` says why).
        kinds: one entry per unit kind, decoder kinds in layer order, `head` last.
        note: how the numbers were obtained and what they assume.
        seconds: how long building this took.
    """

    model_type: str
    dtype: Dtype
    target: str
    attn_implementation: str
    attention_kernel: str
    experts_implementation: str | None
    method: str
    kinds: tuple[KindWorkspace, ...]
    note: str
    seconds: float = 0.0

    def kind(self, name: str) -> KindWorkspace:
        for kind in self.kinds:
            if kind.kind == name:
                return kind
        known = ", ".join(k.kind for k in self.kinds)
        raise KeyError(f"no unit kind {name!r} in this workspace model (kinds: {known})")

    def kind_of_layer(self, layer_index: int) -> str:
        for kind in self.kinds:
            if layer_index in kind.layers:
                return kind.kind
        raise KeyError(f"layer {layer_index} is not a decoder layer of this model")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (`seconds` left out: it is not a property of the model)."""
        data = asdict(self)
        del data["seconds"]
        data["dtype"] = str(self.dtype)
        plain: dict[str, Any] = data
        return plain

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkspaceModel:
        """The inverse of `to_dict` (KeyError/TypeError/ValueError on malformed data)."""
        experts = data["experts_implementation"]
        kinds = tuple(KindWorkspace.from_dict(k) for k in data["kinds"])
        if not any(k.kind == "head" for k in kinds):
            raise ValueError("a workspace model needs a `head` kind")
        return cls(
            model_type=str(data["model_type"]),
            dtype=Dtype(data["dtype"]),
            target=str(data["target"]),
            attn_implementation=str(data["attn_implementation"]),
            attention_kernel=str(data["attention_kernel"]),
            experts_implementation=None if experts is None else str(experts),
            method=str(data["method"]),
            kinds=kinds,
            note=str(data["note"]),
        )


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, found {value!r}")
    return value


def workspace_bytes(model: WorkspaceModel, kind: str, tokens: int, batch: int = 1) -> int:
    """Peak prefill workspace (bytes) of a device while it runs a unit of `kind`.

    Args:
        model: from `build_workspace` (or `formula_workspace`).
        kind: a unit kind (`model.kinds`): `dense`, `moe`, `head`, …
        tokens: prompt tokens per sequence in the prefill step (T).
        batch: sequences (B).
    """
    return model.kind(kind).bytes(tokens, batch)


def block_kinds(anatomy: Anatomy) -> dict[str, tuple[int, ...]]:
    """Decoder layers grouped by structure: kind name -> layer indices, in layer order.

    Two blocks are of one kind when their tensor names (below the block) match and, for configs
    with `layer_types`, their attention types too. A kind is `moe` when it holds experts.
    """
    layer_types = getattr(anatomy.hf_config, "layer_types", None)
    groups: dict[tuple[tuple[str, ...], str | None], list[int]] = {}
    for position, unit in enumerate(anatomy.blocks):
        index = unit.layer_index if unit.layer_index is not None else position
        names = tuple(sorted(t.removeprefix(unit.name + ".") for t in unit.tensors))
        kind_type = str(layer_types[index]) if isinstance(layer_types, list) else None
        groups.setdefault((names, kind_type), []).append(index)
    attention_types = {key[1] for key in groups}
    kinds: dict[str, tuple[int, ...]] = {}
    for (names, kind_type), layers in groups.items():
        name = "moe" if any("expert" in n for n in names) else "dense"
        if len(attention_types) > 1:
            name = f"{name}/{kind_type}"
        while name in kinds:
            name += "'"
        kinds[name] = tuple(layers)
    return kinds


def formula_activations(
    anatomy: Anatomy, dtype: Dtype, attn_implementation: str = "sdpa"
) -> Polynomial:
    """The historical formula's activations A (`glmdeploy.planning.memory.activation_bytes`):
    B × T × (3 × hidden + 3 × intermediate) × size(dtype), + B × heads × T² × (4 + size(dtype))
    for eager attention."""
    size = dtype_bytes(dtype)
    hidden_w, inter_w = FORMULA_WIDTHS
    per_token = (hidden_w * anatomy.hidden_size + inter_w * anatomy.intermediate_size) * size
    per_token2 = anatomy.num_attention_heads * (4 + size) if attn_implementation == "eager" else 0
    return Polynomial(per_token=per_token, per_token2=per_token2)


def formula_logits(anatomy: Anatomy, dtype: Dtype) -> Polynomial:
    """The historical formula's logits L (`glmdeploy.planning.memory.logits_bytes`):
    B × vocab × (size(dtype) + 2 × 4)."""
    return Polynomial(
        per_sequence=anatomy.vocab_size * (dtype_bytes(dtype) + 4 * FORMULA_LOGITS_COPIES)
    )


def formula_workspace(
    anatomy: Anatomy, dtype: Dtype, attn_implementation: str = "sdpa", note: str = ""
) -> WorkspaceModel:
    """The planner's historical estimate, as a `WorkspaceModel` (`method="formula"`), from the
    activations A (`formula_activations`) and logits L (`formula_logits`).

    The formula charged A to every GPU holding a unit and L on top to the head's GPU; under the
    planner's rule (a device's workspace is the largest of its units' kinds) that is: every block
    kind A, `head` A + L, and A as every kind's `entry` (the stream, which the planner charges to a
    device holding only the embedding). It is a guess (MoE layers use the dense
    `intermediate_size`; fp32 norms, the fused gate/up output and the stream are not counted);
    kept as the fallback when tracing fails.
    """
    block = formula_activations(anatomy, dtype, attn_implementation)
    kinds = [KindWorkspace(k, layers, block, (block,))
             for k, layers in block_kinds(anatomy).items()]  # fmt: skip
    logits = formula_logits(anatomy, dtype)
    head = Polynomial(per_token=block.per_token, per_token2=block.per_token2,
                      per_sequence=logits.per_sequence)  # fmt: skip
    kinds.append(KindWorkspace("head", (), block, (head,)))
    return WorkspaceModel(
        model_type=anatomy.model_type,
        dtype=dtype,
        target="any",
        attn_implementation=attn_implementation,
        attention_kernel="formula",
        experts_implementation=None,
        method="formula",
        kinds=tuple(kinds),
        note=note or "historical formula, not exact",
    )
