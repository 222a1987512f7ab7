"""The job commands (plan, load, generate, bench, run): one deployment each, recorded.

A job gets the resolved config of one deployment, does its steps, prints what it did, and leaves a
run record (`glmdeploy.records.record`) in its Hydra run directory, `ok`, `failed` or `interrupted`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from glmdeploy.config.settings import Deployment, EngineName
from glmdeploy.distributed.rules import runs_on_torchrun
from glmdeploy.problems import ExitCode

if TYPE_CHECKING:
    from glmdeploy.config.compose import RunFacts
    from glmdeploy.loading.loader import LoadedModel
    from glmdeploy.planning.deployment_plan import PlannedDeployment
    from glmdeploy.planning.types import Plan
    from glmdeploy.records.record import RecordWriter

_T = TypeVar("_T")


@dataclass
class JobContext:
    """What a job knows besides its config: where to record, how to print."""

    command: str
    config: dict[str, Any]
    deployment: Deployment
    run_dir: Path | None = None
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)
    json: bool = False
    save: str | None = None
    out: str | None = None  # export: a second place for the config file
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    plan: Plan | None = None  # once planned

    def say(self, text: str) -> None:
        """Progress for humans: stdout normally, stderr under --json (stdout is the JSON)."""
        print(text, file=sys.stderr if self.json else sys.stdout, flush=True)


def _step(ctx: JobContext, name: str, fn: Callable[[], _T]) -> _T:
    start = time.perf_counter()
    out = fn()
    ctx.timings[name] = round(time.perf_counter() - start, 4)
    return out


def _plan(ctx: JobContext) -> PlannedDeployment:
    from glmdeploy import api
    from glmdeploy.cli.render import plan_json, print_plan
    from glmdeploy.planning.deployment_plan import DeploymentDoesNotFit, save_plan

    try:
        planned = _step(ctx, "plan", lambda: api.plan(ctx.deployment))
    except DeploymentDoesNotFit as exc:
        ctx.plan = exc.planned.plan
        if not ctx.json:
            print_plan(exc.planned)
        raise
    ctx.plan = planned.plan
    ctx.results["plan"] = {k: v for k, v in plan_json(planned).items() if k != "plan"}
    if ctx.save:
        save_plan(planned.plan, Path(ctx.save))
    if not ctx.json:
        print_plan(planned)
        if ctx.save:
            print(f"saved: {ctx.save} (reuse: placement=plan_file placement.plan_file={ctx.save})")
    return planned


def _load(ctx: JobContext, planned: PlannedDeployment) -> LoadedModel:
    from glmdeploy import api

    folder = ctx.deployment.placement.offload_folder
    offload = Path(folder) if folder else (ctx.run_dir / "offload" if ctx.run_dir else None)
    loaded = _step(ctx, "load", lambda: api.load(planned, offload_folder=offload,
                                                 progress=not ctx.json))  # fmt: skip
    ctx.results["load"] = loaded.to_dict()
    ctx.say(
        f"loaded {loaded.checkpoint} as {type(loaded.model).__name__} in "
        f"{loaded.load_seconds:.2f} s ({loaded.precision.reason})"
    )
    for row in loaded.device_bytes:
        same = "=" if row.predicted_bytes == row.actual_bytes else "≠"
        ctx.say(
            f"  {row.label:<18} planned {row.predicted_bytes / 2**20:10.2f} MiB {same} "
            f"loaded {row.actual_bytes / 2**20:10.2f} MiB"
        )
    ctx.say(
        f"verified: every parameter and buffer is where the plan put it "
        f"({loaded.verify_seconds * 1000:.0f} ms); inputs go to {loaded.input_device}"
    )
    for warning in loaded.warnings:
        ctx.say(f"warning: {warning}")
    return loaded


def _generate(ctx: JobContext, loaded: LoadedModel) -> None:
    from glmdeploy.inference.runner import generate

    result = _step(ctx, "generate", lambda: generate(loaded, ctx.deployment.runtime))
    ctx.results["generate"] = result.to_dict()
    for i, ids in enumerate(result.new_ids):
        shown = repr(result.text[i]) if result.text else " ".join(map(str, ids))
        ctx.say(f"generated {len(ids)} tokens in {result.seconds:.2f} s (sequence {i}): {shown}")


def _bench(ctx: JobContext, loaded: LoadedModel) -> None:
    from glmdeploy.cli.render import print_bench
    from glmdeploy.inference.runner import bench

    result = _step(ctx, "bench", lambda: bench(loaded, ctx.deployment.runtime))
    ctx.results["bench"] = result.to_dict()
    if not ctx.json:
        print_bench(result)


def job_plan(ctx: JobContext) -> None:
    if ctx.deployment.engine.name is EngineName.VLLM:  # the fit under vLLM's memory rules
        _vllm(ctx, write=False)
        return
    _plan(ctx)


def job_export(ctx: JobContext) -> None:
    _vllm(ctx, write=True)


def _vllm(ctx: JobContext, *, write: bool) -> None:
    from glmdeploy.engines.vllm.jobs import run_vllm_step

    _step(ctx, "export" if write else "plan", lambda: run_vllm_step(
        ctx.deployment, run_dir=ctx.run_dir, out=ctx.out, write=write, json_out=ctx.json,
        results=ctx.results, say=ctx.say))  # fmt: skip


def job_load(ctx: JobContext) -> None:
    _load(ctx, _plan(ctx))


def job_generate(ctx: JobContext) -> None:
    _generate(ctx, _load(ctx, _plan(ctx)))


def job_bench(ctx: JobContext) -> None:
    _bench(ctx, _load(ctx, _plan(ctx)))


def job_serve(ctx: JobContext) -> None:
    """plan, load, verify, then serve over HTTP until SIGTERM/Ctrl-C (`glmdeploy.serving`)."""
    from glmdeploy.serving.preflight import preflight

    listener = preflight(ctx.deployment)  # packages, API key, the port: before loading
    with listener.sock:
        loaded = _load(ctx, _plan(ctx))
        from glmdeploy.serving.server import serve_model

        def serve() -> dict[str, Any]:
            return serve_model(loaded, ctx.deployment, listener, say=ctx.say)

        ctx.results["serve"] = _step(ctx, "serve", serve)


def job_run(ctx: JobContext) -> None:
    """The main job: plan, load, verify, generate; say what was done."""
    ctx.say(f"glmdeploy run: {ctx.deployment.summary()}")
    _generate(ctx, _load(ctx, _plan(ctx)))


RANK_COMMANDS = ("load", "generate", "bench", "run")  # what torchrun ranks run (world size > 1)


def _launch(ctx: JobContext) -> None:
    """load/generate/bench/run on torchrun ranks: plan here, then the ranks do the rest."""
    from glmdeploy.distributed.launcher import LaunchRequest, launch

    if ctx.command == "run":
        ctx.say(f"glmdeploy run: {ctx.deployment.summary()}")
    planned = _plan(ctx)
    request = LaunchRequest(ctx.command, ctx.config, ctx.overrides,
                            ctx.run_dir or Path.cwd() / "glmdeploy-ranks", ctx.json)  # fmt: skip
    _step(ctx, "ranks", lambda: launch(planned, request, ctx.results, ctx.say))


JOBS: dict[str, Callable[[JobContext], None]] = {
    "plan": job_plan, "load": job_load, "generate": job_generate, "bench": job_bench,
    "run": job_run, "export": job_export, "serve": job_serve,
}  # fmt: skip


@contextmanager
def hydra_job_settings(run: RunFacts, run_dir: Path) -> Iterator[None]:
    """What Hydra's runner does around a job, undone afterwards: `hydra.job.env_set` and
    `hydra.job.chdir` (into the run directory)."""
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    os.environ.update(run.env_set)
    if run.chdir:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.chdir(run_dir)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_job(ctx: JobContext) -> int:
    """Run one job, recording it when it has a run directory. Returns the exit code.

    The record is `ok`, or `failed`/`interrupted` with the error and whatever was done before
    (plan, results, timings); the exception is re-raised for the CLI to report.
    """
    writer = None
    if ctx.run_dir is not None:
        from glmdeploy.records.record import RecordWriter, new_record

        record = new_record(ctx.command, ctx.overrides, ctx.choices, ctx.config, ctx.deployment,
                            progress=not ctx.json)  # fmt: skip
        writer = RecordWriter(ctx.run_dir).start(record)
    try:
        if ctx.command in RANK_COMMANDS and runs_on_torchrun(ctx.deployment):
            _launch(ctx)  # tensor/pipeline parallel ranks under torchrun
        else:
            JOBS[ctx.command](ctx)
    except BaseException as exc:
        if writer is not None:
            _record_failure(writer, exc, ctx)
        raise
    if writer is not None:
        writer.finish("ok", results=ctx.results, plan=ctx.plan, timings=ctx.timings)
        ctx.say(f"record: {writer.run_dir / 'run.json'}")
    if ctx.json:
        import json

        payload = {"ok": True, "command": ctx.command, "run_dir": str(ctx.run_dir or ""),
                   "results": ctx.results, "timings": ctx.timings}  # fmt: skip
        if ctx.plan is not None:
            payload["plan"] = ctx.plan.to_dict()
        print(json.dumps(payload, indent=2, default=str))
    return ExitCode.OK


def _record_failure(writer: RecordWriter, exc: BaseException, ctx: JobContext) -> None:
    """Finish the record `failed`/`interrupted`; if it cannot be written, say so after `exc`."""
    from glmdeploy.problems import OutputError, render_problems

    writer.record.results.update(ctx.results)
    writer.record.timings.update(ctx.timings)
    try:
        if ctx.plan is not None:
            writer.save_plan(ctx.plan)
        writer.fail(exc)
    except OutputError as lost:
        print(render_problems(lost.title, lost.problems), file=sys.stderr)


def replay_run(run_dir: Path, *, json_out: bool = False) -> int:
    """Re-run a recorded job with its resolved config and saved plan; report what differs.

    Differences in the environment or checkpoint are printed before running; afterwards the new
    plan and generated tokens are compared with the recorded ones. The replay is recorded in
    `<run dir>/replays/<time>/` (`<time>-1`, … when taken).
    """
    from glmdeploy.config.validate import validate_dict
    from glmdeploy.hardware.environment import environment_facts
    from glmdeploy.outputs import claim_new_directory
    from glmdeploy.records.record import WEIGHTLESS_COMMANDS, checkpoint_facts, read_record
    from glmdeploy.records.replay import differences

    record = read_record(run_dir)
    if record.command not in JOBS:
        from glmdeploy.problems import ConfigError, Problem, one_of

        where = f"{run_dir / 'run.json'}:command"
        found = f"{record.command!r} is not a job glmdeploy can replay"
        raise ConfigError([Problem(where, found, one_of(JOBS))], "not a glmdeploy run directory")
    config = dict(record.config)
    plan_json = run_dir / "plan.json"
    ranks = bool((record.plan or {}).get("parallel"))  # per-rank plans are planned again
    if (
        record.status == "ok"
        and plan_json.is_file()
        and not ranks
        and isinstance(config.get("placement"), dict)
    ):  # exactly that plan, or refused
        placement = {k: v for k, v in config["placement"].items() if k != "map"}
        config["placement"] = {**placement, "strategy": "plan_file", "plan_file": str(plan_json)}
    deployment = validate_dict(config)
    out = sys.stderr if json_out else sys.stdout
    weights = record.command not in WEIGHTLESS_COMMANDS
    now = checkpoint_facts(deployment.model, weights=weights, progress=not json_out)
    diffs = differences(record, environment_facts(), now)
    print(f"replaying {record.command} from {run_dir} (recorded {record.status})", file=out)
    for line in diffs or ["environment and checkpoint match the record"]:
        print(f"  {'differs: ' if diffs else ''}{line}", file=out)
    stamp = time.strftime("%Y%m%d-%H%M%S")  # a second replay in the same second: STAMP-1
    replay_dir = claim_new_directory(run_dir / "replays" / stamp, "the replay's run directory")
    ctx = JobContext(command=record.command, config=config, deployment=deployment,
                     run_dir=replay_dir, overrides=list(record.overrides),
                     choices=dict(record.choices), json=json_out)  # fmt: skip
    run_job(ctx)
    mismatches = _compare(record.plan, record.results, ctx)
    for line in mismatches:
        print(f"NOT reproduced: {line}", file=out)
    if not mismatches:
        print(
            "reproduced: same plan" + (", same tokens" if "generate" in ctx.results else ""),
            file=out,
        )
    return ExitCode.REPLAY_DIFFERS if mismatches else ExitCode.OK


def _compare(plan: Any, results: dict[str, Any], ctx: JobContext) -> list[str]:
    out = []
    if (
        plan is not None
        and ctx.plan is not None
        and (plan.get("device_map") != ctx.plan.to_dict()["device_map"])
    ):
        out.append("the device map differs from the recorded plan")
    old = results.get("generate", {}).get("new_ids")
    new = ctx.results.get("generate", {}).get("new_ids")
    if old is not None and new is not None and [list(x) for x in old] != [list(x) for x in new]:
        out.append(f"generated tokens differ: {old} → {new}")
    return out
