"""Run a planned parallel deployment on this node under torchrun, and collect what the ranks did.

`launch` prepares the checkpoint once, writes the launch file (`glmdeploy.distributed.spec`),
prints the command each other node must run, starts `python -m torch.distributed.run` for this
node (`glmdeploy.distributed.launch_command`) in its own session, and supervises it:

- torchrun's own rendezvous timeout ends a deployment whose nodes never all join; an outer clock
  (twice `join_timeout_s` plus start-up time) catches any other hang before the ranks joined;
- Ctrl-C or SIGTERM is forwarded to torchrun as SIGTERM (never SIGKILL: it would orphan its
  ranks, which run in sessions of their own); only if torchrun outlives its own shutdown grace
  are its ranks and then torchrun killed;
- afterwards the ranks' records (`rank-N.json`) become the job's results, or the error of the
  rank that failed first, so the run record says which rank failed and why.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from glmdeploy.config.settings import Deployment, Rendezvous
from glmdeploy.distributed import launch_command as lc
from glmdeploy.distributed import rank_record as rr
from glmdeploy.distributed.spec import LaunchSpec, NodeGpu
from glmdeploy.interrupts import sigterm_as_interrupt
from glmdeploy.problems import ConfigError, Problem

if TYPE_CHECKING:
    from glmdeploy.planning.deployment_plan import PlannedDeployment

STARTUP_GRACE_S = 60.0  # python + torch + transformers imports on a loaded machine
POLL_S = 0.2


@dataclass(frozen=True)
class LaunchRequest:
    """The job as the CLI knows it: command, resolved config, overrides, run dir, output mode."""

    command: str
    config: Mapping[str, Any]
    overrides: Sequence[str]
    run_dir: Path
    json_out: bool = False


def launch(
    planned: PlannedDeployment,
    request: LaunchRequest,
    results: MutableMapping[str, Any],
    say: Callable[[str], None],
) -> None:
    """Run `request.command` on this node's ranks; fill `results` as far as they got.

    Raises:
        RankFailed: a rank failed (its exit code, problems and rank).
        HardwareError: the nodes did not all join within `launch.join_timeout_s`.
        ConfigError: the rendezvous port is taken.
        KeyboardInterrupt: Ctrl-C or SIGTERM (torchrun and its ranks are stopped first).
    """
    deployment = planned.deployment
    launch_cfg, run_dir = deployment.launch, request.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_port(deployment)
    spec_path = _write_spec(planned, request)
    gpus = [d.physical_id for d in planned.assignment.devices][: lc.local_ranks(deployment)]
    cmd = lc.torchrun_command(deployment, request.config, spec_path, run_dir)
    env = lc.rank_environment(
        deployment, gpus, _environ(), error_file=run_dir / "torchrun-error.json"
    )
    say(f"starting {lc.local_ranks(deployment)} rank(s) on this node: {shlex.join(cmd)}")
    for node, line in lc.other_node_commands(request.command, request.overrides, launch_cfg):
        where = "on every other node" if node is None else f"on node {node}"
        say(f"run {where}: {line}")
    sys.stdout.flush()
    with open(run_dir / "torchrun.log", "w", encoding="utf-8") as log:
        out = log if request.json_out else None
        deadline = 2 * launch_cfg.join_timeout_s + STARTUP_GRACE_S
        started, code, joined, stopped = time.monotonic(), None, False, False
        try:
            code, joined = supervise(
                cmd, env, run_dir, lc.local_ranks(deployment), deadline, stdout=out, stderr=log
            )
        except KeyboardInterrupt:
            stopped = True
            raise
        finally:
            _collect(run_dir, results, stopped=stopped)
            seconds = time.monotonic() - started
            results["torchrun"] = {
                "exit_code": code,
                "seconds": seconds,
                "command": cmd,
                "log": str(run_dir / "torchrun.log"),
            }
    text = (run_dir / "torchrun.log").read_text(encoding="utf-8", errors="replace")
    if code == 0:
        return
    records = rr.read_ranks(run_dir)
    cause = rr.root_cause(records, text)
    if cause is not None:
        named, how = rr.torchrun_root(text)
        raise rr.RankFailed(cause, run_dir, how if named == cause.rank else "")
    if rr.looks_like_join_timeout(text) or (not joined and "Root Cause" not in text):
        raise rr.did_not_join(text, launch_cfg.join_timeout_s, launch_cfg.nnodes, run_dir)
    raise rr.torchrun_failed(text, run_dir)


def supervise(
    cmd: Sequence[str],
    env: Mapping[str, str],
    run_dir: Path,
    local_ranks: int,
    join_deadline_s: float,
    *,
    stdout: IO[str] | None,
    stderr: IO[str],
) -> tuple[int, bool]:
    """Run torchrun to the end: (its exit code, whether this node's ranks all joined).

    Its own session keeps the terminal's Ctrl-C away from it: this process forwards it, as
    SIGTERM, so that torchrun stops its ranks.
    """
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_stop_with_parent,
    )
    started, joined = time.monotonic(), False
    try:
        with sigterm_as_interrupt():
            while True:
                try:
                    return proc.wait(timeout=POLL_S), joined
                except subprocess.TimeoutExpired:
                    pass
                joined = joined or rr.joined(rr.read_ranks(run_dir), local_ranks)
                if not joined and time.monotonic() - started > join_deadline_s:
                    stop(proc)
                    return proc.wait(), False
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM torchrun and wait for it to stop its ranks; kill them and it only if it hangs."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=lc.SHUTDOWN_TIMEOUT_S + 10)
        return
    except subprocess.TimeoutExpired:
        pass
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):  # ranks first
            with contextlib.suppress(psutil.Error):
                child.kill()
    proc.kill()
    proc.wait()


def _collect(run_dir: Path, results: MutableMapping[str, Any], *, stopped: bool = False) -> None:
    """Rank 0's results (when it ran on this node) and every local rank's summary.

    When the user stopped the deployment (`stopped`), a rank that had not finished is
    `interrupted`, even if it saw its peers go first (a collective error) before its own SIGTERM.
    """
    records = rr.read_ranks(run_dir)
    first = next((r for r in records if r.rank == 0), records[0] if records else None)
    if first is not None:
        results.update({k: v for k, v in first.results.items() if k not in results})
    summaries = [r.summary() for r in records]
    for summary in summaries:
        if stopped and summary["status"] != "ok":
            summary["status"] = "interrupted"
    results["ranks"] = summaries


def _write_spec(planned: PlannedDeployment, request: LaunchRequest) -> Path:
    from glmdeploy.distributed.rank_plan import rank_tensors, table_for
    from glmdeploy.loading.embedded import cache_root
    from glmdeploy.loading.loader import resolve_checkpoint

    deployment, anatomy = planned.deployment, planned.anatomy
    location, warnings = resolve_checkpoint(
        planned.requested or deployment, cache_root(), progress=not request.json_out
    )
    p, precision = deployment.parallel, deployment.precision
    table = table_for(deployment, anatomy)
    expected = {
        rank: rank_tensors(
            table, anatomy, precision.dtype, precision.quantization, p.tp_size, p.pp_size, rank
        )
        for rank in range(p.world_size)
    }
    local = lc.local_ranks(deployment)
    gpus = tuple(
        NodeGpu(d.physical_id, d.name, d.compute_capability)
        for d in planned.assignment.devices[:local]
    )
    spec = LaunchSpec(
        request.command,
        dict(request.config),
        request.json_out,
        location,
        warnings,
        planned.plan.to_dict(),
        expected,
        gpus,
        deployment.launch.join_timeout_s,
    )
    return spec.write(request.run_dir)


def _check_port(deployment: Deployment) -> None:
    """On the node that hosts the rendezvous, its port must be free (else: a clear error now)."""
    launch_cfg = deployment.launch
    static = launch_cfg.rendezvous is Rendezvous.STATIC
    hosts = launch_cfg.nnodes == 1 or (static and launch_cfg.node_rank == 0)
    if not hosts:
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", launch_cfg.master_port))
            return
        except OSError as exc:
            why = exc.strerror or str(exc)
    with socket.socket() as free:
        free.bind(("", 0))
        suggestion = free.getsockname()[1]
    raise ConfigError(
        [
            Problem(
                "launch.master_port",
                f"port {launch_cfg.master_port} cannot host the rendezvous here: {why}",
                "a free TCP port on node 0",
                f"launch.master_port={suggestion} (free now)",
            )
        ]
    )


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def _stop_with_parent() -> None:
    """In torchrun's process: get SIGTERM if glmdeploy dies (Linux), so no rank outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
