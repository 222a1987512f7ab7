"""Plans as terminal tables (rich) and as JSON-ready dicts built from the same data."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from glmdeploy.config.settings import GIB, GpuMode
from glmdeploy.planning.budget import percent
from glmdeploy.planning.deployment_plan import PlannedDeployment, describe_source
from glmdeploy.planning.types import Plan, device_label

if TYPE_CHECKING:
    from glmdeploy.inference.runner import BenchResult


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def plan_table(planned: PlannedDeployment) -> Any:
    """The per-device budget table of a plan, as a rich Table."""
    from rich import box
    from rich.table import Table

    plan = planned.plan
    logical = {d.physical_id: d.logical_id for d in planned.assignment.devices}
    names = {d.physical_id: d.name for d in planned.assignment.devices}
    table = Table(
        title=f"placement: {plan.strategy} (sizes in GiB)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("device", no_wrap=True)
    table.add_column("modules", min_width=30, overflow="fold")
    for col in ("params", "weights", "KV", "work", "reserve", "total", "capacity", "used"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in plan.rows:
        label = device_label(
            row.device, logical.get(row.device) if isinstance(row.device, int) else None
        )
        if isinstance(row.device, int) and row.device in names:
            label += f"\n{names[row.device]}"
        util = "—" if row.capacity_bytes == 0 else percent(row.utilisation)
        table.add_row(
            label,
            row.units or "(nothing)",
            _count(row.n_params),
            gib(row.weights_bytes),
            gib(row.kv_bytes),
            gib(row.workspace_bytes),
            gib(row.reserve_bytes),
            gib(row.total_bytes),
            gib(row.capacity_bytes) if row.capacity_bytes else "—",
            util,
        )
    return table


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def verdict(plan: Plan) -> str:
    """The plan's verdict line (`Plan.verdict`, decided once by the planner)."""
    return plan.verdict.sentence


def print_plan(planned: PlannedDeployment) -> None:
    """Print the header line, the budget table, hops, notes and the verdict to stdout."""
    from rich.console import Console

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
    dep = planned.deployment
    console.print(
        f"model {dep.model.name} ({planned.anatomy.model_class}, "
        f"{_count(planned.anatomy.n_params)} params, {describe_source(dep)})"
    )
    console.print(f"deployment: {dep.summary()} ({planned.dtype_reason})")
    if not planned.assignment.devices and dep.gpus.mode is not GpuMode.CPU:
        why = planned.snapshot.nvml_error or "NVML lists none"
        console.print(f"GPUs: none visible ({why}); the CPU runs the model")
    plan = planned.plan
    if plan.parallel is not None:  # one row per rank
        from glmdeploy.cli.rank_render import print_split, rank_table

        console.print(rank_table(planned))
        print_split(console, plan.parallel)
    else:
        console.print(plan_table(planned))
    if plan.hops:
        hops = "; ".join(f"{h.before} → {h.after} ({h.source}→{h.target})" for h in plan.hops)
        console.print(f"hops: {hops}")
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print(verdict(plan))


def plan_json(planned: PlannedDeployment) -> dict[str, Any]:
    """The same facts as `print_plan`, for --json."""
    logical = {d.physical_id: d.logical_id for d in planned.assignment.devices}
    return {
        "ok": planned.plan.fits,
        "deployment": planned.deployment.summary(),
        "model_class": planned.anatomy.model_class,
        "n_params": planned.anatomy.n_params,
        "logical_ids": {str(k): v for k, v in logical.items()},
        "verdict": verdict(planned.plan),
        "plan": planned.plan.to_dict(),
    }


def print_bench(result: BenchResult) -> None:
    """The `bench` table: speed, then memory and plan-vs-actual bytes per device."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
    decode = result.decode_tokens_per_s
    console.print(
        f"bench: batch {result.batch_size}, {result.prompt_tokens} prompt + "
        f"{result.new_tokens} new tokens, median of {result.repeats}: "
        f"load {result.load_seconds:.2f} s, "
        f"time to first token {result.ttft_seconds * 1000:.1f} ms, decode "
        + (f"{decode:.1f} tokens/s" if decode is not None else "n/a (one new token)")
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in (
        "device",
        "planned MiB",
        "loaded MiB",
        "peak alloc MiB",
        "peak reserved MiB",
        "RSS MiB",
        "peak RSS MiB",
    ):
        table.add_column(col, justify="left" if col == "device" else "right", no_wrap=True)

    def mib(n: int | None) -> str:
        return "—" if n is None else f"{n / 2**20:.1f}"

    memory = {m.device: m for m in result.memory}
    for row in result.device_bytes:
        mem = memory.pop(row.label, None)  # GPUs are labelled like their plan rows; cpu is "cpu"
        table.add_row(row.label, mib(row.predicted_bytes), mib(row.actual_bytes),
                      *(mib(getattr(mem, f, None)) for f in ("peak_allocated_bytes",
                        "peak_reserved_bytes", "rss_bytes", "peak_rss_bytes")))  # fmt: skip
    for key, mem in memory.items():
        table.add_row(
            key,
            "—",
            "—",
            mib(mem.peak_allocated_bytes),
            mib(mem.peak_reserved_bytes),
            mib(mem.rss_bytes),
            mib(mem.peak_rss_bytes),
        )
    console.print(table)
