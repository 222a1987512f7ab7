"""Contiguous min-max partition: split a sequence of loads onto devices in a fixed order, exactly.

Problem: items with loads w_0 … w_{n−1} (forward order) go, in order, to devices 0 … D−1 as
contiguous runs (a run may be empty). Device d holding run R carries

    load_d(R) = always_d + (if R ≠ ∅: if_used_d + Σ_{i∈R} w_i)

and must stay within t × budget_d. `min_max_split` finds the smallest t (the optimal maximum
utilisation) and a split achieving it.

Why this is exact: for a given t, filling each device in turn with as many items as fit
(`greedy_split`) succeeds whenever any split does — any feasible split can be changed into the
greedy one device by device, because a device that takes more leaves a shorter remainder, and
every suffix of a feasible remainder is feasible (loads are non-negative; an emptied device only
drops its if_used cost). Feasibility is monotone in t, so bisection on t converges to the optimum;
the split returned is the greedy split at the upper end of the final interval, whose utilisation is
within 1e-12 (relative) of the optimum. Each check costs O(D log n) with prefix sums and bisect.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from itertools import accumulate

RELATIVE_TOLERANCE = 1e-12


def greedy_split(
    prefix: Sequence[int],
    budgets: Sequence[int],
    always: Sequence[int],
    if_used: Sequence[int],
    t: float,
) -> list[int] | None:
    """Run boundaries b (device d gets items b[d]:b[d+1]) if every item fits at bound t, else None.

    `prefix` is the list of prefix sums of the loads, starting with 0.
    """
    n = len(prefix) - 1
    bounds = [0]
    start = 0
    for budget, fixed, extra in zip(budgets, always, if_used, strict=True):
        cap = t * budget
        if fixed > cap:
            return None
        room = cap - fixed - extra
        end = start
        if budget > 0 and room >= 0 and start < n:
            end = max(start, bisect.bisect_right(prefix, prefix[start] + room) - 1)
        bounds.append(end)
        start = end
    return bounds if start == n else None


def utilisation(
    loads: Sequence[int],
    bounds: Sequence[int],
    budgets: Sequence[int],
    always: Sequence[int],
    if_used: Sequence[int],
) -> float:
    """The maximum over devices of load_d / budget_d for a split (inf where a budget is ≤ 0)."""
    worst = 0.0
    for d, budget in enumerate(budgets):
        run = loads[bounds[d] : bounds[d + 1]]
        load = always[d] + (if_used[d] + sum(run) if run else 0)
        if load > 0:
            worst = max(worst, load / budget if budget > 0 else math.inf)
    return worst


def min_max_split(
    loads: Sequence[int],
    budgets: Sequence[int],
    always: Sequence[int] | None = None,
    if_used: Sequence[int] | None = None,
) -> tuple[list[int], float]:
    """The split of `loads` onto devices (in order) minimising the maximum utilisation.

    Args:
        loads: non-negative item loads in forward order.
        budgets: per-device budgets (bytes); a device with budget ≤ 0 gets nothing.
        always: load a device carries even when empty (e.g. the offload streaming buffer).
        if_used: load a device carries once it holds any item (e.g. activation workspace).

    Returns:
        (bounds, utilisation): device d gets items bounds[d]:bounds[d+1]; utilisation is the
        split's maximum load/budget (inf when no split exists because every budget is ≤ 0).
    """
    n_dev = len(budgets)
    always = list(always) if always is not None else [0] * n_dev
    if_used = list(if_used) if if_used is not None else [0] * n_dev
    usable = [b if b > 0 else 0 for b in budgets]
    if not loads:
        return [0] * (n_dev + 1), utilisation(loads, [0] * (n_dev + 1), usable, always, if_used)
    if any(a > 0 and b <= 0 for a, b in zip(always, budgets, strict=True)) or not any(usable):
        bounds = [0] * n_dev + [len(loads)] if n_dev else [0]
        return bounds, math.inf
    prefix = list(accumulate(loads, initial=0))
    best = max(range(n_dev), key=lambda d: usable[d])
    # Feasible upper bound: everything on the device with the largest budget.
    hi = max(
        max(a / b for a, b in zip(always, usable, strict=True) if b > 0),
        (always[best] + if_used[best] + prefix[-1]) / usable[best],
    )
    while greedy_split(prefix, usable, always, if_used, hi) is None:  # float rounding
        hi = math.nextafter(hi, math.inf)
    lo = max((a / b for a, b in zip(always, usable, strict=True) if b > 0), default=0.0)
    if greedy_split(prefix, usable, always, if_used, lo) is not None:
        hi = lo
    while hi - lo > RELATIVE_TOLERANCE * hi:
        mid = (lo + hi) / 2
        if greedy_split(prefix, usable, always, if_used, mid) is None:
            lo = mid
        else:
            hi = mid
    split = greedy_split(prefix, usable, always, if_used, hi)
    assert split is not None  # hi is feasible by construction
    return split, utilisation(loads, split, usable, always, if_used)
