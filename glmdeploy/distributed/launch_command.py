"""The torchrun command line, the ranks' environment on this node, and the other nodes' commands.

Pure functions of the deployment (no process is started here):

- `torchrun_command`: `python -m torch.distributed.run` with this node's `--nproc-per-node`,
  `--nnodes`, the rendezvous (static: `--node-rank --master-addr --master-port`; c10d:
  `--rdzv-backend c10d --rdzv-endpoint --rdzv-id`), `--rdzv-conf` timeouts from
  `launch.join_timeout_s`, `--log-dir` inside the run directory, no restarts, and the rank entry
  point `glmdeploy.distributed.worker` with its launch file.
- `rank_environment`: OMP_NUM_THREADS (torchrun sets none with one rank per node), the
  NCCL/Gloo interface, `launch.env`, and CUDA_VISIBLE_DEVICES = the GPUs the ranks use, so local
  rank r uses cuda:r (empty for CPU ranks, so transformers does not pick CUDA).
- `other_node_commands`: what to run on each other node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from glmdeploy.config.settings import Deployment, Launch, Rendezvous

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
WORKER = "glmdeploy.distributed.worker"
SHUTDOWN_TIMEOUT_S = 15  # torchrun's grace for ranks after SIGTERM, before it kills them


def local_ranks(deployment: Deployment) -> int:
    return deployment.parallel.world_size // deployment.launch.nnodes


def rendezvous_timeout_s(launch: Launch) -> int:
    """torchrun's rendezvous timeout, so that a node missing ends this node within the budget.

    Static: node 0 waits `timeout` for the others; another node's store client tries to connect
    for `timeout`, then once more after a back-off, so it gets 40 % of the budget. c10d: one
    `join_timeout`.
    """
    budget = launch.join_timeout_s
    if launch.rendezvous is Rendezvous.STATIC and launch.node_rank != 0:
        return max(1, int(budget / 2.5))
    return max(1, int(budget))


def rendezvous_id(config: Mapping[str, object]) -> str:
    """The same id on every node: a hash of the config without the node's own rank."""
    launch = dict(config.get("launch") or {})  # type: ignore[call-overload]
    launch.pop("node_rank", None)
    text = json.dumps({**config, "launch": launch}, sort_keys=True, default=str)
    return "glmdeploy-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def torchrun_command(
    deployment: Deployment, config: Mapping[str, object], spec: Path, run_dir: Path
) -> list[str]:
    launch = deployment.launch
    timeout = rendezvous_timeout_s(launch)
    args = [
        *TORCHRUN,
        "--nnodes",
        str(launch.nnodes),
        "--nproc-per-node",
        str(local_ranks(deployment)),
    ]
    if launch.rendezvous is Rendezvous.C10D:
        args += [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{launch.master_addr}:{launch.master_port}",
            "--rdzv-id",
            rendezvous_id(config),
            "--rdzv-conf",
            f"join_timeout={timeout}",
        ]
    else:
        args += [
            "--node-rank",
            str(launch.node_rank),
            "--master-addr",
            launch.master_addr,
            "--master-port",
            str(launch.master_port),
            "--rdzv-conf",
            f"timeout={timeout}",
        ]
    args += [
        "--max-restarts",
        "0",
        "--log-dir",
        str(Path(run_dir) / "torchrun"),
        "--shutdown-timeout",
        str(SHUTDOWN_TIMEOUT_S),
        "-m",
        WORKER,
        str(spec),
    ]
    return args


def rank_environment(
    deployment: Deployment,
    gpu_ids: Sequence[int],
    base: Mapping[str, str],
    *,
    cores: int | None = None,
    error_file: Path | None = None,
) -> dict[str, str]:
    """The environment torchrun and its ranks start with: `base` plus the variables above.

    Args:
        gpu_ids: physical ids of the GPUs this node's ranks use, in local-rank order.
        base: the environment to extend (usually `os.environ`).
        cores: CPU cores for the ranks (default: the cores this process may run on).
        error_file: where torchrun copies the failing rank's error (TORCHELASTIC_ERROR_FILE).
    """
    launch = deployment.launch
    env = dict(base)
    threads = launch.omp_num_threads
    if threads is None:
        available = cores if cores is not None else _cores()
        threads = max(1, available // local_ranks(deployment))
    env["OMP_NUM_THREADS"] = str(threads)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
    if launch.socket_ifname:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = launch.socket_ifname
    if error_file is not None:
        env["TORCHELASTIC_ERROR_FILE"] = str(error_file)
    env.update(launch.env)
    return env


def _cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def other_node_commands(
    command: str, overrides: Sequence[str], launch: Launch
) -> list[tuple[int | None, str]]:
    """(node rank, command) for every other node: the same overrides, with its own node rank
    (static); c10d assigns node ranks, so every node runs this very command (None)."""
    if launch.rendezvous is Rendezvous.C10D:
        return [(None, _line(command, overrides))]
    kept = [o for o in overrides if not o.lstrip("+~").startswith("launch.node_rank=")]
    return [
        (node, _line(command, [*kept, f"launch.node_rank={node}"]))
        for node in range(launch.nnodes)
        if node != launch.node_rank
    ]


def _line(command: str, overrides: Sequence[str]) -> str:
    return " ".join(["glmdeploy", command, *(shlex.quote(o) for o in overrides)])
