"""Turns a transformers config into an `Anatomy` by building the model on the meta device.

The only module of the planning path that imports torch/transformers (lazily, from `build_anatomy`).
No weights are allocated and no CUDA call is made: the model is created under `torch.device("meta")`
in bf16 (so tensors that the model deliberately creates in fp32 can be told apart), and the forward
order is recorded by running the model once on a two-token meta input with every decoder block
replaced by a pass-through stub (blocks are atomic units, so their insides do not matter, and MoE
routing, which needs real data, never runs).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import fields
from typing import Any

from glmdeploy.config.settings import Dtype
from glmdeploy.model.anatomy import INT4_BLOCK, Anatomy, Tally, TiedGroup, Unit
from glmdeploy.model.hf_config import without_stray_token_ids
from glmdeploy.problems import ConfigError, Problem

_FIELDS = [f.name for f in fields(Tally)]
_DTYPES = {"bfloat16": Dtype.BF16, "float16": Dtype.FP16, "float32": Dtype.FP32}


def config_key(hf_config: Any) -> str:
    """A hash of the whole config dict (the in-process cache key)."""
    text = json.dumps(hf_config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def meta_model(hf_config: Any, dtype: str = "bfloat16") -> Any:
    """`AutoModelForCausalLM.from_config` on the meta device, as `from_pretrained` builds it."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = without_stray_token_ids(copy.deepcopy(hf_config))
    try:
        with torch.device("meta"):
            auto: Any = AutoModelForCausalLM  # untyped upstream
            return auto.from_config(cfg, dtype=getattr(torch, dtype))
    except Exception as exc:  # transformers raises many types for unusable configs
        kind = getattr(cfg, "model_type", "?")
        message = f"transformers cannot build a causal LM for model_type {kind!r}: {exc}"
        hint = "check the architecture values against the checkpoint's config.json"
        raise ConfigError([Problem("model.architecture", message, hint=hint)]) from exc


_CACHE: dict[str, Anatomy] = {}


def build_anatomy(hf_config: Any) -> Anatomy:
    """The anatomy of `AutoModelForCausalLM.from_config(hf_config)`, cached per config.

    Args:
        hf_config: a `transformers.PretrainedConfig` in native names.

    Raises:
        ConfigError: transformers cannot build a causal LM from this config.
    """
    key = config_key(hf_config)
    if key not in _CACHE:
        _CACHE[key] = anatomy_from_config(hf_config)
    return _CACHE[key]


def anatomy_from_config(hf_config: Any) -> Anatomy:
    """Build the anatomy (`build_anatomy` caches it)."""
    import torch

    model = meta_model(hf_config)
    no_split = set(model._no_split_modules or ())
    units, containers = _find_units(model, no_split)
    traced = _trace_order(model, units, no_split)
    seen = set(traced or [])
    order = [*(traced or []), *(n for n in _structural_order(model, units) if n not in seen)]
    rank = {name: i for i, name in enumerate(order)}
    module_to_unit: dict[str, str] = {}
    submodules: dict[str, list[str]] = {name: [] for name in units}
    for name, obj in units.items():
        for sub, _ in obj.named_modules(prefix=name) if isinstance(obj, torch.nn.Module) else ():
            module_to_unit.setdefault(sub, name)
            submodules[name].append(sub)

    def unit_of(tensor: str) -> str:
        return tensor if tensor in units else module_to_unit[tensor.rpartition(".")[0]]

    params = dict(model.named_parameters(remove_duplicate=False))
    groups = _tied_names(model, params)
    owner: dict[str, str] = {}  # tensor -> the alias that carries the bytes (first in order)
    for names in groups:
        owner.update(dict.fromkeys(names, min(names, key=lambda t: rank[unit_of(t)])))
    tally = _Tallies(model, no_split, units)
    for name, p in params.items():
        tally.add(unit_of(name), name, p, "params", counted=owner.get(name, name) == name)
    for name, b in model.named_buffers():
        module_name, _, local = name.rpartition(".")
        persistent = local not in model.get_submodule(module_name)._non_persistent_buffers_set
        tally.add(unit_of(name), name, b, "persistent" if persistent else "other", counted=True)

    cfg = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    built = tuple(
        Unit(
            name=name,
            kind=_kind(units[name], no_split, *embeddings),
            class_name=type(units[name]).__name__,
            layer_index=_layer_index(name) if type(units[name]).__name__ in no_split else None,
            n_params=tally.n_params[name],
            params=Tally(*tally.acc[name]["params"]),
            persistent_buffers=Tally(*tally.acc[name]["persistent"]),
            other_buffers=Tally(*tally.acc[name]["other"]),
            tensors=tuple(tally.names[name]),
            modules=tuple(submodules[name]),
        )
        for name in order
    )
    tied = tuple(
        TiedGroup(
            tuple(sorted(names)), tuple(sorted({unit_of(t) for t in names}, key=rank.__getitem__))
        )
        for names in groups
        if len({unit_of(t) for t in names}) > 1
    )
    shape = f"{type(model).__name__} kv={kv_heads}x{head_dim} heads={heads}"
    signature = "\n".join([shape, *order, *sorted(tally.signature)])
    raw_dtype = str(getattr(hf_config, "dtype", None) or "").replace("torch.", "")
    return Anatomy(
        model_type=str(cfg.model_type),
        model_class=type(model).__name__,
        config_hash=hashlib.sha256(signature.encode()).hexdigest()[:16],
        units=built,
        order_source="traced" if traced else "structural",
        no_split_classes=tuple(sorted(no_split)),
        tied_groups=tied,
        containers=tuple(containers),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        config_dtype=_DTYPES.get(raw_dtype),
        hf_config=hf_config,
    )


