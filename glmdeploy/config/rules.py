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
        lambda: _tensor_parallel_rules(doc),
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
    allowed = _selected_ids(gpus)
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


def _selected_ids(gpus: Mapping[str, Any]) -> set[int] | None:
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
        offload, mode = placement.get("offload", "none"), gpus["mode"]
        out += map_problems(placement["map"], offload, mode, _selected_ids(gpus), layers)
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


def _tensor_parallel_rules(doc: Mapping[str, Any]) -> list[Problem]:
    """transformers' TP splits q and k/v heads evenly (no KV replication); vLLM replicates KV."""
    tp = (doc.get("parallel") or {}).get("tp_size", 1)
    arch = doc["model"].get("architecture")
    if tp == 1 or (doc.get("engine") or {}).get("name") == "vllm" or not isinstance(arch, Mapping):
        return []
    heads, kv = arch["num_attention_heads"], arch["num_key_value_heads"]
    out = []
    for what, n in (("attention heads", heads), ("KV heads", kv)):
        if n % tp:
            vllm_can = what == "KV heads" and heads % tp == 0 and tp % kv == 0
            hint = ("engine=vllm replicates KV heads when tp exceeds them (glmdeploy export vllm …)"
                    if vllm_can else f"parallel.tp_size=<a divisor of {n}>")  # fmt: skip
            message = (f"{tp}, but the model's {n} {what} do not divide by it: transformers' "
                       "tensor parallelism gives every rank whole heads")  # fmt: skip
            out.append(Problem("parallel.tp_size", message, f"a divisor of {n}", hint))
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
