"""Each rank's part of the run record (`rank-N.json`), and what the launcher concludes from them.

A rank writes its file when it starts (`starting`), once it has joined the process group
(`running`), and when it ends (`ok`, `failed` with the error and when, `interrupted`), atomically.
The launching process reads this node's files after torchrun exits: their results go into
`run.json`, and when the run failed, `root_cause` names the rank that failed first (a rank that
died without a word, or the first error that is not a lost connection to a failed peer).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from glmdeploy import atomic
from glmdeploy.problems import ExitCode, GlmDeployError, HardwareError, Problem

RANK_FORMAT = "glmdeploy.rank/1"
RankStatus = Literal["starting", "running", "ok", "failed", "interrupted"]
# A rank that lost its peers says so in one of these ways (gloo, c10d store, NCCL).
_PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset|Broken pipe|DistBackendError|DistNetworkError|"
    r"recvBytes|sendBytes|remote worker|NCCL communicator was aborted|Timed out|timeout",
    re.IGNORECASE,
)


def rank_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rank-{rank}.json"


def rank_log(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rank-{rank}.log"


@dataclass
class RankRecord:
    """One rank's part of a run (JSON through `asdict`)."""

    rank: int
    world_size: int
    node: int  # torchrun's group rank
    local_rank: int
    label: str  # "rank 1 · GPU 3 → cuda:1", "rank 0 · cpu"
    pid: int = field(default_factory=os.getpid)
    status: RankStatus = "starting"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    failed_at: float | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    format: str = RANK_FORMAT

    def write(self, run_dir: Path) -> None:
        text = json.dumps(asdict(self), indent=1, default=str) + "\n"
        atomic.write_text(rank_file(run_dir, self.rank), text)

    def finish(
        self, run_dir: Path, status: RankStatus, error: dict[str, Any] | None = None
    ) -> None:
        self.status, self.error, self.finished_at = status, error, time.time()
        self.failed_at = self.finished_at if status == "failed" else None
        self.write(run_dir)

    def summary(self) -> dict[str, Any]:
        """What `run.json` keeps of it: who, where, how it ended, its bytes and timings."""
        load = self.results.get("load") or {}
        mine = [d for d in load.get("device_bytes", []) if d.get("device") == self.label]
        return {
            "rank": self.rank,
            "node": self.node,
            "local_rank": self.local_rank,
            "device": self.label,
            "pid": self.pid,
            "status": self.status,
            "bytes": mine[0] if mine else None,
            "timings": self.timings,
            "error": self.error,
        }


def read_ranks(run_dir: Path) -> list[RankRecord]:
    """This node's rank records, by rank (unreadable files are skipped: a rank died writing)."""
    out = []
    for path in Path(run_dir).glob("rank-*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") == RANK_FORMAT:
                out.append(RankRecord(**data))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(out, key=lambda r: r.rank)


def joined(records: list[RankRecord], local_ranks: int) -> bool:
    """Whether every rank of this node got past creating the process group."""
    return sum(r.status != "starting" for r in records) >= local_ranks


def lost_peer(record: RankRecord) -> bool:
    """Whether a failed rank only reports losing the connection to another rank."""
    error = record.error or {}
    text = " ".join(
        [str(error.get("message", ""))]
        + [str(p.get("message", "")) for p in error.get("problems", [])]
    )
    return bool(_PEER_LOST.search(text))


def root_cause(records: list[RankRecord], torchrun_log: str) -> RankRecord | None:
    """The rank that failed first on this node, or None when no rank of this node failed.

    A rank still `starting`/`running` after torchrun exited died without writing (killed): it is
    the cause, preferring the one torchrun names as root cause. Otherwise the earliest failure
    that is not a lost peer, else the earliest failure.
    """
    silent = [r for r in records if r.status in ("starting", "running")]
    named, _ = torchrun_root(torchrun_log)
    if silent:
        return next((r for r in silent if r.rank == named), silent[0])
    failed = sorted((r for r in records if r.status == "failed"), key=lambda r: r.failed_at or 0)
    first = next((r for r in failed if not lost_peer(r)), None)
    return first or (failed[0] if failed else None)


