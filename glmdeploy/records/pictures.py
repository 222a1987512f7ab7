"""Draw a plan as a picture: per-device stacked bars (weights, KV cache, workspace, reserve).

Each bar is one budget row of the plan; a black line marks the device's capacity. A capacity far
above everything else (a CPU's RAM) would flatten the GPU bars, so it is written as text at the top
instead. matplotlib is imported only here, with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from glmdeploy import atomic
from glmdeploy.config.settings import GIB
from glmdeploy.planning.types import BudgetRow, Plan, device_label

PARTS = (
    ("weights_bytes", "weights", "#4C72B0"),
    ("kv_bytes", "KV cache", "#55A868"),
    ("workspace_bytes", "workspace", "#DD8452"),
    ("reserve_bytes", "reserve", "#B0B0B0"),
)


def save_plan_picture(plan: Plan, path: Path) -> None:
    """Save the plan's per-device budget as PNG (or SVG/PDF, by `path`'s suffix), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan.rows
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(rows) + 2.5), 4.5), layout="constrained")
    biggest = max([r.total_bytes for r in rows] + [r.capacity_bytes for r in rows if _gpu(r)])
    unit, scale = ("GiB", GIB) if biggest >= GIB else ("MiB", 1024**2)
    tops = [0.0] * len(rows)
    for attr, name, colour in PARTS:
        heights = [getattr(r, attr) / scale for r in rows]
        ax.bar(xs, heights, 0.6, bottom=tops, label=name, color=colour)
        tops = [t + h for t, h in zip(tops, heights, strict=True)]
    gpu_capacities = [r.capacity_bytes / scale for r in rows if _gpu(r)]
    y_max = max([*tops, *gpu_capacities, 1e-3]) * 1.2
    ax.set_ylim(0, y_max)
    legend_done = False
    for x, row, top in zip(xs, rows, tops, strict=True):
        capacity = row.capacity_bytes / scale
        if 0 < capacity <= y_max:
            label = "_nolegend_" if legend_done else "capacity"
            ax.hlines(capacity, x - 0.4, x + 0.4, colors="black", linewidth=2, label=label)
            legend_done = True
        elif capacity > y_max:
            text = f"capacity\n{capacity:.3g} {unit} ↑"
            ax.text(x, y_max * 0.97, text, ha="center", va="top", fontsize=7)
        ax.text(
            x, top + y_max * 0.01, _percent(row.utilisation), ha="center", va="bottom", fontsize=8
        )
    ax.set_xticks(xs, [_tick(r) for r in rows], fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(picture_title(plan), fontsize=10, wrap=True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)


def picture_title(plan: Plan) -> str:
    """Model, dtype and strategy, then the plan's verdict sentence."""
    fp = plan.fingerprint
    return f"{fp.model_class} {fp.dtype}, placement {plan.strategy}\n{plan.verdict.sentence}"


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (format by `path`'s suffix, default PNG) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic.replacing(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=110)
    finally:
        plt.close(fig)


def _tick(row: BudgetRow) -> str:
    """A GPU's label carries its model name on a second line."""
    label = device_label(row.device)
    label = f"rank {row.rank}\n{label}" if row.rank is not None else label
    return f"{label}\n{row.name}" if _gpu(row) else label


def _gpu(row: BudgetRow) -> bool:
    return isinstance(row.device, int)


def _percent(utilisation: float) -> str:
    if math.isinf(utilisation):
        return "∞"
    return "<1%" if 0 < utilisation < 0.005 else f"{utilisation:.0%}"
