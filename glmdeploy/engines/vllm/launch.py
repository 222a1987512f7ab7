"""What each node runs: the `vllm serve --config` mapping, the environment and the commands.

The mapping holds long option names of vLLM 0.33.0 only (`flags`), `true` booleans only and no
nulls; `model:` names the checkpoint (the supported route: no positional model or `--model` on the
command line). Values vLLM would derive from the GPU it starts on (max-num-batched-tokens,
max-num-seqs) are pinned to what the fit check assumed. Every node gets the same file; the node
rank (and `--headless` on the others, which then run workers only) goes on its command line.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmdeploy.config.settings import Deployment, Dtype, Quantization
from glmdeploy.engines.vllm import facts
from glmdeploy.engines.vllm.checkpoint import VllmCheckpoint
from glmdeploy.engines.vllm.fit import Settings
from glmdeploy.engines.vllm.ranks import PP_PARTITION_ENV
from glmdeploy.hardware.gpu_select import ORDER, VISIBLE
from glmdeploy.hardware.nvml import GpuInfo


@dataclass(frozen=True)
class NodeCommand:
    node: int
    argv: tuple[str, ...]
    shell: str  # environment assignments, then the command, ready to paste


def node_environment(
    deployment: Deployment, gpus: Sequence[GpuInfo], parts: Sequence[int], how: str
) -> dict[str, str]:
    launch = deployment.launch
    env = {ORDER: "PCI_BUS_ID", VISIBLE: ",".join(str(g.physical_id) for g in gpus)}
    if PP_PARTITION_ENV in how:
        env[PP_PARTITION_ENV] = ",".join(map(str, parts))
    if launch.socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = launch.socket_ifname
    env.update(launch.env)
    return env


def serve_config(
    deployment: Deployment,
    checkpoint: VllmCheckpoint,
    dtype: Dtype,
    s: Settings,
    host: str,
    port: int,
) -> dict[str, Any]:
    src, p, launch, engine = (
        deployment.model.source,
        deployment.parallel,
        deployment.launch,
        deployment.engine,
    )
    config: dict[str, Any] = {"model": checkpoint.model or deployment.model.name}
    if checkpoint.revision:
        config["revision"] = checkpoint.revision
    config["served-model-name"] = deployment.model.name
    if checkpoint.remote_code and src.trust_remote_code:
        config["trust-remote-code"] = True
    if not checkpoint.tokenizer:
        config["skip-tokenizer-init"] = True
    config["dtype"] = facts.VLLM_DTYPE_NAMES[dtype]
    if deployment.precision.quantization is Quantization.INT8:
        config["quantization"] = facts.ONLINE_FP8
    kv = deployment.runtime.kv_cache_dtype
    if kv not in (Dtype.AUTO, dtype):
        config["kv-cache-dtype"] = facts.VLLM_DTYPE_NAMES[kv]
    config["max-model-len"] = s.max_model_len
    config["gpu-memory-utilization"] = s.gpu_memory_utilization
    config["tensor-parallel-size"] = p.tp_size
    config["pipeline-parallel-size"] = p.pp_size
    if p.world_size > 1:
        config["distributed-executor-backend"] = "mp"
    if launch.nnodes > 1:
        config.update(
            {
                "nnodes": launch.nnodes,
                "master-addr": launch.master_addr,
                "master-port": launch.master_port,
            }
        )
    config["max-num-seqs"] = s.max_num_seqs
    config["max-num-batched-tokens"] = s.max_num_batched_tokens
    if s.block_size != facts.DEFAULT_BLOCK_SIZE:
        config["block-size"] = s.block_size
    if engine.enforce_eager:
        config["enforce-eager"] = True
    config.update({"host": host, "port": port})
    return config


def node_commands(
    deployment: Deployment, env: Mapping[str, str], config_path: Path | str
) -> tuple[NodeCommand, ...]:
    """`vllm serve --config FILE` per node: non-zero node ranks run headless (workers only)."""
    nnodes = deployment.launch.nnodes
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    out = []
    for node in range(nnodes):
        argv = ["vllm", "serve", "--config", str(config_path)]
        if nnodes > 1:
            argv += ["--node-rank", str(node), *(["--headless"] if node else [])]
        out.append(NodeCommand(node, tuple(argv), f"{prefix} {shlex.join(argv)}"))
    return tuple(out)
