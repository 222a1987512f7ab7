"""Run the jobs of a sweep, each in a fresh `glmdeploy` process, so per-job GPU selection holds.

Hydra's basic launcher runs every job in one process, where CUDA_VISIBLE_DEVICES is read only once;
glmdeploy therefore launches one child process per job itself, in Hydra's sweep directory layout
(`<sweep dir>/<job number>/`). Plan-only sweeps run several children at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from glmdeploy.problems import ExitCode

if TYPE_CHECKING:
    from glmdeploy.config.locations import ConfigSource

PARALLEL_COMMANDS = {"plan", "export vllm"}  # touch no GPU: safe to run side by side


def sweep_dir(overrides: Sequence[str]) -> Path:
    """`hydra.sweep.dir` if the overrides set it, else multirun/<date>/<time> like Hydra."""
    for override in overrides:
        if override.startswith("hydra.sweep.dir="):
            return Path(override.split("=", 1)[1])
    return Path("multirun") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")


def launch_sweep(
    command: str,
    jobs: Sequence[Sequence[str]],
    root: Path,
    *,
    source: ConfigSource | None = None,
    json_out: bool,
) -> int:
    """Run `glmdeploy COMMAND <job overrides>` for every job; returns the worst exit code.

    `command` may carry the command's positional arguments (`export vllm`).

    Ctrl-C stops the sweep: the running children are interrupted too (same process group) and
    mark their records `interrupted`; jobs not started yet are listed as such in `sweep.json`.
    """
    from glmdeploy.outputs import make_directory

    hint = "set hydra.sweep.dir=DIR to a directory you can write"
    make_directory(root, "the sweep directory (hydra.sweep.dir)", hint=hint)
    plain = [[o for o in job if not o.startswith("hydra.sweep.")] for job in jobs]
    (root / "sweep.json").write_text(json.dumps(
        {"command": command, "jobs": [{"num": i, "overrides": j} for i, j in enumerate(plain)]},
        indent=2) + "\n")  # fmt: skip
    workers = min(os.cpu_count() or 1, 4) if command in PARALLEL_COMMANDS else 1
    print(
        f"sweep: {len(plain)} jobs of `glmdeploy {command}` in {root}"
        f"{f', {workers} at a time' if workers > 1 else ', one process each'}",
        file=sys.stderr,
    )

    # The children compose from the same directories: the user's, by environment variable.
    env = {**os.environ, **source.env()} if source is not None else None
    name = ["--config-name", source.config_name] if source is not None else []

    def one(num: int) -> int:
        argv = [sys.executable, "-m", "glmdeploy", *command.split(),
                *(["--json"] if json_out else []), *name, *plain[num],
                f"hydra.run.dir={root / str(num)}"]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        label = " ".join(plain[num])
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        tail = proc.stderr.strip().splitlines()[:1] if proc.returncode else []
        print(f"job {num}: {label}: {status}" + (f": {tail[0]}" if tail else ""), file=sys.stderr)
        (root / str(num)).mkdir(parents=True, exist_ok=True)
        (root / str(num) / "output.log").write_text(proc.stdout + proc.stderr)
        return proc.returncode

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        codes = list(pool.map(one, range(len(plain))))
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)  # children got SIGINT too; start no more
        _mark_interrupted(root, len(plain))
        return ExitCode.INTERRUPTED
    finally:
        pool.shutdown(wait=True)
    print(
        f"sweep done: {codes.count(0)} of {len(codes)} ok; "
        f"`glmdeploy report {root}` tabulates them",
        file=sys.stderr,
    )
    return max(codes, default=0)


def _mark_interrupted(root: Path, n_jobs: int) -> None:
    """After Ctrl-C: a record still `running` (its process died first) becomes `interrupted`."""
    from glmdeploy import atomic
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
