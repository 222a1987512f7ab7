"""Stage 4b, scale-out: tensor and pipeline parallelism on torchrun with transformers'
`DistributedConfig`: the rules it needs, per-rank plans, the launcher and the rank entry point."""

from typing import TYPE_CHECKING

from glmdeploy._lazy import lazy_exports

if TYPE_CHECKING:
    from glmdeploy.distributed.launcher import LaunchRequest, launch
    from glmdeploy.distributed.rank_plan import plan_ranks, rank_tensors
    from glmdeploy.distributed.rank_record import RankFailed
    from glmdeploy.distributed.rules import runs_on_torchrun, transformers_parallel_problems

__all__ = [
    "LaunchRequest",
    "RankFailed",
    "launch",
    "plan_ranks",
    "rank_tensors",
    "runs_on_torchrun",
    "transformers_parallel_problems",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "LaunchRequest": "launcher",
        "RankFailed": "rank_record",
        "launch": "launcher",
        "plan_ranks": "rank_plan",
        "rank_tensors": "rank_plan",
        "runs_on_torchrun": "rules",
        "transformers_parallel_problems": "rules",
    },
)
