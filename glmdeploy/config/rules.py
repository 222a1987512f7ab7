"""Rules across config keys that JSON Schema cannot express (applied after the schema check)."""

from __future__ import annotations

import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from glmdeploy.config.map_rules import map_problems
from glmdeploy.config.settings import LEGACY_DECLARED_MODE, GpuMode, use_mode
from glmdeploy.problems import Problem, clip

_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_pinned(revision: str | None) -> bool:
    """Whether a hub revision names one commit (a full sha); branches and tags can move."""
    return revision is not None and _COMMIT.fullmatch(revision) is not None


def semantic_problems(doc: Mapping[str, Any], schema_clean: bool = True) -> list[Problem]:
    """Rules across keys that JSON Schema cannot express.

    When the schema already found problems, a rule that trips over the malformed data it reported
    is skipped rather than reported twice; on a schema-clean document every rule must run.
    """
    rules: list[Callable[[], list[Problem]]] = [
        lambda: _model_rules(doc["model"], doc.get("engine") or {}),
        lambda: _gpu_rules(doc["gpus"]),
        lambda: _precision_rules(doc["precision"], doc["gpus"]),
        lambda: _placement_rules(doc["placement"], doc["gpus"], doc["model"]),
        lambda: _runtime_rules(doc["runtime"], doc["model"]),
        lambda: _launch_rules(doc.get("launch") or {}, doc.get("parallel") or {}),
        lambda: _engine_rules(doc.get("engine") or {}),
        lambda: _parallel_rules(doc),
    ]
    out: list[Problem] = []
    for rule in rules:
        try:
            out += rule()
        except (KeyError, TypeError, ValueError, AttributeError):
            if schema_clean:
                raise
    return out


