"""Expand `--multirun` overrides into the list of jobs, so each can be checked before any runs."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from glmdeploy.problems import ConfigError, Problem


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """The override list of every job of a sweep, in Hydra's basic-sweeper order.

    Raises:
        ConfigError: an override cannot be parsed.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from glmdeploy.config.hydra_errors import translate_hydra_error

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(translate_hydra_error(exc, overrides)) from exc
    axes: list[list[str]] = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            try:
                values = list(override.sweep_string_iterator())
            except Exception as exc:  # interval sweeps etc. need a sweeper plugin
                raise ConfigError(
                    [
                        Problem(
                            override.input_line or key,
                            f"cannot expand sweep: {exc}",
                            "a choice list a,b,c or range(start,stop)",
                            "glmdeploy uses Hydra's basic sweeper",
                        )
                    ]
                ) from exc
            axes.append([f"{key}={value}" for value in values])
        else:
            axes.append([override.input_line or ""])
    return [list(job) for job in itertools.product(*axes)]
