"""A plan's workspace term: each unit's prefill workspace from the model's `WorkspaceModel`, and the
record (`WorkspaceTerm`) and note that say how it was obtained.

The rule (see `glmdeploy.model.workspace`): every kind's number already includes what is carried
across blocks (the embedding output, the block's input, rotary cos/sin), so a device's workspace is
the largest over the units it runs, not a sum: a decoder block its kind's, the final norm and the
head (everything after the last block) the `head` kind's, units before the first block (embedding,
rotary) the stream (the largest kind `entry`). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from glmdeploy.config.settings import GIB
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.workspace import WorkspaceModel


@dataclass(frozen=True)
class WorkspaceKind:
    """One unit kind's prefill workspace in a plan (`glmdeploy.model.workspace.KindWorkspace`).

    Attributes:
        kind: `dense`, `moe`, … or `head` (final norm, head, logits and generate's copies of them).
        layers: decoder layers of this kind (0 for `head`).
        bytes: what a device running a unit of this kind needs beyond weights and KV cache, at the
            plan's batch size and prompt length (the carried stream included).
        bytes_per_token: the peak's coefficient of the prompt length, per sequence.
        bytes_per_token2: its coefficient of the prompt length squared (eager attention; 0 for
            flash and memory-efficient kernels).
    """

    kind: str
    layers: int
    bytes: int
    bytes_per_token: int
    bytes_per_token2: int = 0


@dataclass(frozen=True)
class WorkspaceTerm:
    """How a plan's workspace column was obtained (`Plan.workspace`).

    Attributes:
        method: `traced` (the model's own forward on fake tensors) or `formula` (the fallback).
        target: `cuda` or `cpu`: whose kernels the attention numbers describe (`any`: formula).
        attn_implementation, attention_kernel, experts_implementation: what was traced.
        prefill_tokens, batch_size: where the kinds' `bytes` are taken.
        kinds: one per unit kind, decoder kinds in layer order, `head` last.
        note: what the numbers assume, or why the trace failed.
    """

    method: str
    target: str
    attn_implementation: str
    attention_kernel: str
    experts_implementation: str | None
    prefill_tokens: int
    batch_size: int
    kinds: tuple[WorkspaceKind, ...]
    note: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkspaceTerm:
        kinds = tuple(WorkspaceKind(**k) for k in data["kinds"])
        return cls(**{**data, "kinds": kinds})


def unit_workspace(
    anatomy: Anatomy, model: WorkspaceModel, tokens: int, batch: int
) -> tuple[int, ...]:
    """Per unit (in `anatomy.units` order): the workspace of a device while it runs that unit."""
    blocks = [i for i, u in enumerate(anatomy.units) if u.kind == "block"]
    by_kind = {k.kind: k.bytes(tokens, batch) for k in model.kinds}
    stream = max((k.entry.bytes(tokens, batch) for k in model.kinds if k.kind != "head"),
                 default=0)  # fmt: skip
    out = []
    for i, unit in enumerate(anatomy.units):
        if unit.kind == "block":
            layer = unit.layer_index if unit.layer_index is not None else blocks.index(i)
            out.append(by_kind[model.kind_of_layer(layer)])
        elif not blocks or i > blocks[-1]:
            out.append(by_kind["head"])
        else:
            out.append(stream)
    return tuple(out)


def workspace_term(model: WorkspaceModel, tokens: int, batch: int) -> WorkspaceTerm:
    """The plan's record of `model` at prompt length `tokens` and batch size `batch`."""
    kinds = []
    for kind in model.kinds:
        peak = kind.leading(tokens, batch)
        kinds.append(WorkspaceKind(kind.kind, len(kind.layers), kind.bytes(tokens, batch),
                                   peak.per_token, peak.per_token2))  # fmt: skip
    return WorkspaceTerm(
        method=model.method,
        target=model.target,
        attn_implementation=model.attn_implementation,
        attention_kernel=model.attention_kernel,
        experts_implementation=model.experts_implementation,
        prefill_tokens=tokens,
        batch_size=batch,
        kinds=tuple(kinds),
        note=model.note,
    )


def workspace_note(term: WorkspaceTerm) -> str:
    """One line for the plan: which method and implementation, and each kind's bytes."""
    kinds = ", ".join(
        f"{k.kind} {_gib(k.bytes)}"
        + (f" ({k.bytes_per_token / 1024:.1f} KiB/token)" if k.kind != "head" else "")
        for k in term.kinds
    )
    at = f"at {term.batch_size}×{term.prefill_tokens} prompt tokens"
    if term.method != "traced":
        return f"workspace: historical formula, not exact ({term.note}): {kinds} {at}"
    experts = f", {term.experts_implementation} experts" if term.experts_implementation else ""
    target = "CUDA" if term.target == "cuda" else term.target.upper()
    return (
        f"workspace: traced for {target} ({term.attn_implementation}: {term.attention_kernel} "
        f"kernel{experts}): {kinds} {at}; a device needs the largest kind it runs"
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"
