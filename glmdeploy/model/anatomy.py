"""The model skeleton: placement units in forward order, sizes per dtype, no-split and tied groups.

An `Anatomy` is what the planner needs to know about a model, and nothing else: the top-level
placement units (embedding, decoder blocks, final norm, head, rotary embedding) in the order data
flows through them, each unit's tensors counted by how their dtype is chosen at load time, which
units must share a device (tied weights), and the shapes that size the KV cache. It is built once
per architecture from a meta-device model (`glmdeploy.model.skeleton`), with no weights and no
CUDA, and is plain data afterwards: planning imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from glmdeploy.config.settings import Dtype, Quantization

DTYPE_BYTES: dict[Dtype, int] = {Dtype.BF16: 2, Dtype.FP16: 2, Dtype.FP32: 4}

INT4_BLOCK = 64  # bitsandbytes 4-bit blocksize (BitsAndBytesConfig default); one fp32 absmax each


def dtype_bytes(dtype: Dtype) -> int:
    """Bytes per element of a concrete dtype (`auto` must be resolved first)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!s} must be resolved to bf16, fp16 or fp32 before sizing")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class Tally:
    """Element counts of tensors, grouped by how transformers chooses their dtype when loading.

    Attributes:
        compute: floating elements stored in the compute dtype (`precision.dtype`).
        fp32: floating elements the model creates in fp32 whatever the compute dtype (rotary
            `inv_freq`, a MoE router's weight and score bias).
        fp32_if_fp16: elements named by `_keep_in_fp32_modules`: fp32 only when the dtype is fp16.
        fp32_if_half: elements named by `_keep_in_fp32_modules_strict`: fp32 under fp16 and bf16.
        other_bytes: bytes of non-floating tensors (kept in their own dtype).
        linear: of `compute`, the `nn.Linear` weights inside decoder blocks: the tensors that
            bitsandbytes int8/int4 quantise (embeddings, norms, biases, lm_head and fused MoE expert
            tensors stay in the compute dtype).
        linear_rows: the output rows of those weights (int8 keeps one fp32 scale per row).
        linear_blocks: their 64-element blocks (int4 keeps one fp32 absmax per block).
    """

    compute: int = 0
    fp32: int = 0
    fp32_if_fp16: int = 0
    fp32_if_half: int = 0
    other_bytes: int = 0
    linear: int = 0
    linear_rows: int = 0
    linear_blocks: int = 0

    def bytes(self, dtype: Dtype, quantization: Quantization = Quantization.NONE) -> int:
        """Bytes these tensors take on a device when loaded in `dtype` with `quantization`.

        Formulas (n = elements of quantised Linear weights, r = their output rows):
            none: compute × size(dtype)
            int8: (compute − n) × size(dtype) + n + 4 r       (LLM.int8 weights + fp32 row scales)
            int4: (compute − n) × size(dtype) + ⌈n/2⌉ + 4 ⌈n/64⌉
                  (packed nf4 + one fp32 absmax per 64-element block; double quantisation, when
                  enabled, stores the absmax in 8 bits instead)
        plus 4 bytes per fp32 element, the fp16/bf16-conditional fp32 elements at 4 or size(dtype),
        and `other_bytes`.
        """
        size = dtype_bytes(dtype)
        fp32_if_fp16 = 4 if dtype is Dtype.FP16 else size
        fp32_if_half = 4 if dtype in (Dtype.FP16, Dtype.BF16) else size
        total = self.fp32 * 4 + self.fp32_if_fp16 * fp32_if_fp16 + self.fp32_if_half * fp32_if_half
        total += self.other_bytes
        if quantization is Quantization.INT8:
            quantised = self.linear + self.linear_rows * 4
        elif quantization is Quantization.INT4:
            quantised = (self.linear + 1) // 2 + self.linear_blocks * 4
        else:
            return total + self.compute * size
        return total + (self.compute - self.linear) * size + quantised

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))


def _fields(tally: Tally) -> tuple[int, ...]:
    return (
        tally.compute,
        tally.fp32,
        tally.fp32_if_fp16,
        tally.fp32_if_half,
        tally.other_bytes,
        tally.linear,
        tally.linear_rows,
        tally.linear_blocks,
    )


@dataclass(frozen=True)
class Unit:
    """One placement unit: a module that goes to one device whole.

    Attributes:
        name: the native transformers module name (`model.layers.3`), or a parameter's name when a
            container holds a parameter directly.
        kind: `embedding`, `block` (a `_no_split_modules` class: decoder layer, MoE included),
            `norm`, `head`, `rotary` or `other`.
        class_name: the module's class (`Glm4DecoderLayer`).
        layer_index: N of a decoder block `….layers.N`; None for other units.
        n_params: parameter elements (a tied parameter is counted once, in its first unit in
            forward order).
        params: the parameters, by dtype rule (tied copies counted once, like `n_params`).
        persistent_buffers: buffers saved in the state dict.
        other_buffers: non-persistent buffers (e.g. rotary `inv_freq`): not in checkpoints, but
            they still occupy the device.
        tensors: full names of parameters (tied aliases included) and persistent buffers.
        modules: full names of the unit's submodules, the unit itself first.
    """

    name: str
    kind: str
    class_name: str
    layer_index: int | None
    n_params: int
    params: Tally
    persistent_buffers: Tally
    other_buffers: Tally
    tensors: tuple[str, ...]
    modules: tuple[str, ...]

    def bytes(self, dtype: Dtype, quantization: Quantization = Quantization.NONE) -> int:
        """Bytes this unit puts on its device: parameters plus all buffers."""
        return (
            self.params.bytes(dtype, quantization)
            + self.persistent_buffers.bytes(dtype)
            + self.other_buffers.bytes(dtype)
        )

    def param_bytes(self, dtype: Dtype, quantization: Quantization = Quantization.NONE) -> int:
        return self.params.bytes(dtype, quantization)

    def persistent_buffer_bytes(self, dtype: Dtype) -> int:
        return self.persistent_buffers.bytes(dtype)