def _model_rules(model: Mapping[str, Any], engine: Mapping[str, Any]) -> list[Problem]:
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
    found, why = _lookup(src["path"]) if kind == "local" and src.get("path") else (None, "")
    if kind == "local" and src.get("path") and not (found and stat.S_ISDIR(found.st_mode)):
        out.append(
            Problem(
                "model.source.path",
                f"'{clip(src['path'])}' is not a directory{why}",
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
        revision = src.get("revision")
        if kind == "hub" and not is_pinned(revision):
            given = f"'{clip(str(revision))}' is a branch or tag" if revision else "no revision"
            out.append(
                Problem(
                    "model.source.revision",
                    f"remote code without a pinned revision ({given})",
                    "a 40-hex commit hash",
                    "pin model.source.revision=<commit> before "
                    "trusting remote code: a moving branch can change the code",
                )
            )
        if src.get("layout") == "chatglm" and engine.get("name") != "vllm":  # vLLM: its tokenizer
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
    """What to use (mode, ids, count) must be one consistent choice among what exists."""
    out: list[Problem] = []
    mode, declared = gpus.get("mode", "auto"), gpus.get("declared")
    ids, count = gpus.get("ids"), gpus.get("count")
    if mode == LEGACY_DECLARED_MODE and not declared:
        hint = "describe the fleet: gpus.declared=[{name: A100, memory_gib: 80}], or gpus=2x24gib"
        out.append(Problem("gpus.declared", "required when gpus.mode=declared", None, hint))
    for key, value, owner in (("ids", ids, "ids"), ("count", count, "least_used")):
        if mode == owner and value is None:
            out.append(
                Problem(f"gpus.{key}", f"required when gpus.mode={mode}", None, f"set gpus.{key}=…")
            )
        if mode not in (owner, "auto", LEGACY_DECLARED_MODE) and value is not None:
            out.append(
                Problem(
                    f"gpus.{key}",
                    f"only used with gpus.mode={owner} (or auto), but gpus.mode={mode}",
                    None,
                    f"choose gpus={owner}, or remove it: ~gpus.{key}",
                )
            )
    if mode in ("auto", LEGACY_DECLARED_MODE) and ids is not None and count is not None:
        out.append(
            Problem(
                "gpus.count",
                "gpus.ids and gpus.count both given: use those ids, or the N least used, not both",
                None,
                "remove one: ~gpus.count or ~gpus.ids",
            )
        )
    ids = ids or []
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        out.append(
            Problem(
                "gpus.ids",
                f"GPU {', '.join(map(str, dupes))} listed more than once",
                "each physical id once",
                f"gpus.ids=[{','.join(map(str, dict.fromkeys(ids)))}]",
            )
        )
    if declared:
        out += _fleet_rules(len(declared), ids, count)
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


def _fleet_rules(size: int, ids: list[int], count: int | None) -> list[Problem]:
    """A declared fleet of `size` GPUs has physical ids 0..size-1: selections must fit in it."""
    out: list[Problem] = []
    fleet = f"declared: {', '.join(map(str, range(size)))}"
    for gpu_id in sorted({i for i in ids if i >= size}):
        out.append(
            Problem(
                "gpus.ids",
                f"GPU {gpu_id} is not in the declared fleet",
                fleet,
                f"gpus.declared lists {size} GPU(s), numbered from 0",
            )
        )
    if count is not None and count > size:
        message = f"{count} GPUs requested, the declared fleet has {size}"
        out.append(Problem("gpus.count", message, f"at most {size}", None))
    return out


def selected_ids(gpus: Mapping[str, Any]) -> set[int] | None:
    """Physical ids the config may use, or None where only the hardware knows (probed GPUs)."""
    mode = use_mode(gpus.get("mode", "auto"), gpus.get("ids"), gpus.get("count"))
    if mode is GpuMode.IDS:
        return set(gpus.get("ids") or [])
    if mode is GpuMode.CPU:
        return set()
    declared = gpus.get("declared")
    return set(range(len(declared))) if declared else None


def _precision_rules(precision: Mapping[str, Any], gpus: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    quant = precision.get("quantization", "none")
    if quant != "none" and gpus.get("mode") == "cpu":
        out.append(
            Problem(
                "precision.quantization",
                f"{quant} with gpus=cpu",
                "a CUDA GPU (bitsandbytes)",
                "choose precision=bf16 or fp32 on CPU",
            )
        )
    selected = selected_ids(gpus)
    if precision["dtype"] == "bf16" and gpus.get("declared") and selected:
        for i, gpu in enumerate(gpus["declared"]):
            cc = tuple(gpu.get("compute_capability", (8, 0)))
            if i in selected and cc < (8, 0):
                out.append(
                    Problem(
                        "precision.dtype",
                        f"bf16, but GPU {i} ({gpu['name']}) has compute capability {cc[0]}.{cc[1]}",
                        ">= 8.0 for bf16",
                        "choose precision=fp16 (or auto)",
                    )
                )
    return out


def _placement_rules(
    placement: Mapping[str, Any], gpus: Mapping[str, Any], model: Mapping[str, Any]
) -> list[Problem]:
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
    found, why = _lookup(plan_file) if strategy == "plan_file" and plan_file else (None, "")
    if strategy == "plan_file" and plan_file and not (found and stat.S_ISREG(found.st_mode)):
        out.append(
            Problem(
                "placement.plan_file",
                f"'{clip(plan_file)}' does not exist{why}",
                "a file written by `glmdeploy plan --save FILE`",
                None,
            )
        )
    if strategy == "explicit" and placement.get("map"):
        arch = model.get("architecture")
        layers = arch.get("num_hidden_layers") if isinstance(arch, Mapping) else None
        offload, mode = placement.get("offload", "none"), gpus.get("mode", "auto")
        out += map_problems(placement["map"], offload, mode, selected_ids(gpus), layers)
    return out


def _lookup(path: str) -> tuple[os.stat_result | None, str]:
    """What the file system says of a path, and why it cannot say (` (File name too long)`)."""
    try:
        return Path(path).expanduser().stat(), ""
    except (FileNotFoundError, NotADirectoryError):
        return None, ""
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        return None, f" ({getattr(exc, 'strerror', None) or exc})"


def _launch_rules(launch: Mapping[str, Any], parallel: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    nnodes, node_rank = launch.get("nnodes", 1), launch.get("node_rank", 0)
    if node_rank >= nnodes:
        out.append(
            Problem(
                "launch.node_rank",
                f"{node_rank}, but launch.nnodes={nnodes}",
                f"0 … {nnodes - 1}",
                "node ranks count from 0 on the node at launch.master_addr",
            )
        )
    world = parallel.get("tp_size", 1) * parallel.get("pp_size", 1)
    if world % nnodes:
        out.append(
            Problem(
                "launch.nnodes",
                f"{nnodes} nodes cannot share {world} ranks (tp_size × pp_size) evenly",
                f"a divisor of {world}",
                "every node runs the same number of ranks",
            )
        )
    return out


def _parallel_rules(doc: Mapping[str, Any]) -> list[Problem]:
    """Tensor/pipeline parallelism on transformers (`glmdeploy.distributed.rules`)."""
    from glmdeploy.distributed import rules

    parallel, gpus = doc.get("parallel") or {}, doc["gpus"]
    if (doc.get("engine") or {}).get("name", "transformers") != "transformers":
        return []  # vLLM's own rules: glmdeploy.engines.vllm
    request = rules.ParallelRequest(
        parallel.get("tp_size", 1), parallel.get("pp_size", 1), doc["placement"]["strategy"],
        doc["placement"].get("offload", "none"), doc["precision"].get("quantization", "none"),
    )  # fmt: skip
    arch = doc["model"].get("architecture")
    facts = None
    if isinstance(arch, Mapping):
        facts = rules.ModelFacts(
            arch["model_type"], arch["num_attention_heads"], arch["num_key_value_heads"],
            arch["intermediate_size"], arch["num_hidden_layers"],
            arch.get("moe_intermediate_size") if arch.get("n_routed_experts") else None,
        )  # fmt: skip
    nnodes = (doc.get("launch") or {}).get("nnodes", 1)
    out = rules.transformers_parallel_problems(request, facts, rules.installed_transformers())
    return out + rules.gpu_count_problems(request.world_size, nnodes, _gpu_count(gpus))


def _gpu_count(gpus: Mapping[str, Any]) -> int | None:
    """How many GPUs the config selects, or None where only the hardware knows."""
    mode = use_mode(gpus.get("mode", "auto"), gpus.get("ids"), gpus.get("count"))
    if mode is GpuMode.LEAST_USED:
        count = gpus.get("count")
        return int(count) if isinstance(count, int) else None
    selected = selected_ids(gpus)
    return len(selected) if selected is not None else None


_VLLM_KEYS = ("gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "block_size",
              "enforce_eager")  # fmt: skip


def _engine_rules(engine: Mapping[str, Any]) -> list[Problem]:
    if engine.get("name", "transformers") == "vllm":
        return []
    return [
        Problem(
            f"engine.{key}",
            f"a vLLM setting, but engine.name={engine.get('name')}",
            None,
            f"choose engine=vllm, or remove it: ~engine.{key}",
        )
        for key in _VLLM_KEYS
        if key in engine
    ]


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
