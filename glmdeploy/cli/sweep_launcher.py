"""Run a sweep's jobs: plan jobs in this process (or a small fork pool), GPU jobs one process each.

Every job is composed and validated before any runs (`glmdeploy.config.deployments`), then the
sweep directory is claimed (`glmdeploy.records.sweep_dir`: locked, never over old records). Jobs
record in Hydra's sweep layout, `<sweep dir>/<job number>/` with `run.json`, `plan.json`,
`plan.png`, `resolved.yaml` and `output.log` (the job's stdout, then its stderr); `sweep.json`
lists the jobs.

- `plan` jobs touch no GPU and no CUDA, so they need no fresh process: they run in this process,
  sharing its imports and the model anatomies, or, with several jobs and cores, in a pool of up to
  `MAX_WORKERS` processes forked from it (Hydra's composition alone costs ~50 ms of CPU a job).
  Anatomies are loaded (or built) here first, so the workers find them without torch.
- `load`/`generate`/`bench`/`run` jobs each get a fresh `glmdeploy` process, one at a time: CUDA
  reads `CUDA_VISIBLE_DEVICES` once per process, so per-job GPU selection needs one.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmdeploy import atomic
from glmdeploy.problems import ExitCode, GlmDeployError

if TYPE_CHECKING:
    from glmdeploy.cli.args import Args
    from glmdeploy.config.deployments import Job
    from glmdeploy.config.locations import ConfigSource

IN_PROCESS_COMMANDS = {"plan", "export"}  # no GPU, no CUDA: no fresh process needed
MAX_WORKERS = 4
CHILD_GRACE_S = 60  # after Ctrl-C, how long a job's process may take to record `interrupted`
_Outcome = tuple[int, str, str]  # exit code, stdout, stderr


def run_sweep(args: Args, source: ConfigSource) -> int:
    """Validate every job of `args`' sweep, then (unless --dry-run) claim the directory and run."""
    from glmdeploy.config.deployments import load_deployments
    from glmdeploy.config.sweep import expand_sweep
    from glmdeploy.engines.vllm.jobs import refuse_transformers_commands
    from glmdeploy.outputs import check_directory
    from glmdeploy.records.sweep_dir import claim_sweep_dir

    command = " ".join([args.command, *args.positional])  # `export vllm`
    in_process = args.command in IN_PROCESS_COMMANDS
    workers = _workers(len(expand_sweep(args.overrides))) if in_process and not args.dry_run else 1
    with _pool(workers) as pool:
        mapper = pool.imap if pool is not None else map
        jobs = load_deployments(args.overrides, source, sweep=True, mapper=mapper)
        refuse_transformers_commands(args.command, (j.deployment for j in jobs))
        if args.dry_run:
            for i, job in enumerate(jobs):
                print(f"job {i}: {' '.join(job.overrides) or '(no overrides)'}")
            return ExitCode.OK
        named = any(o.lstrip("+").startswith("hydra.sweep.dir=") for o in args.overrides)
        root = Path(jobs[0].run.sweep_dir or "multirun")
        check_directory(root, "the sweep directory (hydra.sweep.dir)",
                        hint="set hydra.sweep.dir=DIR to a directory you can write")  # fmt: skip
        lock = claim_sweep_dir(root, named=named, overwrite=args.overwrite)
        try:
            where = "one process each"
            if in_process:
                _load_anatomies(jobs)
                where = f"{workers} processes" if pool is not None else "in this process"
            _announce(command, jobs, lock.root, where)
            runs = lock.root.absolute()  # job run directories, as Hydra's runtime.output_dir
            outcomes: Iterable[_Outcome]
            if not in_process:
                outcomes = (_child(command, j, runs / str(i), source, args.json)
                            for i, j in enumerate(jobs))  # fmt: skip
            else:
                items = [(args.command, j, runs / str(i), args.json, args.debug)
                         for i, j in enumerate(jobs)]  # fmt: skip
                outcomes = pool.imap(_in_process, items) if pool else map(_in_process, items)
            return _collect(jobs, lock.root, outcomes, pool)
        finally:
            lock.release()


def _announce(command: str, jobs: Sequence[Job], root: Path, where: str) -> None:
    """Write `sweep.json` (every job, before any runs) and say what runs where."""
    plain = [_plain(job) for job in jobs]
    atomic.write_text(root / "sweep.json", json.dumps(
        {"command": command, "jobs": [{"num": i, "overrides": j} for i, j in enumerate(plain)]},
        indent=2) + "\n")  # fmt: skip
    print(f"sweep: {len(jobs)} jobs of `glmdeploy {command}` in {root}, {where}", file=sys.stderr)