@dataclass(frozen=True)
class TiedGroup:
    """Parameters that are one tensor, and the units holding them: these units share a device."""

    tensors: tuple[str, ...]
    units: tuple[str, ...]  # in forward order; the first one owns the bytes


@dataclass(frozen=True)
class Anatomy:
    """A model's placement skeleton, plain data (see the module docstring).

    Attributes:
        model_type: `config.model_type` (`glm4`).
        model_class: the `AutoModelForCausalLM` class (`Glm4ForCausalLM`).
        config_hash: sha256 prefix of the skeleton itself (class, every tensor's name, shape and
            dtype rule, forward order, KV shape): configs that build the same model hash the same.
        units: placement units in forward order.
        order_source: `traced` (recorded from a forward pass on the meta device) or `structural`
            (registration order with the output head moved last; used if tracing fails).
        no_split_classes: the model's `_no_split_modules`.
        tied_groups: parameters shared between units.
        containers: module names above the units (`model`, `model.layers`).
        hidden_size, intermediate_size, vocab_size, num_attention_heads, num_key_value_heads,
        head_dim: the shapes the memory model needs.
        config_dtype: the checkpoint config's dtype, what `precision.dtype=auto` resolves to.
        hf_config: the `PretrainedConfig` it was built from, when it was built in this process;
            None when it was read from the anatomy cache (`glmdeploy.model.anatomy_cache`).
            Whoever needs the live config (the `transformers` strategy) rebuilds it from the
            model option (`glmdeploy.model.hf_config.hf_config_for`).

    `to_dict`/`from_dict` give it as plain JSON-ready data (everything but `hf_config`).
    """

    model_type: str
    model_class: str
    config_hash: str
    units: tuple[Unit, ...]
    order_source: str
    no_split_classes: tuple[str, ...]
    tied_groups: tuple[TiedGroup, ...]
    containers: tuple[str, ...]
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    config_dtype: Dtype | None
    hf_config: Any = field(default=None, compare=False, repr=False)

    def unit(self, name: str) -> Unit:
        return self.units[self.index(name)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers, strings) for JSON; `hf_config` is left out."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hf_config"}
        data["units"] = [_unit_dict(u) for u in self.units]
        data["tied_groups"] = [asdict(g) for g in self.tied_groups]
        data["config_dtype"] = None if self.config_dtype is None else str(self.config_dtype)
        plain: dict[str, Any] = json.loads(json.dumps(data))  # tuples as lists, as read back
        return plain

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Anatomy:
        """The inverse of `to_dict` (KeyError/TypeError/ValueError on malformed data)."""
        names = {f.name for f in fields(cls)} - {"hf_config"}
        values = {k: data[k] for k in names}  # every field: missing ones are malformed data
        values["units"] = tuple(_unit_from(u) for u in data["units"])
        values["tied_groups"] = tuple(
            TiedGroup(tuple(g["tensors"]), tuple(g["units"])) for g in data["tied_groups"]
        )
        values["no_split_classes"] = tuple(data["no_split_classes"])
        values["containers"] = tuple(data["containers"])
        dtype = data["config_dtype"]
        values["config_dtype"] = None if dtype is None else Dtype(dtype)
        anatomy = cls(**values)
        for name in _INT_FIELDS:
            if not _is_count(getattr(anatomy, name)) or getattr(anatomy, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if not anatomy.units:  # a plan of nothing would "fit"
            raise ValueError("an anatomy has at least one unit")
        return anatomy

    def index(self, name: str) -> int:
        for i, unit in enumerate(self.units):
            if unit.name == name:
                return i
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units)

    @property
    def blocks(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.kind == "block")

    @property
    def n_params(self) -> int:
        return sum(u.n_params for u in self.units)

    def total_bytes(self, dtype: Dtype, quantization: Quantization = Quantization.NONE) -> int:
        return sum(u.bytes(dtype, quantization) for u in self.units)

    def tied_leader(self, name: str) -> str:
        """The unit whose device `name` must share (itself unless tied to an earlier unit)."""
        for group in self.tied_groups:
            if name in group.units:
                return group.units[0]
        return name


UNIT_KINDS = frozenset({"embedding", "block", "norm", "head", "rotary", "other"})
_INT_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
               "num_key_value_heads", "head_dim")  # fmt: skip
_TALLIES = ("params", "persistent_buffers", "other_buffers")


def _unit_dict(unit: Unit) -> dict[str, Any]:
    data = asdict(unit)
    for name in _TALLIES:  # only the non-zero counts: most are zero
        data[name] = {k: v for k, v in data[name].items() if v}
    return data


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unit_from(data: Mapping[str, Any]) -> Unit:
    tallies = {name: Tally(**data[name]) for name in _TALLIES}
    # Negative or non-integer sizes would make every budget below them meaningless.
    if not all(_is_count(n) for t in tallies.values() for n in _fields(t)):
        raise ValueError(f"unit {data['name']!r}: element counts must be integers >= 0")
    if data["kind"] not in UNIT_KINDS or not _is_count(data["n_params"]):
        raise ValueError(f"unit {data['name']!r}: malformed kind or n_params")
    index = data["layer_index"]
    return Unit(
        name=str(data["name"]),
        kind=str(data["kind"]),
        class_name=str(data["class_name"]),
        layer_index=None if index is None else int(index),
        n_params=int(data["n_params"]),
        tensors=tuple(data["tensors"]),
        modules=tuple(data["modules"]),
        **tallies,
    )
