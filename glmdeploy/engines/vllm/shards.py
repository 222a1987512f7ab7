"""The weight bytes one tensor-parallel rank of vLLM holds, per decoder layer and per other part.

Which tensors vLLM splits follows its model code (chatglm.py, glm4.py, glm4_moe.py, llama.py and
the Transformers backend, which fuses q/k/v and the GLU into the same layer classes):
column-parallel layers (q/k/v, gate/up, expert gate_up) split their output rows by tp,
row-parallel layers (o_proj, down_proj, expert down) split their input columns (their bias stays
whole), `QKVParallelLinear` keeps max(1, kv_heads // tp) KV heads per rank (replicated when tp
exceeds them), `VocabParallelEmbedding`/`ParallelLMHead` split the vocabulary padded to a multiple
of 64, and norms, MoE routers and their score bias are replicated. Unrecognised tensors are counted
whole on every rank (an upper bound) and named.

Tensor shapes come from the model built on the meta device from the anatomy's config (no weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmdeploy.config.settings import Dtype
from glmdeploy.engines.vllm.facts import kv_heads_per_rank, padded_vocab
from glmdeploy.model.anatomy import Anatomy, dtype_bytes
from glmdeploy.model.skeleton import config_key, meta_model

_COLUMN = {"q_proj", "gate_up_proj", "gate_proj", "up_proj"}
_ROW = {"o_proj", "down_proj"}
_KV = {"k_proj", "v_proj"}


@dataclass(frozen=True)
class RankWeights:
    """Bytes on one tensor-parallel rank, by part (every rank of a stage holds the same).

    Attributes:
        layers: per decoder layer, in order.
        embedding: the input embedding (vocab-parallel).
        head: final norm and LM head; a head tied to the embedding counts the embedding here too,
            since vLLM's last pipeline stage holds its own copy.
        rotary: vLLM's cos/sin cache (native model code only).
        unrecognised: tensors counted whole on every rank because their split is not known.
    """

    layers: tuple[int, ...]
    embedding: int
    head: int
    rotary: int
    unrecognised: tuple[str, ...] = ()
    tied: bool = False

    def stage_bytes(self, start: int, end: int, *, first: bool, last: bool) -> int:
        """Weights of a pipeline stage holding layers [start, end)."""
        total = sum(self.layers[start:end]) + self.rotary
        if first:
            total += self.embedding
        if last and not (first and self.tied):
            total += self.head
        elif last:
            total += self.head - self.embedding
        return total


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    fp32: bool


def rank_weights(
    anatomy: Anatomy, tp_size: int, dtype: Dtype, *, fp8: bool, native_rope: bool
) -> RankWeights:
    """The bytes of one tensor-parallel rank for `tp_size`, weights in `dtype` (or fp8).

    Args:
        anatomy: the model's skeleton (its `hf_config` rebuilds the meta model for tensor shapes).
        tp_size: tensor-parallel size.
        dtype: the model dtype (bf16, fp16 or fp32).
        fp8: vLLM's online `fp8_per_channel`: linear and expert weights in decoder layers take one
            byte per element plus one fp32 scale per output channel.
        native_rope: vLLM's own model code, which keeps a cos/sin cache of
            max_position_embeddings × rotary_dim in the model dtype.
    """
    size = dtype_bytes(dtype)
    tensors = _tensors(anatomy)
    layers: list[int] = []
    embedding = head = 0
    unrecognised: list[str] = []
    for unit in anatomy.units:
        total = 0
        for name in unit.tensors:
            tensor = tensors.get(name)
            if tensor is None:  # a tied alias: counted under its owner
                continue
            if unit.kind in ("embedding", "head") and len(tensor.shape) >= 1:
                shape = (padded_vocab(tensor.shape[0]) // tp_size, *tensor.shape[1:])
                total += _numel(shape) * (4 if tensor.fp32 else size)
                continue
            shape, split = _shard(name[len(unit.name) + 1 :], tensor.shape, anatomy, tp_size)
            if split is None and unit.kind == "block":
                unrecognised.append(name)
            total += _bytes(shape, tensor.fp32, size, fp8 and unit.kind == "block" and bool(split))
        if unit.kind == "block":
            layers.append(total)
        elif unit.kind == "embedding":
            embedding += total
        elif unit.kind != "rotary":
            head += total
    tied = bool(anatomy.tied_groups)
    if tied:
        head += embedding
    return RankWeights(
        tuple(layers),
        embedding,
        head,
        _rope_bytes(anatomy, size, native_rope),
        tuple(unrecognised),
        tied,
    )


def _shard(
    local: str, shape: tuple[int, ...], anatomy: Anatomy, tp: int
) -> tuple[tuple[int, ...], str | None]:
    """One rank's shape of a decoder-layer tensor, and how it is split (None: not recognised,
    "replicated", "column", "row" or "kv")."""
    parts = local.split(".")
    module, param = (parts[-2], parts[-1]) if len(parts) > 1 else ("", parts[-1])
    if parts[-2:-1] == ["experts"]:  # fused expert tensors [E, out, in]: the intermediate splits
        module = param
    if "norm" in module:
        return shape, "replicated"
    if module == "gate" or param == "e_score_correction_bias":  # MoE router: ReplicatedLinear
        return shape, "replicated"
    if module in _KV:
        kv = anatomy.num_key_value_heads
        rows = shape[0] // kv * kv_heads_per_rank(kv, tp)
        return (rows, *shape[1:]), "kv"
    if module in _COLUMN:
        axis = len(shape) - 2 if len(shape) >= 2 else 0
        return _split(shape, axis, tp), "column"
    if module in _ROW:
        if len(shape) < 2:  # a row-parallel bias is not split
            return shape, "replicated"
        return _split(shape, len(shape) - 1, tp), "row"
    return shape, None


def _split(shape: tuple[int, ...], axis: int, tp: int) -> tuple[int, ...]:
    return tuple(n // tp if i == axis else n for i, n in enumerate(shape))


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _bytes(shape: tuple[int, ...], fp32: bool, size: int, fp8: bool) -> int:
    if fp32:
        return _numel(shape) * 4
    if fp8 and len(shape) >= 2:  # 1-byte weights and one fp32 scale per output channel
        return _numel(shape) + 4 * (_numel(shape) // shape[-1])
    return _numel(shape) * size


def _rope_bytes(anatomy: Anatomy, size: int, native: bool) -> int:
    if not native or not any(u.kind == "rotary" for u in anatomy.units):
        return 0
    cfg = anatomy.hf_config
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", 1.0) or 1.0
    rotary_dim = int(anatomy.head_dim * factor)
    return int(getattr(cfg, "max_position_embeddings", 0)) * rotary_dim * size


_CACHE: dict[str, dict[str, _Tensor]] = {}


def _tensors(anatomy: Anatomy) -> dict[str, _Tensor]:
    """Every parameter and persistent buffer of the meta model by name (tied aliases left out)."""
    key = config_key(anatomy.hf_config)
    if key not in _CACHE:
        _CACHE[key] = _meta_tensors(anatomy)
    return _CACHE[key]


def _meta_tensors(anatomy: Anatomy) -> dict[str, _Tensor]:
    import torch

    model = meta_model(anatomy.hf_config)
    out: dict[str, _Tensor] = {}
    for name, p in model.named_parameters():  # removes duplicates: a tied alias is left out
        out[name] = _Tensor(name, tuple(p.shape), p.dtype == torch.float32)
    for module_name, module in model.named_modules():
        for local, b in module.named_buffers(recurse=False):
            if local not in module._non_persistent_buffers_set:
                name = f"{module_name}.{local}" if module_name else local
                out[name] = _Tensor(name, tuple(b.shape), b.dtype == torch.float32)
    return out