def _collect(jobs: Sequence[Job], root: Path, outcomes: Iterable[_Outcome], pool: Any) -> int:
    """Write each job's `output.log` and say how it ended, in job order; the worst exit code.

    Ctrl-C stops the sweep: a job in a child process (same process group) marks its record
    `interrupted`; the pool's workers are stopped and a record they left `running` is marked so.
    """
    codes: list[int] = []
    try:
        for num, (code, out, err) in enumerate(outcomes):
            (root / str(num)).mkdir(parents=True, exist_ok=True)
            atomic.write_text(root / str(num) / "output.log", out + err)
            status = "ok" if code == 0 else f"failed (exit {code})"
            tail = err.strip().splitlines()[:1] if code else []
            label = " ".join(_plain(jobs[num])) or "(no overrides)"
            print(f"job {num}: {label}: {status}" + (f": {tail[0]}" if tail else ""),
                  file=sys.stderr)  # fmt: skip
            codes.append(code)
    except KeyboardInterrupt:
        if pool is not None:
            pool.terminate()
        _mark_interrupted(root, len(jobs))
        print(f"sweep interrupted: {codes.count(0)} of {len(jobs)} job(s) finished ok; "
              f"`glmdeploy report {root}` tabulates them", file=sys.stderr)  # fmt: skip
        return ExitCode.INTERRUPTED
    print(
        f"sweep done: {codes.count(0)} of {len(codes)} ok; "
        f"`glmdeploy report {root}` tabulates them",
        file=sys.stderr,
    )
    return max(codes, default=0)


def _plain(job: Job) -> list[str]:
    return [o for o in job.overrides if not o.startswith("hydra.sweep.")]


def _workers(n_jobs: int) -> int:
    """Processes for `n_jobs` plan jobs: one per core, at most MAX_WORKERS, >= 2 jobs each."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS, n_jobs // 2))


@contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A pool of `workers` forked processes, or None for one (or where fork is missing)."""
    import multiprocessing

    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    _preload()
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_ignore_sigint)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def _preload() -> None:
    """Import here, once, what every worker would import for itself: forked, they share it."""
    import importlib

    from hydra.core.plugins import Plugins

    for module in _WORKER_MODULES:
        importlib.import_module(module)
    Plugins.instance()  # Hydra's plugin discovery, done at the first composition


_WORKER_MODULES = (
    "jsonschema", "rich.console", "rich.table", "PIL.Image", "PIL.ImageDraw", "PIL.ImageFont",
    "PIL.PngImagePlugin", "glmdeploy.cli.jobs", "glmdeploy.cli.render", "glmdeploy.config.validate",
    "glmdeploy.planning.deployment_plan", "glmdeploy.planning.strategies",
    "glmdeploy.planning.fit_advice", "glmdeploy.records.pictures", "glmdeploy.records.record",
)  # fmt: skip


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the sweep, which stops them and marks their records."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load_anatomies(jobs: Sequence[Job]) -> None:
    """Load (or build and cache) each model's anatomy once, here, before the jobs need it."""
    from glmdeploy.model.anatomy_cache import anatomy_for

    for model in {job.deployment.model for job in jobs}:
        with suppress(GlmDeployError):  # the job reports it, in its record
            anatomy_for(model)


def _in_process(item: tuple[str, Job, Path, bool, bool]) -> _Outcome:
    """Run one job here, its output captured as a child's would be."""
    from glmdeploy.cli.jobs import JobContext, hydra_job_settings, run_job
    from glmdeploy.cli.output import guarded

    command, job, run_dir, json_out, debug = item
    ctx = JobContext(
        command=command, config=job.config, deployment=job.deployment, run_dir=run_dir,
        overrides=list(job.run.task_overrides), choices=dict(job.choices), json=json_out,
    )  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), hydra_job_settings(job.run, run_dir):
        code = guarded(lambda: run_job(ctx), as_json=json_out, debug=debug)
    return code, out.getvalue(), err.getvalue()


def _child(command: str, job: Job, run_dir: Path, source: ConfigSource, json_out: bool) -> _Outcome:
    """Run one job in a fresh `glmdeploy` process."""
    # The child composes from the same directories: the user's, by environment variable.
    argv = [sys.executable, "-m", "glmdeploy", *command.split(), *(["--json"] if json_out else []),
            "--config-name", source.config_name, *_plain(job),
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, **source.env()}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:  # fmt: skip
        try:
            out, err = proc.communicate()
        except KeyboardInterrupt:  # the child got Ctrl-C too: let it record how it ended
            try:
                proc.communicate(timeout=CHILD_GRACE_S)
            finally:
                proc.kill()
            raise
    return proc.returncode, out, err


def _mark_interrupted(root: Path, n_jobs: int) -> None:
    """After Ctrl-C: a record still `running` (its process died first) becomes `interrupted`."""
    from glmdeploy.records.record import read_record

    for num in range(n_jobs):
        run_json = root / str(num) / "run.json"
        if not run_json.is_file():
            continue
        record = read_record(run_json.parent)
        if record.status == "running":
            record.status = "interrupted"
            record.error = {"title": "interrupted", "exit_code": int(ExitCode.INTERRUPTED)}
            atomic.write_text(run_json, json.dumps(record.to_dict(), indent=2, default=str) + "\n")
