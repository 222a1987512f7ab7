"""The entry point of every rank: `python -m glmdeploy.distributed.worker LAUNCH_JSON`, by torchrun.

A rank creates the process group itself (gloo on the CPU, nccl on its GPU) with a timeout of
`launch.join_timeout_s`, so a rank that never arrives fails the others in that time rather than in
transformers' two hours; loads its share (`rank_load`); checks it against the plan together with
the other ranks; seeds torch like every other rank; and runs the job's steps in lockstep with them.
Rank 0 prints; every rank writes `rank-N.json` and logs to `rank-N.log` in the run directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from glmdeploy.cli.jobs import JobContext, _generate
from glmdeploy.config.validate import validate_dict
from glmdeploy.distributed import rank_record
from glmdeploy.distributed.rank_load import load_rank, rank_label
from glmdeploy.distributed.rank_record import RankRecord
from glmdeploy.distributed.spec import LaunchSpec
from glmdeploy.interrupts import raise_interrupt
from glmdeploy.loading.loader import LoadedModel
from glmdeploy.planning.types import Plan
from glmdeploy.problems import GlmDeployError, HardwareError, LoadError, Problem
from glmdeploy.records.record import error_dict

WORK_TIMEOUT = timedelta(minutes=30)  # collectives after joining (torch's default for gloo)


@dataclass
class RankContext(JobContext):
    """A job context whose output only rank 0 shows."""

    speaks: bool = False

    def say(self, text: str) -> None:
        if self.speaks:
            super().say(text)


@record
def main(argv: list[str]) -> int:
    spec = LaunchSpec.read(Path(argv[0]))
    run_dir = Path(argv[0]).parent
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    _log_to_file(run_dir, rank)
    plan = Plan.from_dict(spec.plan)
    device = torch.device("cuda", local_rank) if spec.gpus else torch.device("cpu")
    label = rank_label(rank, plan.rows[rank].device, local_rank if spec.gpus else "cpu")
    mine = RankRecord(rank, world, int(os.environ.get("GROUP_RANK", 0)), local_rank, label)
    mine.write(run_dir)
    signal.signal(signal.SIGTERM, raise_interrupt)  # torchrun stops ranks with SIGTERM
    try:
        _join(spec, device)
        mine.status = "running"
        mine.write(run_dir)
        torch.manual_seed(spec.seed)
        _run(spec, plan, mine, device, run_dir)
    except KeyboardInterrupt as exc:
        mine.finish(run_dir, "interrupted", error_dict(exc))
        return 130
    except GlmDeployError as exc:
        mine.finish(run_dir, "failed", error_dict(exc))
        print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
        return int(exc.exit_code)
    except BaseException as exc:
        mine.finish(run_dir, "failed", error_dict(exc))
        raise  # @record writes torchrun's error file
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _join(spec: LaunchSpec, device: torch.device) -> None:
    """Create the process group, waiting at most `join_timeout_s` for the other ranks."""
    timeout = timedelta(seconds=spec.join_timeout_s)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    except RuntimeError as exc:  # DistStoreError and friends: a peer never arrived
        message = f"the other ranks did not join the process group within {spec.join_timeout_s:g} s"
        hint = "a rank failed before joining: see the other nodes' glmdeploy output and logs"
        problem = Problem("launch.join_timeout_s", f"{message} ({exc})".splitlines()[0], hint=hint)
        raise HardwareError([problem], "the deployment did not form") from exc
    # The join is bounded; a slow load on another rank must not fail the work after it.
    with contextlib.suppress(AttributeError, RuntimeError, ValueError):
        dist.distributed_c10d._set_pg_timeout(max(WORK_TIMEOUT, timeout))


def _run(
    spec: LaunchSpec, plan: Plan, mine: RankRecord, device: torch.device, run_dir: Path
) -> None:
    deployment = validate_dict(spec.config)
    speaks = mine.rank == 0
    ctx = RankContext(
        command=spec.command,
        config=dict(spec.config),
        deployment=deployment,
        json=spec.json_out or not speaks,
        speaks=speaks,
    )
    loaded, problems = load_rank(spec, deployment, plan, mine.rank, device)
    _verify_together(ctx, loaded, problems, mine)
    mine.write(run_dir)
    if spec.command in ("generate", "run"):
        _generate(ctx, loaded)
        mine.results["generate"] = ctx.results["generate"]
        _save_logits(loaded, ctx, run_dir, speaks)
    elif spec.command == "bench":
        _bench(ctx, loaded, mine)
    mine.timings.update(ctx.timings)
    mine.finish(run_dir, "ok")


def _verify_together(
    ctx: RankContext, loaded: LoadedModel, problems: list[Any], mine: RankRecord
) -> None:
    """Every rank learns every rank's check, so all fail (or go on) together, never hang."""
    own = loaded.device_bytes[0]
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (own.to_dict(), problems))
    load = loaded.to_dict()
    load["device_bytes"] = [r[0] for r in reports]
    load["parallel"] = asdict(ctx.deployment.parallel)
    mine.results["load"] = ctx.results["load"] = load
    mine.timings["load"] = ctx.timings["load"] = loaded.load_seconds
    failed = [p for _, rank_problems in reports for p in rank_problems]
    if failed:
        raise LoadError(failed, "the ranks did not load as planned")
    p = ctx.deployment.parallel
    ctx.say(
        f"loaded {loaded.checkpoint} as {type(loaded.model).__name__} on {p.world_size} ranks "
        f"(tp {p.tp_size} × pp {p.pp_size}) in {loaded.load_seconds:.2f} s "
        f"({loaded.precision.reason})"
    )
    for row, _ in reports:
        same = "=" if row["predicted_bytes"] == row["actual_bytes"] else "≠"
        ctx.say(
            f"  {row['device']:<22} planned {row['predicted_bytes'] / 2**20:10.2f} MiB {same} "
            f"loaded {row['actual_bytes'] / 2**20:10.2f} MiB"
        )
    ctx.say(
        "verified: every rank holds exactly the shards the plan gave it "
        f"({loaded.verify_seconds * 1000:.0f} ms)"
    )
    for warning in loaded.warnings:
        ctx.say(f"warning: {warning}")


