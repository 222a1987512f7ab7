"""The implementations behind each `glmdeploy` subcommand (the table lives in `glmdeploy.cli.main`).

Each function takes the parsed `Args`, calls the library, prints, and returns an exit code; heavy
modules are imported inside the functions that need them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from glmdeploy.cli.args import Args, UsageError
from glmdeploy.cli.output import print_json
from glmdeploy.problems import ConfigError, ExitCode, GlmDeployError, Problem

if TYPE_CHECKING:
    from glmdeploy.config.deployments import Job
    from glmdeploy.config.locations import ConfigSource
    from glmdeploy.config.settings import Deployment
    from glmdeploy.hardware.doctor import DoctorReport
    from glmdeploy.planning.map_precheck import MapPrecheck


def cmd_validate(args: Args) -> int:
    from glmdeploy.config.deployments import load_deployments

    source = args.source()
    jobs = load_deployments(args.overrides, source, sweep=args.multirun)
    if args.hydra_mode and not args.multirun:  # valid: let Hydra print what was asked
        from glmdeploy.cli.hydra_runner import run_hydra

        return run_hydra(args, source, None, jobs[0].applied)
    maps = _check_maps(jobs, label=args.multirun)
    for note in dict.fromkeys(n for m in maps if m is not None for n in m.notes):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json({"ok": True, "jobs": [
            {"overrides": j.overrides, "config": j.config,
             **({"map_check": m.scope, "notes": list(m.notes)} if m is not None else {})}
            for j, m in zip(jobs, maps, strict=True)
        ]})  # fmt: skip
    else:
        for job in jobs:
            label = " ".join(job.overrides) or "(defaults)"
            print(f"ok: {label}: {job.deployment.summary()}")
    return ExitCode.OK


def _check_maps(jobs: list[Job], *, label: bool) -> list[MapPrecheck | None]:
    """Each job's explicit map checked as `plan` checks it, where no torch is needed for that.

    Raises:
        ConfigError: every problem of every map (prefixed by the job's overrides in a sweep).
    """
    if not any(j.deployment.placement.strategy == "explicit" for j in jobs):
        return [None] * len(jobs)
    from glmdeploy.planning.map_precheck import precheck_map

    checks = [precheck_map(j.deployment, j.config["gpus"]) for j in jobs]
    problems = [
        Problem(f"[{' '.join(j.overrides)}] {p.path}" if label else p.path, p.message,
                p.expected, p.hint)
        for j, c in zip(jobs, checks, strict=True) if c is not None for p in c.problems
    ]  # fmt: skip
    if problems:
        raise ConfigError(problems)
    return checks


def cmd_show(args: Args) -> int:
    from glmdeploy.config.deployments import compose_resolved_yaml

    source = args.source()
    if args.multirun:
        raise UsageError(
            "show prints one config; -m/--multirun is for plan, run, … and validate",
            "`glmdeploy validate -m …` checks each job; `plan -m --dry-run …` lists them",
        )
    if args.hydra_mode:
        from glmdeploy.cli.hydra_runner import run_hydra

        return run_hydra(args, source, None)
    text, cfg = compose_resolved_yaml(args.overrides, source)
    if args.json:
        print_json(cfg)
    else:
        print(text, end="")
    return ExitCode.OK


def cmd_job(args: Args) -> int:
    """plan / load / generate / bench / run / export: validate everything first, then run and
    record.

    A job composes once and runs here, recording into `hydra.run.dir`; Hydra's own runner is used
    only for its flags (`--cfg`, `--info`, …). A sweep runs as `glmdeploy.cli.sweep_launcher` says.
    """
    from glmdeploy.config.deployments import load_deployment
    from glmdeploy.engines.vllm.jobs import refuse_transformers_commands

    source = args.source()
    if args.save:
        from glmdeploy.outputs import check_file

        check_file(args.save, "the plan file (--save)")
    if args.overwrite and not args.multirun:
        problem = Problem("--overwrite", "replaces the records of an earlier sweep",
                          "-m (a sweep)", "drop --overwrite, or sweep with -m")  # fmt: skip
        raise ConfigError([problem])
    if args.multirun:
        from glmdeploy.cli.sweep_launcher import run_sweep

        return run_sweep(args, source)
    job = load_deployment(args.overrides, source)  # config problems in glmdeploy's format first
    refuse_transformers_commands(args.command, [job.deployment])
    return _run_one(args, source, job)


def _run_one(args: Args, source: ConfigSource, job: Job) -> int:
    """Run one composed job in this process, in its run directory (checked before it is made)."""
    if args.hydra_mode or job.run.run_dir is None:
        from glmdeploy.cli.hydra_runner import run_hydra

        return run_hydra(args, source, _hydra_job, job.applied)
    from pathlib import Path

    from glmdeploy.cli.jobs import JobContext, hydra_job_settings, run_job
    from glmdeploy.outputs import check_directory, claim_new_directory

    run_dir = Path(job.run.run_dir).absolute()  # as Hydra's runtime.output_dir
    hint = "set hydra.run.dir=DIR to a directory you can write"
    check_directory(run_dir, "the run directory (hydra.run.dir)", hint=hint)
    if job.run.run_dir_dated:  # outputs/DATE/TIME: a job started in the same second has its own
        run_dir = claim_new_directory(run_dir, "the run directory (hydra.run.dir)", hint=hint)
    ctx = JobContext(
        command=args.command, config=job.config, deployment=job.deployment, run_dir=run_dir,
        overrides=list(job.run.task_overrides), choices=dict(job.choices), json=args.json,
        save=args.save, out=args.out,
    )  # fmt: skip
    with hydra_job_settings(job.run, run_dir):
        return run_job(ctx)


def cmd_serve(args: Args) -> int:
    """serve: one deployment behind an OpenAI-compatible API; engine=vllm hands over to vLLM."""
    from glmdeploy.config.deployments import load_deployment
    from glmdeploy.config.settings import EngineName

    if args.multirun:
        hint = "drop -m: start one `glmdeploy serve` per deployment, each on its own serve.port"
        raise ConfigError([Problem("-m", "serve runs one deployment, not a sweep", hint=hint)])
    source = args.source()
    job = load_deployment(args.overrides, source)
    if job.deployment.engine.name is EngineName.VLLM and not args.hydra_mode:
        from glmdeploy.serving.handover import hand_over_to_vllm

        return hand_over_to_vllm(job.deployment, json_out=args.json)
    return _run_one(args, source, job)


def _hydra_job(cfg: dict[str, Any], args: Args) -> int:
    """One job inside Hydra's runner: its run dir, overrides and group choices come from Hydra."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from glmdeploy.cli.jobs import JobContext, run_job
    from glmdeploy.config.validate import validate_dict

    hc = HydraConfig.get()
    choices = {str(k): str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    ctx = JobContext(
        command=args.command, config=cfg, deployment=validate_dict(cfg),
        run_dir=Path(hc.runtime.output_dir), overrides=list(hc.overrides.task),
        choices=choices, json=args.json, save=args.save, out=args.out,
    )  # fmt: skip
    return run_job(ctx)


def cmd_export(args: Args) -> int:
    """export vllm: a job like plan (record, sweeps), which also writes vLLM's config."""
    from glmdeploy.problems import ConfigError, Problem

    target = args.positional[0]
    if target != "vllm":
        hint = "glmdeploy export vllm [overrides] [--out FILE]"
        raise ConfigError([Problem("export", f"unknown target '{target}'", "vllm", hint)])
    if args.out and args.multirun:
        hint = "leave --out off: each job writes vllm.yaml into its own job directory"
        raise ConfigError([Problem("--out", "one file for every job of a sweep", None, hint)])
    if args.out:
        from glmdeploy.outputs import check_file

        hint = "give a file you can write, e.g. --out vllm.yaml (missing directories are made)"
        check_file(args.out, "the vLLM config (--out)", hint=hint, create_parents=True)
    return cmd_job(args)


def cmd_doctor(args: Args) -> int:
    from glmdeploy.hardware.doctor import collect_report, render_report

    deployment = None
    if args.overrides:
        from glmdeploy.config.deployments import load_deployment

        deployment = load_deployment(args.overrides, args.source()).deployment
    report = collect_report(deployment)
    code = ExitCode.OK
    if deployment is not None:
        report, code = _with_fit(report, deployment)
    if args.json:
        print(report.to_json())
    else:
        print(render_report(report))
    return code


def _with_fit(report: DoctorReport, deployment: Deployment) -> tuple[DoctorReport, ExitCode]:
    """doctor's answer to 'does this config fit here, and if not why': the planner's verdict,
    and the exit code that goes with it (5: does not fit, 3: the hardware lacks what it needs)."""
    import dataclasses

    from glmdeploy.cli.render import verdict
    from glmdeploy.planning.deployment_plan import DeploymentDoesNotFit, plan_deployment

    code = ExitCode.OK
    try:
        planned = plan_deployment(deployment)
        fit = "; ".join(filter(None, (verdict(planned.plan), planned.lacking_here)))
    except DeploymentDoesNotFit as exc:
        fit = verdict(exc.planned.plan) + "; " + "; ".join(p.message for p in exc.problems[1:])
        code = exc.exit_code
    except GlmDeployError as exc:
        fit = f"cannot plan: {exc.title}: " + "; ".join(
            f"{p.path}: {p.message}" for p in exc.problems
        )
        code = exc.exit_code
    return dataclasses.replace(report, fit=fit), code


def cmd_convert(args: Args) -> int:
    from pathlib import Path

    from glmdeploy.loading.convert import convert_checkpoint

    src, dst = (Path(p) for p in args.positional)
    result = convert_checkpoint(src, dst, progress=not args.json, overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print_json(
            {
                "ok": True,
                "dst": str(result.dst),
                "tensors": result.num_tensors,
                "bytes": result.total_bytes,
                "shards": list(result.shards),
            }
        )
    else:
        print(
            f"converted {result.num_tensors} tensors ({result.total_bytes / 2**30:.2f} GiB) "
            f"into {result.dst} ({len(result.shards)} shard(s)); load it with "
            f"model=local model.source.path={result.dst}"
        )
    return ExitCode.OK


def cmd_replay(args: Args) -> int:
    from pathlib import Path

    from glmdeploy.cli.jobs import replay_run

    return replay_run(Path(args.positional[0]), json_out=args.json)


def cmd_report(args: Args) -> int:
    from pathlib import Path

    from glmdeploy.records.report import collect_rows, markdown, write_report

    root = Path(args.positional[0])
    paths = write_report(root)
    if args.json:
        import dataclasses

        print_json(
            {
                "ok": True,
                "rows": [dataclasses.asdict(r) for r in collect_rows(root)],
                "markdown": str(paths.markdown),
                "csv": str(paths.csv),
                "png": str(paths.png),
            }
        )
    else:
        print(markdown(collect_rows(root)))
        print(f"wrote {paths.markdown}, {paths.csv}, {paths.png}", file=sys.stderr)
    return ExitCode.OK