def _tied_names(model: Any, params: dict[str, Any]) -> list[list[str]]:
    """Parameter names that are one tensor: the same Parameter object, or declared ties."""
    aliases: dict[int, list[str]] = {}
    for name, p in params.items():
        aliases.setdefault(id(p), []).append(name)
    groups = [names for names in aliases.values() if len(names) > 1]
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in params and source in params and params[target] is not params[source]:
            groups.append([source, target])
    return groups


class _Tallies:
    """Per-unit element counts by dtype rule, tensor names and the structural signature."""

    def __init__(self, model: Any, no_split: set[str], units: dict[str, Any]) -> None:
        self.linear_rows = _quantisable_linears(model, units, no_split)
        self.fp32_if_fp16 = _patterns(getattr(model, "_keep_in_fp32_modules", None))
        self.fp32_if_half = _patterns(getattr(model, "_keep_in_fp32_modules_strict", None))
        kinds = ("params", "persistent", "other")
        self.acc = {n: {k: [0] * len(_FIELDS) for k in kinds} for n in units}
        self.n_params = dict.fromkeys(units, 0)
        self.names: dict[str, list[str]] = {n: [] for n in units}
        self.signature: list[str] = []

    def add(self, unit: str, name: str, tensor: Any, kind: str, counted: bool) -> None:
        if kind != "other":
            self.names[unit].append(name)
        if not counted:  # a tied alias: its bytes are counted under the first name
            return
        if kind == "params":
            self.n_params[unit] += tensor.numel()
        acc = self.acc[unit][kind]
        for i, count in enumerate(_counts(self.tally(name, tensor, kind))):
            acc[i] += count
        category = self._category(name, tensor)
        self.signature.append(f"{name}:{tuple(tensor.shape)}:{category}:{kind}")

    def tally(self, name: str, tensor: Any, kind: str) -> Tally:
        """One tensor's own counts by dtype rule (what `add` adds to its unit)."""
        counts = dict.fromkeys(_FIELDS, 0)
        category = self._category(name, tensor)
        numel = tensor.numel()
        counts[category] = numel * tensor.element_size() if category == "other_bytes" else numel
        if category == "compute" and kind == "params" and name in self.linear_rows:
            counts.update(linear=numel, linear_rows=self.linear_rows[name],
                          linear_blocks=-(-numel // INT4_BLOCK))  # fmt: skip
        return Tally(**counts)

    def _category(self, name: str, tensor: Any) -> str:
        """The `Tally` field: bf16 tensors were created in the default dtype (follow the compute
        dtype unless a keep-in-fp32 list names them); fp32 ones were created fp32 on purpose."""
        import torch

        if tensor.dtype == torch.bfloat16:
            if self.fp32_if_half is not None and self.fp32_if_half.search(name):
                return "fp32_if_half"
            if self.fp32_if_fp16 is not None and self.fp32_if_fp16.search(name):
                return "fp32_if_fp16"
            return "compute"
        return "fp32" if tensor.dtype == torch.float32 else "other_bytes"


def tensor_tallies(model: Any) -> dict[str, Tally]:
    """Each distinct parameter's and buffer's own `Tally`, by name (a tied parameter once, under its
    first name): per tensor, the counts that `anatomy_from_config` sums per unit."""
    no_split = set(model._no_split_modules or ())
    units, _ = _find_units(model, no_split)
    tallies = _Tallies(model, no_split, units)
    out = {name: tallies.tally(name, p, "params") for name, p in model.named_parameters()}
    out.update({name: tallies.tally(name, b, "buffers") for name, b in model.named_buffers()})
    return out


def _counts(tally: Tally) -> list[int]:
    return [getattr(tally, name) for name in _FIELDS]


def _find_units(model: Any, no_split: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Units in registration order: name -> module (or -> tensor held directly by a container)."""
    units: dict[str, Any] = {}
    containers: list[str] = []

    def walk(name: str, module: Any) -> None:
        children = list(module.named_children())
        if name and (type(module).__name__ in no_split or not children):
            if any(True for _ in itertools.chain(module.parameters(), module.buffers())):
                units[name] = module
            return
        if name:
            containers.append(name)
        prefix = f"{name}." if name else ""
        direct = itertools.chain(module.named_parameters(recurse=False),
                                 module.named_buffers(recurse=False))  # fmt: skip
        for local, tensor in direct:
            units[prefix + local] = tensor
        for local, child in children:
            walk(prefix + local, child)

    walk("", model)
    return units, containers


def _trace_order(model: Any, units: dict[str, Any], no_split: set[str]) -> list[str] | None:
    """Unit names in the order a forward pass first calls them, or None if the pass fails."""
    import torch

    order: list[str] = []
    handles: list[Any] = []
    stubbed: list[Any] = []

    def stub_for(name: str) -> Any:
        def stub(*args: Any, **kwargs: Any) -> Any:
            order.append(name)
            return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return stub

    def hook_for(name: str) -> Any:
        return lambda module, args: order.append(name)

    for name, obj in units.items():
        if not isinstance(obj, torch.nn.Module):
            continue
        if type(obj).__name__ in no_split:
            obj.forward = stub_for(name)
            stubbed.append(obj)
        else:
            handles.append(obj.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device="meta"), use_cache=True)
    except Exception:  # any failure: fall back to the structural order
        return None
    finally:
        for handle in handles:
            handle.remove()
        for module in stubbed:
            del module.forward
    return list(dict.fromkeys(order))


def _structural_order(model: Any, units: dict[str, Any]) -> list[str]:
    """Registration order (blocks by index, as ModuleLists register them), output head last."""
    head = model.get_output_embeddings()
    names = [n for n in units if units[n] is not head]
    return names + [n for n in units if units[n] is head]


def _quantisable_linears(model: Any, units: dict[str, Any], no_split: set[str]) -> dict[str, int]:
    """`nn.Linear` weights inside decoder blocks -> output rows (what bitsandbytes converts)."""
    import torch

    rows: dict[str, int] = {}
    for name, obj in units.items():
        if isinstance(obj, torch.nn.Module) and type(obj).__name__ in no_split:
            for sub, module in obj.named_modules(prefix=name):
                if isinstance(module, torch.nn.Linear):
                    rows[f"{sub}.weight"] = module.out_features
    return rows


def _patterns(names: Any) -> re.Pattern[str] | None:
    names = list(names or ())
    return re.compile("|".join(n.replace("*", ".*") for n in names)) if names else None


def _kind(obj: Any, no_split: set[str], in_emb: Any, out_emb: Any) -> str:
    name = type(obj).__name__
    if obj is in_emb:
        return "embedding"
    if obj is out_emb:
        return "head"
    if name in no_split:
        return "block"
    if "Rotary" in name:
        return "rotary"
    return "norm" if "Norm" in name else "other"


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)$", name)
    return int(match.group(1)) if match else None