def _bench(ctx: RankContext, loaded: LoadedModel, mine: RankRecord) -> None:
    """Time generation on every rank together; rank 0 shows every rank's memory and bytes."""
    import dataclasses

    from glmdeploy.cli.render import print_bench
    from glmdeploy.inference.runner import bench

    started = time.perf_counter()
    result = bench(loaded, ctx.deployment.runtime)
    ctx.timings["bench"] = round(time.perf_counter() - started, 4)
    own = loaded.device_bytes[0]  # labelled "rank N · <device>", as are its GPU's memory rows
    memory = [
        m if m.device != "cpu" else dataclasses.replace(m, device=f"rank {mine.rank} · cpu")
        for m in result.memory
    ]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (own, memory))
    combined = dataclasses.replace(
        result,
        memory=tuple(m for _, mems in gathered for m in mems),
        device_bytes=tuple(b for b, _ in gathered),
    )
    mine.results["bench"] = ctx.results["bench"] = combined.to_dict()
    if ctx.speaks and not ctx.json:
        print_bench(combined)


def _save_logits(loaded: LoadedModel, ctx: RankContext, run_dir: Path, speaks: bool) -> None:
    """The prompt's last-position logits (fp32), kept by rank 0 to compare layouts numerically."""
    from safetensors.torch import save_file

    from glmdeploy import atomic
    from glmdeploy.inference.runner import prompt_ids

    ids = prompt_ids(loaded, ctx.deployment.runtime)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids.to(loaded.input_device)).logits[:, -1]
    if speaks:
        tensors = {"input_ids": ids.contiguous(), "last_logits": logits.float().cpu().contiguous()}
        with atomic.replacing(run_dir / "logits.safetensors") as tmp:
            save_file(tensors, str(tmp))


def _log_to_file(run_dir: Path, rank: int) -> None:
    """stderr (every rank) and stdout (all but rank 0) go to `rank-N.log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(rank_record.rank_log(run_dir, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 2)
    if rank != 0:
        os.dup2(log, 1)
    os.close(log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
