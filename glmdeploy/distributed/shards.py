"""What each rank holds under transformers' tensor and pipeline parallelism, by arithmetic alone.

Tensor parallelism: a parameter's style comes from the model's TP plan (`style_for`, transformers'
`_get_parameter_plan` rule), and its local shape from the style's placement and torch's `Shard`
rule (`local_shape`, checked against real DTensor placements for glm, glm4, llama and glm4_moe at
tp 2, 3 and 4). Pipeline parallelism: `layer_range` is transformers' even split of the decoder
layers (`PipelineStage.layer_range_for_rank`); `stage_units` names the units a stage keeps.
No torch here: the planner and the loader's check share these numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from glmdeploy.model.anatomy import Anatomy

COLWISE = frozenset({"colwise", "colwise_gather_output", "colwise_rep"})
ROWWISE = frozenset({"rowwise", "rowwise_split_input", "rowwise_rep"})
# Styles that only hook a module (communication) or keep its parameters whole.
REPLICATED = frozenset(
    {
        "replicate",
        "replicated_with_grad_allreduce",
        "sequence_parallel",
        "all_reduce",
        "mla_kv_a_proj",
        "moe_tp_experts",
        "moe_identity_expert",
        "local_params",
    }
)
SPLIT_AXIS = {
    **dict.fromkeys(COLWISE, "output rows"),
    **dict.fromkeys(ROWWISE, "input columns"),
    "embedding_rowwise": "vocabulary rows",
    "embedding_colwise": "hidden columns",
    "packed_colwise": "rows of each fused half",
    "packed_rowwise": "columns of each fused half",
}


class UnknownStyle(ValueError):
    """A TP plan style this module cannot size (a newer transformers)."""


def shard_len(n: int, parts: int, index: int) -> int:
    """Length of shard `index` of `n` split into `parts` (torch `Shard`, i.e. `torch.chunk`)."""
    chunk = math.ceil(n / parts)
    start = min(chunk * index, n)
    return max(0, min(n, start + chunk) - start)


def wildcard(name: str) -> str:
    """`model.layers.3.mlp` -> `model.layers.*.mlp` (transformers' own wildcard rule)."""
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)


def style_for(parameter: str, plan: Mapping[str, str]) -> str | None:
    """The plan's style for a parameter: its own rule, else its module's (`.weight`, `.bias`)."""
    generic = wildcard(parameter)
    if generic in plan:
        return plan[generic]
    module = generic.rsplit(".", 1)[0] if "." in generic else None
    return plan.get(module) if module is not None else None


def is_split(style: str | None) -> bool:
    return style is not None and style not in REPLICATED


def local_shape(
    shape: tuple[int, ...], style: str | None, leaf: str, tp: int, rank: int
) -> tuple[int, ...]:
    """Rank `rank`'s shard of a parameter of global `shape` under `style` over `tp` ranks.

    Raises:
        UnknownStyle: a style transformers 5.24 does not have.
    """
    out = list(shape)
    if tp == 1 or not is_split(style):
        return tuple(out)
    nd = len(out)
    if style in COLWISE:  # weight [..., out, in] -> out; bias [out] -> out
        axis = nd - 2 if nd >= 2 else 0
        out[axis] = shard_len(out[axis], tp, rank)
    elif style in ROWWISE:
        if leaf != "bias":  # the bias is added once, after the all-reduce
            out[-1] = shard_len(out[-1], tp, rank)
    elif style == "embedding_rowwise":
        out[0] = shard_len(out[0], tp, rank)
    elif style == "embedding_colwise":
        out[1] = shard_len(out[1], tp, rank)
    elif style == "packed_colwise":  # fused [gate; up]: each half split separately
        axis = nd - 2 if nd >= 2 else -1
        out[axis] = 2 * shard_len(out[axis] // 2, tp, rank)
    elif style == "packed_rowwise":
        if nd > 1:
            out[-1] = 2 * shard_len(out[-1] // 2, tp, rank)
    else:
        raise UnknownStyle(f"tensor-parallel style {style!r} is unknown to glmdeploy")
    return tuple(out)


def layer_range(stage: int, pp: int, num_layers: int) -> tuple[int, int]:
    """Decoder layers [start, end) of pipeline stage `stage`: the first stages take one extra."""
    per, extra = divmod(num_layers, pp)
    start = stage * per + min(stage, extra)
    return start, start + per + (stage < extra)


def stage_units(anatomy: Anatomy, stage: int, pp: int, tied: bool) -> tuple[str, ...]:
    """The units pipeline stage `stage` keeps, in forward order.

    transformers replaces the layers of other stages, the input embedding on all but the first
    stage (the last keeps it too when the head is tied to it), and the final norm and the head on
    all but the last stage; everything else (rotary embedding) stays on every stage.
    """
    if pp == 1:
        return anatomy.names
    start, end = layer_range(stage, pp, len(anatomy.blocks))
    last = stage == pp - 1
    kept = []
    for unit in anatomy.units:
        if unit.kind == "block":
            keep = unit.layer_index is not None and start <= unit.layer_index < end
        elif unit.kind == "embedding":
            keep = stage == 0 or (tied and last)
        elif unit.kind == "head" or (unit.kind == "norm" and unit.name.endswith(".norm")):
            keep = last
        else:
            keep = True
        if keep:
            kept.append(unit.name)
    return tuple(kept)


def unit_of(tensor: str, units: tuple[str, ...]) -> str | None:
    """The unit holding `tensor`: the longest unit name equal to it or a dotted prefix of it."""
    parts = tensor.split(".")
    names = set(units)
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in names:
            return candidate
    return None
