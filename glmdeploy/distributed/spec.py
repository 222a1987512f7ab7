"""The launch file (`launch.json` in the run directory) that tells every rank of a node what to do.

The launching glmdeploy process plans, resolves the checkpoint and writes this file once; each
rank torchrun starts reads it. It carries the plan and, per rank, the exact tensors (local shape
and bytes) the rank must hold, so the ranks check their shards against the plan instead of
planning again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmdeploy import atomic

SPEC_FORMAT = "glmdeploy.launch/1"
SPEC_JSON = "launch.json"
SEED = 0  # every rank seeds torch alike: sampling must agree across ranks


@dataclass(frozen=True)
class NodeGpu:
    """A GPU this node's ranks use, in local-rank order (local rank r uses cuda:r)."""

    physical_id: int
    name: str
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class LaunchSpec:
    """What every rank of this node runs.

    Attributes:
        command: load | generate | bench | run.
        config: the resolved config the job was started with (validated again by each rank).
        json_out: results go to the launching process as JSON: ranks print nothing to stdout.
        checkpoint: the directory (or hub id) `from_pretrained` reads, prepared by the launcher.
        checkpoint_warnings: what preparing it found worth saying.
        plan: `Plan.to_dict()` of the per-rank plan.
        expected: rank -> tensor -> (local shape, bytes), for every rank of the world.
        gpus: this node's GPUs in local-rank order; empty: the ranks run on the CPU (gloo).
        join_timeout_s: `launch.join_timeout_s`, also how long a rank waits for the others to
            create the process group.
        seed: the torch seed of every rank.
    """

    command: str
    config: Mapping[str, Any]
    json_out: bool
    checkpoint: str
    checkpoint_warnings: tuple[str, ...]
    plan: Mapping[str, Any]
    expected: Mapping[int, Mapping[str, tuple[tuple[int, ...], int]]]
    gpus: tuple[NodeGpu, ...] = ()
    join_timeout_s: float = 300.0
    seed: int = SEED
    format: str = field(default=SPEC_FORMAT)

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / SPEC_JSON
        data = asdict(self)
        data["expected"] = {
            str(r): {n: [list(s), b] for n, (s, b) in t.items()} for r, t in self.expected.items()
        }
        atomic.write_text(path, json.dumps(data, indent=1, default=str) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> LaunchSpec:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != SPEC_FORMAT:
            raise ValueError(f"{path} is not a {SPEC_FORMAT} launch file")
        return cls(
            command=str(data["command"]),
            config=data["config"],
            json_out=bool(data["json_out"]),
            checkpoint=str(data["checkpoint"]),
            checkpoint_warnings=tuple(data["checkpoint_warnings"]),
            plan=data["plan"],
            expected={
                int(r): {n: (tuple(s), int(b)) for n, (s, b) in t.items()}
                for r, t in data["expected"].items()
            },
            gpus=tuple(
                NodeGpu(g["physical_id"], g["name"], tuple(g["compute_capability"]))
                for g in data["gpus"]
            ),
            join_timeout_s=float(data["join_timeout_s"]),
            seed=int(data["seed"]),
        )
