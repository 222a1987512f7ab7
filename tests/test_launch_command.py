"""torchrun's command line and environment for a node, the other nodes' commands, and how the
launcher reads the ranks' records: pure functions, no process started."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from glmdeploy.config.settings import Launch, Parallel, Rendezvous
from glmdeploy.distributed import launch_command as lc
from glmdeploy.distributed.rank_record import RankFailed, RankRecord, root_cause, torchrun_root

from builders import make_deployment

RUN = Path("/runs/x")


def _deployment(tp: int = 2, pp: int = 1, **launch: object) -> object:
    base = make_deployment("auto")
    return dataclasses.replace(base, parallel=Parallel(tp, pp), launch=Launch(**launch))  # type: ignore[arg-type]


def test_static_rendezvous_flags() -> None:
    dep = _deployment(
        2, 1, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400, join_timeout_s=100
    )
    cmd = lc.torchrun_command(dep, {}, RUN / "launch.json", RUN)  # type: ignore[arg-type]
    text = " ".join(cmd)
    assert "-m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank 1" in text
    assert "--master-addr 10.0.0.1 --master-port 29400" in text
    assert "--rdzv-conf timeout=40" in text  # a non-master node gets 40 % (it tries twice)
    assert f"--log-dir {RUN / 'torchrun'}" in text and "--max-restarts 0" in text
    assert cmd[-3:] == ["-m", "glmdeploy.distributed.worker", str(RUN / "launch.json")]


def test_c10d_rendezvous_flags_and_one_id_for_every_node() -> None:
    kwargs = dict(nnodes=2, rendezvous=Rendezvous.C10D, master_addr="h0", join_timeout_s=30)
    dep = _deployment(1, 2, **kwargs)
    config = {"parallel": {"pp_size": 2}, "launch": {"node_rank": 0, "nnodes": 2}}
    text = " ".join(lc.torchrun_command(dep, config, RUN / "l.json", RUN))  # type: ignore[arg-type]
    assert "--rdzv-backend c10d --rdzv-endpoint h0:29500 --rdzv-id glmdeploy-" in text
    assert "--rdzv-conf join_timeout=30" in text and "--node-rank" not in text
    other = {**config, "launch": {"node_rank": 1, "nnodes": 2}}
    assert lc.rendezvous_id(config) == lc.rendezvous_id(other)
    assert lc.rendezvous_id(config) != lc.rendezvous_id({**config, "parallel": {"tp_size": 2}})


def test_rank_environment() -> None:
    dep = _deployment(
        2, 1, env={"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "3"}, socket_ifname="eth1"
    )
    env = lc.rank_environment(dep, [2, 5], {"PATH": "/bin"}, cores=16, error_file=RUN / "e.json")  # type: ignore[arg-type]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,5" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert env["OMP_NUM_THREADS"] == "3"  # launch.env has the last word
    assert env["TORCHELASTIC_ERROR_FILE"] == str(RUN / "e.json") and env["PATH"] == "/bin"
    cpu = lc.rank_environment(_deployment(2, 1), [], {}, cores=16)  # type: ignore[arg-type]
    assert cpu["OMP_NUM_THREADS"] == "8"  # the cores divided among the node's ranks
    assert cpu["CUDA_VISIBLE_DEVICES"] == ""  # CPU ranks: transformers must not pick CUDA


def test_the_other_nodes_commands() -> None:
    overrides = [
        "parallel=tp2",
        "launch=multinode",
        "launch.nnodes=3",
        "launch.node_rank=0",
        "launch.master_addr=10.0.0.1",
        "runtime.prompt='a b'",
    ]
    static = Launch(nnodes=3, node_rank=0, master_addr="10.0.0.1")
    lines = lc.other_node_commands("generate", overrides, static)
    assert [n for n, _ in lines] == [1, 2]
    quoted = shlex.quote("runtime.prompt='a b'")  # pasted into a shell, it is one argument
    assert lines[0][1] == (
        "glmdeploy generate parallel=tp2 launch=multinode launch.nnodes=3 "
        f"launch.master_addr=10.0.0.1 {quoted} launch.node_rank=1"
    )
    c10d = dataclasses.replace(static, rendezvous=Rendezvous.C10D)
    [(node, line)] = lc.other_node_commands("bench", overrides, c10d)
    assert node is None and "launch.node_rank=0" in line  # c10d assigns node ranks itself


def _record(rank: int, status: str, at: float = 0.0, message: str = "") -> RankRecord:
    error = {"title": "internal error", "exit_code": 1, "message": message} if message else None
    record = RankRecord(
        rank,
        2,
        0,
        rank,
        f"rank {rank} · cpu",
        pid=rank,
        status=status,  # type: ignore[arg-type]
        error=error,
        failed_at=at or None,
    )
    return record


LOG = """
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_13:00:38
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 13347)  (SIGKILL)
"""


def test_the_root_cause_is_the_first_real_failure() -> None:
    peer = "RuntimeError: Read error [127.0.0.1]:4332: Connection reset by peer"
    assert torchrun_root(LOG) == (1, "exit code -9 (SIGKILL)")
    killed = [_record(0, "failed", 2.0, peer), _record(1, "running")]
    cause = root_cause(killed, LOG)
    assert cause is not None and cause.rank == 1
    error = RankFailed(cause, RUN, torchrun_root(LOG)[1])
    assert error.title == "rank 1 of 2 failed: died (exit code -9 (SIGKILL))"
    assert "rank 1: died while running" in str(error) and "rank-1.log" in str(error)
    failed = [_record(0, "failed", 1.0, peer), _record(1, "failed", 2.0, "ValueError: bad")]
    assert root_cause(failed, "").rank == 1  # type: ignore[union-attr]
    assert root_cause([_record(0, "ok"), _record(1, "ok")], "") is None
