"""Turn command-line overrides into validated deployments: compose, check, type."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmdeploy.config.compose import RunFacts, compose_dict, compose_tolerant
from glmdeploy.config.locations import ConfigSource
from glmdeploy.config.settings import Deployment
from glmdeploy.config.typed_view import deployment_from_dict
from glmdeploy.config.validate import check, normalise
from glmdeploy.problems import ConfigError, Problem


@dataclass(frozen=True)
class Job:
    """One composed and validated deployment, with the overrides that produced it.

    Attributes:
        overrides: as given (a sweep job's: its combination).
        config: the resolved config as a plain dict (what `show` prints).
        deployment: its typed view.
        choices: group -> option chosen, as run records keep them.
        run: Hydra's run facts: run and sweep directories, task overrides, `env_set`.
    """

    overrides: tuple[str, ...]
    config: dict[str, Any]
    deployment: Deployment
    choices: dict[str, str] = field(default_factory=dict)
    run: RunFacts = field(default_factory=RunFacts)
    applied: tuple[str, ...] = ()  # the overrides as Hydra must be given them (Composition.applied)


def load_deployment(overrides: Sequence[str], source: ConfigSource | None = None) -> Job:
    """Compose and validate one deployment. Raises ConfigError with every problem found.

    Overrides that Hydra rejects are reported together with the problems of the config composed
    from the others; a problem in a key set by one of the user's own option files names the file.
    """
    source = source or ConfigSource()
    composed = compose_tolerant(overrides, source)
    cfg, problems = composed.config, list(composed.problems)
    if cfg is not None:
        said = {p.path for p in problems}  # a refused override's key: said once
        problems += [_in_user_file(p, composed.choices, source) for p in check(cfg)
                     if p.path not in said]  # fmt: skip
    if problems or cfg is None:
        raise ConfigError(problems)
    deployment = deployment_from_dict(normalise(cfg))  # checked just above
    return Job(tuple(overrides), cfg, deployment, composed.choices, composed.run,
               tuple(composed.applied))  # fmt: skip


def _in_user_file(problem: Problem, choices: dict[str, str], source: ConfigSource) -> Problem:
    """The problem, naming the user's option file that set its group (if the user's)."""
    group = problem.path.split(".", 1)[0].split("[", 1)[0]
    file = source.user_file(group, choices[group]) if group in choices else None
    if file is None:
        return problem
    return Problem(problem.path, f"{problem.message} (set in {file})", problem.expected,
                   problem.hint)  # fmt: skip


Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


def load_deployments(
    overrides: Sequence[str],
    source: ConfigSource | None = None,
    *,
    sweep: bool = False,
    mapper: Mapper = map,
) -> list[Job]:
    """Compose and validate one deployment, or every job of a sweep before any job runs.

    For a sweep, the problems of all invalid combinations are reported together, each path
    prefixed by the job's overrides, so that nothing is launched when one combination is wrong.
    `mapper` composes the jobs (`map`, or a process pool's `imap` to use every core).
    """
    if not sweep:
        return [load_deployment(overrides, source)]
    from glmdeploy.config.overrides import screen_overrides
    from glmdeploy.config.sweep import expand_sweep

    refused = screen_overrides(overrides, sweep=True)[1]
    if refused:  # said once, not once per job
        raise ConfigError(refused)
    combos = expand_sweep(overrides)
    results = list(mapper(try_load, [(combo, source) for combo in combos]))
    jobs = [job for job, _ in results if job is not None]
    problems = [
        _in_job(" ".join(combo), p)
        for combo, (_, found) in zip(combos, results, strict=True)
        for p in found
    ]
    if problems:
        bad = len(combos) - len(jobs)
        raise ConfigError(
            problems, f"invalid sweep: {bad} of {len(combos)} jobs are invalid, none was launched"
        )
    return jobs


def try_load(
    item: tuple[Sequence[str], ConfigSource | None],
) -> tuple[Job | None, list[Problem]]:
    """`load_deployment(*item)`, its problems returned rather than raised (picklable both ways)."""
    try:
        return load_deployment(*item), []
    except ConfigError as exc:
        return None, list(exc.problems)


def _in_job(label: str, problem: Problem) -> Problem:
    return Problem(f"[{label}] {problem.path}", problem.message, problem.expected, problem.hint)


def compose_resolved_yaml(
    overrides: Sequence[str], source: ConfigSource | None = None
) -> tuple[str, dict[str, Any]]:
    """The resolved config as YAML text (as `--cfg job --resolve` prints it) and as a dict."""
    from omegaconf import OmegaConf

    cfg = compose_dict(overrides, source)
    return OmegaConf.to_yaml(OmegaConf.create(cfg)), cfg
