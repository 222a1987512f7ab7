"""`glmdeploy validate`'s check of an explicit map, without planning and without torch.

Where the model's anatomy is known without building it (shipped, or cached by an earlier plan:
`glmdeploy.model.anatomy_cache`), the map is checked exactly as `plan` checks it
(`glmdeploy.planning.explicit_map.check_explicit_map`): module names, coverage, overlaps, split
blocks, tied weights, and the GPUs the config names. Otherwise only its form was checked (by the
config rules), and the result says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from glmdeploy.config.rules import selected_ids
from glmdeploy.config.settings import CheckpointLayout, Deployment, Strategy
from glmdeploy.model.anatomy_cache import cached_anatomy
from glmdeploy.model.hf_config import checkpoint_layout
from glmdeploy.planning.explicit_map import check_explicit_map
from glmdeploy.problems import Problem

FORM_ONLY = (
    "placement.map: checked its form only; its module names are checked against the model by "
    "`glmdeploy plan` (which caches the model's module tree: validate checks them after that)"
)
GPUS_AT_PLAN_TIME = (
    "placement.map: its GPU ids are checked by `glmdeploy plan`: gpus={mode} chooses among this "
    "machine's GPUs"
)


@dataclass(frozen=True)
class MapPrecheck:
    """What validate found in an explicit map: problems, notes, and how far it could look.

    Attributes:
        scope: `full` (checked against the model's module tree) or `form` (the config rules only).
    """

    scope: str
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()


def precheck_map(deployment: Deployment, gpus: Mapping[str, Any]) -> MapPrecheck | None:
    """Check `placement.map` as `plan` would, where that needs no torch; None without a map.

    Args:
        deployment: the validated deployment.
        gpus: its `gpus` config node (which GPUs it names: `glmdeploy.config.rules.selected_ids`).
    """
    placement = deployment.placement
    if placement.strategy is not Strategy.EXPLICIT:
        return None
    anatomy = cached_anatomy(deployment.model)
    if anatomy is None:
        return MapPrecheck("form", notes=(FORM_ONLY,))
    named = selected_ids(gpus)
    notes: tuple[str, ...] = ()
    if named is None:  # auto / least_used: the machine decides
        named = {e.device for e in placement.map if isinstance(e.device, int)}
        notes = (GPUS_AT_PLAN_TIME.format(mode=deployment.gpus.mode),)
    legacy = checkpoint_layout(deployment.model) is CheckpointLayout.CHATGLM  # as `plan` reads it
    check = check_explicit_map(placement.map, anatomy, sorted(named), placement.offload,
                               checkpoint_names=legacy)  # fmt: skip
    return MapPrecheck("full", check.problems, notes)
