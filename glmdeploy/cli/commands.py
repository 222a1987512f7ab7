"""The implementations behind each `glmdeploy` subcommand (the table lives in `glmdeploy.cli.main`).

Each function takes the parsed `Args`, calls the library, prints, and returns an exit code; heavy
modules are imported inside the functions that need them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from glmdeploy.cli.args import Args
from glmdeploy.cli.output import print_json
from glmdeploy.problems import ExitCode, GlmDeployError

if TYPE_CHECKING:
    from glmdeploy.config.settings import Deployment
    from glmdeploy.hardware.doctor import DoctorReport


def cmd_validate(args: Args) -> int:
    from glmdeploy.config.deployments import load_deployments

    source = args.source()
    if args.hydra_mode and not args.multirun:
        from glmdeploy.cli.hydra_runner import run_hydra

        return run_hydra(args, source, job=None)
    jobs = load_deployments(args.overrides, source, sweep=args.multirun)
    if args.json:
        print_json(
            {"ok": True, "jobs": [{"overrides": j.overrides, "config": j.config} for j in jobs]}
        )
    else:
        for job in jobs:
            label = " ".join(job.overrides) or "(defaults)"
            print(f"ok: {label}: {job.deployment.summary()}")
    return ExitCode.OK


def cmd_show(args: Args) -> int:
    from glmdeploy.config.deployments import compose_resolved_yaml

    source = args.source()
    if args.hydra_mode:
        from glmdeploy.cli.hydra_runner import run_hydra

        return run_hydra(args, source, job=None)
    text, cfg = compose_resolved_yaml(args.overrides, source)
    if args.json:
        print_json(cfg)
    else:
        print(text, end="")
    return ExitCode.OK


def cmd_job(args: Args) -> int:
    """plan / load / generate / bench / run: validate everything first, then run and record."""
    from glmdeploy.config.deployments import load_deployment, load_deployments

    source = args.source()
    if args.multirun:
        from glmdeploy.cli.sweep_launcher import launch_sweep, sweep_dir
        from glmdeploy.config.sweep import expand_sweep

        load_deployments(args.overrides, source, sweep=True)  # every job, before any runs
        combos = expand_sweep(args.overrides)
        if args.dry_run:
            for i, combo in enumerate(combos):
                print(f"job {i}: {' '.join(combo)}")
            return ExitCode.OK
        return launch_sweep(
            args.command, combos, sweep_dir(args.overrides), source=source, json_out=args.json
        )
    load_deployment(args.overrides, source)  # report config problems in glmdeploy's format first
    from glmdeploy.cli.hydra_runner import run_hydra

    return run_hydra(args, source, _hydra_job)


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
        choices=choices, json=args.json, save=args.save,
    )  # fmt: skip
    return run_job(ctx)


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
