"""Per-rank plans (tensor/pipeline parallelism) as terminal tables: one row per rank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glmdeploy.config.settings import GIB
from glmdeploy.planning.types import ParallelLayout, device_label

if TYPE_CHECKING:
    from glmdeploy.planning.deployment_plan import PlannedDeployment


def rank_table(planned: PlannedDeployment) -> Any:
    """The per-rank budget table of a parallel plan, as a rich Table."""
    from rich import box
    from rich.table import Table

    plan = planned.plan
    layout = plan.parallel
    assert layout is not None
    logical = {d.physical_id: d.logical_id for d in planned.assignment.devices}
    table = Table(
        title=f"parallel: {plan.strategy}, {len(plan.rows)} ranks, {layout.backend} (sizes in GiB)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("rank", "node", "device"):
        table.add_column(col, no_wrap=True)
    table.add_column("holds", min_width=30, overflow="fold")
    for col in ("params", "weights", "KV", "work", "reserve", "total", "capacity", "used"):
        table.add_column(col, justify="right", no_wrap=True)
    for row, share in zip(plan.rows, layout.ranks, strict=True):
        # Every node numbers its own GPUs cuda:0…: the rank's local rank is its logical id.
        gpu = isinstance(row.device, int)
        label = device_label(row.device, share.local_rank if gpu else None)
        if gpu and row.device in logical:
            label += f"\n{row.name}"
        holds = row.units + (
            f" (1/{layout.tp_size} of each split tensor)" if layout.tp_size > 1 else ""
        )
        table.add_row(
            str(share.rank),
            str(share.node),
            label,
            holds,
            _count(row.n_params),
            _gib(row.weights_bytes),
            _gib(row.kv_bytes),
            _gib(row.workspace_bytes),
            _gib(row.reserve_bytes),
            _gib(row.total_bytes),
            _gib(row.capacity_bytes),
            f"{row.utilisation:.0%}",
        )
    return table


def print_split(console: Any, layout: ParallelLayout) -> None:
    """Which parameters tensor parallelism splits (rank 0's shard) and which stay whole."""
    if not layout.split:
        return
    console.print(f"split across each stage's {layout.tp_size} ranks (global → rank 0's shard):")
    for line in layout.split:
        console.print(f"  {line}")
    console.print(f"whole on every rank: {', '.join(layout.replicated) or 'nothing'}")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
