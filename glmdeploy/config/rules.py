"""Rules across config keys that JSON Schema cannot express (applied after the schema check)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from glmdeploy.problems import Problem

_RANGE = re.compile(r"^(?P<prefix>.*\.)(?P<start>\d+)(?:-(?P<end>\d+))?$")


def semantic_problems(doc: Mapping[str, Any], schema_clean: bool = True) -> list[Problem]:
    """Rules across keys that JSON Schema cannot express.

    When the schema already found problems, a rule that trips over the malformed data it reported
    is skipped rather than reported twice; on a schema-clean document every rule must run.
    """
    rules: list[Callable[[], list[Problem]]] = [
        lambda: _model_rules(doc["model"]),
        lambda: _gpu_rules(doc["gpus"]),
        lambda: _precision_rules(doc["precision"], doc["gpus"]),
        lambda: _placement_rules(doc["placement"], doc["gpus"]),
        lambda: _runtime_rules(doc["runtime"], doc["model"]),
    ]
    out: list[Problem] = []
    for rule in rules:
        try:
            out += rule()
        except (KeyError, TypeError, ValueError, AttributeError):
            if schema_clean:
                raise
    return out


def _model_rules(model: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    src, arch = model["source"], model.get("architecture")
    kind = src["kind"]
    needs = {"local": "path", "hub": "hub_id"}
    if kind in needs and not src.get(needs[kind]):
        out.append(
            Problem(
                f"model.source.{needs[kind]}",
                f"required when model.source.kind={kind}",
                None,
                f"set model.source.{needs[kind]}=…",
            )
        )
    if kind == "local" and src.get("path") and not Path(src["path"]).expanduser().is_dir():
        out.append(
            Problem(
                "model.source.path",
                f"'{src['path']}' is not a directory",
                "a checkpoint directory with config.json",
                "check the path",
            )
        )
    if arch is None and kind != "local":
        out.append(
            Problem(
                "model.architecture",
                f"null, but model.source.kind={kind}",
                "the architecture facts",
                "only local checkpoints can omit them",
            )
        )
    if src.get("trust_remote_code"):
        if kind == "hub" and not src.get("revision"):
            out.append(
                Problem(
                    "model.source.revision",
                    "remote code without a pinned revision",
                    "a commit hash",
                    "pin model.source.revision=<commit> before "
                    "trusting remote code: a moving branch can change the code",
                )
            )
        if src.get("layout") == "chatglm":
            out.append(
                Problem(
                    "model.source.trust_remote_code",
                    "not needed for chatglm layout",
                    "false",
                    "glmdeploy converts legacy ChatGLM checkpoints to "
                    "transformers' GlmForCausalLM; its remote code fails on transformers 5",
                )
            )
    return out


def _gpu_rules(gpus: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    mode = gpus["mode"]
    for key, owner in (("ids", "ids"), ("count", "least_used"), ("declared", "declared")):
        if mode == owner and key not in gpus:
            out.append(
                Problem(f"gpus.{key}", f"required when gpus.mode={mode}", None, f"set gpus.{key}=…")
            )
        if mode != owner and gpus.get(key) is not None:
            out.append(
                Problem(
                    f"gpus.{key}",
                    f"only used with gpus={owner}, but gpus.mode={mode}",
                    None,
                    f"choose gpus={owner}, or remove it: ~gpus.{key}",
                )
            )
    ids = gpus.get("ids") or []
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        out.append(
            Problem(
                "gpus.ids",
                f"GPU {', '.join(map(str, dupes))} listed more than once",
                "each physical id once",
                f"gpus.ids=[{','.join(map(str, dict.fromkeys(ids)))}]",
            )
        )
    allowed = selected_ids(gpus)
    for key in sorted(gpus.get("max_memory_gib") or {}, key=str):
        if allowed is not None and int(key) not in allowed:
            out.append(
                Problem(
                    f"gpus.max_memory_gib.{key}",
                    f"a cap for GPU {key}, which is not selected",
                    f"selected: {', '.join(map(str, sorted(allowed))) or 'none'}",
                    "caps are keyed by physical id, as in gpus.ids",
                )
            )
    return out


def selected_ids(gpus: Mapping[str, Any]) -> set[int] | None:
    """Physical ids the config names, or None where only the hardware knows (auto, least_used)."""
    mode = gpus["mode"]
    if mode == "ids":
        return set(gpus.get("ids") or [])
    if mode == "declared":
        return set(range(len(gpus.get("declared") or [])))
    if mode == "cpu":
        return set()
    return None


def _precision_rules(precision: Mapping[str, Any], gpus: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    quant = precision.get("quantization", "none")
    if quant != "none" and gpus["mode"] == "cpu":
        out.append(
            Problem(
                "precision.quantization",
                f"{quant} with gpus=cpu",
                "a CUDA GPU (bitsandbytes)",
                "choose precision=bf16 or fp32 on CPU",
            )
        )
    if precision["dtype"] == "bf16" and gpus["mode"] == "declared":
        for i, gpu in enumerate(gpus.get("declared") or []):
            cc = tuple(gpu.get("compute_capability", (8, 0)))
            if cc < (8, 0):
                out.append(
                    Problem(
                        "precision.dtype",
                        f"bf16, but GPU {i} ({gpu['name']}) has compute capability {cc[0]}.{cc[1]}",
                        ">= 8.0 for bf16",
                        "choose precision=fp16 (or auto)",
                    )
                )
    return out


def _placement_rules(placement: Mapping[str, Any], gpus: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    strategy = placement["strategy"]
    for key, owner in (("map", "explicit"), ("plan_file", "plan_file")):
        present = placement.get(key) is not None
        if strategy == owner and not present:
            out.append(
                Problem(
                    f"placement.{key}",
                    f"required when placement.strategy={owner}",
                    None,
                    f"set placement.{key}=…",
                )
            )
        if strategy != owner and present:
            out.append(
                Problem(
                    f"placement.{key}",
                    f"only used with placement={owner}, but placement.strategy={strategy}",
                    None,
                    f"choose placement={owner}, or remove it: ~placement.{key}",
                )
            )
    plan_file = placement.get("plan_file")
    if strategy == "plan_file" and plan_file and not Path(plan_file).expanduser().is_file():
        out.append(
            Problem(
                "placement.plan_file",
                f"'{plan_file}' does not exist",
                "a file written by `glmdeploy plan --save FILE`",
                None,
            )
        )
    if strategy == "explicit" and placement.get("map"):
        out += _map_rules(placement["map"], placement.get("offload", "none"), gpus)
    return out


def _map_rules(entries: list[Any], offload: str, gpus: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    allowed = selected_ids(gpus)
    spans: list[tuple[str, int, int, int]] = []  # (prefix, start, end, entry) of layer ranges
    names: dict[str, int] = {}  # plain module name -> entry
    for i, entry in enumerate(entries):
        device = entry["device"]
        where = f"placement.map[{i}].device"
        if isinstance(device, int) and allowed is not None and device not in allowed:
            shown = ", ".join(map(str, sorted(allowed))) or "none (gpus=cpu)"
            out.append(
                Problem(
                    where,
                    f"GPU {device} is not selected (selected: {shown})",
                    "a selected physical GPU id, cpu or disk",
                    "maps name physical GPU ids, the same ids as gpus.ids",
                )
            )
        if device == "disk" and offload != "disk":
            out.append(
                Problem(
                    where,
                    "disk, but placement.offload is not disk",
                    None,
                    "allow it: placement.offload=disk",
                )
            )
        if device == "cpu" and offload == "none" and gpus["mode"] != "cpu":
            out.append(
                Problem(
                    where,
                    "cpu, but placement.offload=none",
                    None,
                    "allow it: placement.offload=cpu",
                )
            )
        modules = [entry["modules"]] if isinstance(entry["modules"], str) else entry["modules"]
        for name in modules:
            out += _overlaps(name, i, spans, names)
    return out


def _overlaps(
    name: str, entry: int, spans: list[tuple[str, int, int, int]], names: dict[str, int]
) -> list[Problem]:
    """Record one module pattern; Problems if it repeats or overlaps an earlier one."""
    where = f"placement.map[{entry}].modules"
    match = _RANGE.match(name)
    if not match:
        if name in names:
            return [
                Problem(
                    where,
                    f"'{name}' is already placed by placement.map[{names[name]}]",
                    "each module once",
                    "remove one of the two entries",
                )
            ]
        names[name] = entry
        return []
    prefix, start = match["prefix"], int(match["start"])
    end = int(match["end"]) if match["end"] is not None else start
    if end < start:
        return [
            Problem(where, f"empty range '{name}'", "start <= end", f"write {prefix}{end}-{start}")
        ]
    out = [
        Problem(
            where,
            f"'{name}' overlaps {p}{s}-{e} in placement.map[{j}]",
            "each layer once",
            "make the ranges disjoint",
        )
        for p, s, e, j in spans
        if p == prefix and s <= end and start <= e
    ]
    spans.append((prefix, start, end, entry))
    return out


def _runtime_rules(runtime: Mapping[str, Any], model: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    ctx = runtime["max_context_tokens"]
    new = runtime.get("max_new_tokens", 1)
    if new >= ctx:
        out.append(
            Problem(
                "runtime.max_new_tokens",
                f"{new} new tokens do not fit a context of {ctx}",
                f"fewer than runtime.max_context_tokens ({ctx})",
                f"raise runtime.max_context_tokens above {new}",
            )
        )
    arch = model.get("architecture")
    if isinstance(arch, Mapping) and ctx > arch.get("max_position_embeddings", ctx):
        limit = arch["max_position_embeddings"]
        out.append(
            Problem(
                "runtime.max_context_tokens",
                f"{ctx} exceeds what {model['name']} supports ({limit})",
                f"<= {limit}",
                f"runtime.max_context_tokens={limit}, or a long-context model "
                "(e.g. model=chatglm3-6b-32k)",
            )
        )
    return out