def torchrun_root(log: str) -> tuple[int | None, str]:
    """The rank torchrun names as the root cause of a failure, and how it exited."""
    block = log.rpartition("Root Cause")[2]
    rank = re.search(r"rank\s*:\s*(\d+)", block)
    exit_line = re.search(r"exitcode\s*:\s*(-?\d+)[^\n]*?(\(SIG\w+\))?\s*$", block, re.MULTILINE)
    how = ""
    if exit_line:
        how = f"exit code {exit_line.group(1)}" + (
            f" {exit_line.group(2)}" if exit_line.group(2) else ""
        )
    return (int(rank.group(1)) if rank else None), how


class RankFailed(GlmDeployError):
    """A rank failed: its own error (exit code and problems), titled with the rank."""

    def __init__(self, record: RankRecord, run_dir: Path, how: str = "") -> None:
        error = record.error or {}
        self.rank = record.rank
        self.exit_code = ExitCode(int(error.get("exit_code", ExitCode.FAILURE)))
        log = rank_log(run_dir, record.rank)
        problems = [Problem(**p) for p in error.get("problems", [])]
        if record.status in ("starting", "running"):
            what = f"died while {record.status} ({how or 'killed?'}), without a word"
            problems.append(Problem(f"rank {record.rank}", what, hint=f"its log: {log}"))
            error = {"title": f"died ({how})" if how else "died"}
        elif not problems:
            message = str(error.get("message") or error.get("title") or "failed")
            hint = f"its log: {log}"
            if lost_peer(record):
                hint = "it lost its connection to another rank, which failed first (on another "
                hint += f"node, see that node's output); its log: {log}"
            problems.append(Problem(f"rank {record.rank}", message, hint=hint))
        title = str(error.get("title") or "failed")
        super().__init__(problems, f"rank {record.rank} of {record.world_size} failed: {title}")


def did_not_join(log: str, join_timeout_s: float, nnodes: int, run_dir: Path) -> HardwareError:
    """The error when this node's ranks never started because the other nodes did not come."""
    joined_nodes = re.search(r"(\d+)/(\d+) clients joined", log)
    seen = f" ({joined_nodes.group(1)} of {joined_nodes.group(2)} joined)" if joined_nodes else ""
    message = (
        f"the {nnodes} nodes did not all join within {join_timeout_s:g} s{seen}: nothing ran"
        if nnodes > 1
        else f"the ranks did not start within {join_timeout_s:g} s"
    )
    hint = (
        "start the same command on every node (glmdeploy printed them), check launch.master_addr "
        f"and the port from every node, or raise launch.join_timeout_s; torchrun's log: "
        f"{Path(run_dir) / 'torchrun.log'}"
    )
    return HardwareError([Problem("launch", message, hint=hint)], "the deployment did not form")


def torchrun_failed(log: str, run_dir: Path) -> GlmDeployError:
    """torchrun failed before any rank of this node could say why: the failing rank's error (the
    file torchrun copies from it), else torchrun's last words."""
    lines = [ln for ln in log.strip().splitlines() if ln.strip()][-3:]
    try:
        copied = json.loads((Path(run_dir) / "torchrun-error.json").read_text(encoding="utf-8"))
        lines = [str(copied["message"]["message"]).splitlines()[0]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    error = GlmDeployError(
        [
            Problem(
                "launch",
                "torchrun failed: " + (" | ".join(lines) or "no output"),
                hint=f"torchrun's log: {Path(run_dir) / 'torchrun.log'}",
            )
        ],
        "torchrun failed",
    )
    return error


def looks_like_join_timeout(log: str) -> bool:
    return bool(
        re.search(
            r"RendezvousTimeoutError|clients joined|waiting for clients|client socket has "
            r"timed out|DistStoreError|RendezvousClosedError|did not join",
            log,
        )
    )
