"""A model's tensors and its tensor-parallel plan, read once from a meta-device model.

The per-rank planner needs what the anatomy sums away: every parameter's and buffer's shape and
dtype rule (`glmdeploy.model.skeleton.tensor_tallies`), the merged TP plan transformers will apply
(`model.tp_plan`: the class rules, the config class's `base_model_tp_plan`, and the implicit
vocabulary split of the input embedding), and whether the config class has TP and PP plans at all.
torch and transformers are imported here (lazily); the table itself is plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from glmdeploy.distributed.rules import ModelFacts
from glmdeploy.model.anatomy import Tally


@dataclass(frozen=True)
class TensorEntry:
    """One distinct parameter (a tied one once) or buffer of the model."""

    name: str
    shape: tuple[int, ...]
    tally: Tally  # its elements by dtype rule (`Tally.bytes` gives its size in any dtype)
    is_param: bool

    @property
    def numel(self) -> int:
        return math_prod(self.shape)


@dataclass(frozen=True)
class ShardTable:
    """What the per-rank planner reads from the model (see the module docstring).

    Attributes:
        model_type, model_class: as transformers names them.
        tensors: parameters then buffers, in registration order.
        tp_plan: wildcard module/parameter name -> tensor-parallel style.
        has_tp_plan, has_pp_plan: the config class carries `base_model_tp_plan` /
            `base_model_pp_plan` (transformers refuses TP / cannot split stages without them).
        tie_word_embeddings: the head shares the input embedding's weight.
        facts: the architecture numbers the parallel rules check.
    """

    model_type: str
    model_class: str
    tensors: tuple[TensorEntry, ...]
    tp_plan: Mapping[str, str] = field(default_factory=dict)
    has_tp_plan: bool = False
    has_pp_plan: bool = False
    tie_word_embeddings: bool = False
    facts: ModelFacts | None = None


def math_prod(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


_CACHE: dict[str, ShardTable] = {}


def shard_table(hf_config: Any) -> ShardTable:
    """The table of `AutoModelForCausalLM.from_config(hf_config)`, cached per config."""
    from glmdeploy.model.skeleton import config_key

    key = config_key(hf_config)
    if key not in _CACHE:
        _CACHE[key] = _build(hf_config)
    return _CACHE[key]


def _build(hf_config: Any) -> ShardTable:
    from glmdeploy.model.skeleton import meta_model, tensor_tallies

    model = meta_model(hf_config)
    tallies = tensor_tallies(model)
    params = {name for name, _ in model.named_parameters()}
    shapes = {n: tuple(int(d) for d in t.shape) for n, t in model.named_parameters()}
    shapes.update({n: tuple(int(d) for d in t.shape) for n, t in model.named_buffers()})
    cfg = model.config
    return ShardTable(
        model_type=str(cfg.model_type),
        model_class=type(model).__name__,
        tensors=tuple(
            TensorEntry(n, shapes[n], tally, n in params) for n, tally in tallies.items()
        ),
        tp_plan=dict(getattr(model, "tp_plan", None) or {}),
        has_tp_plan=bool(getattr(type(cfg), "base_model_tp_plan", None)),
        has_pp_plan=bool(getattr(type(cfg), "base_model_pp_plan", None)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        facts=model_facts(cfg),
    )


def model_facts(hf_config: Any) -> ModelFacts:
    """The parallel rules' numbers from a transformers config (its text config, if composite)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = int(text.num_attention_heads)
    experts = getattr(text, "n_routed_experts", None) or getattr(text, "num_experts", None)
    moe = getattr(text, "moe_intermediate_size", None) if experts else None
    return ModelFacts(
        model_type=str(text.model_type),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
        num_hidden_layers=int(text.num_hidden_layers),
        moe_intermediate_size=int(moe) if moe else None,
    )
