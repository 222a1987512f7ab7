"""Contiguous min-max partition: split a sequence of loads onto devices in a fixed order, exactly.

Problem: items with loads w_0 … w_{n−1} and peaks p_0 … p_{n−1} (forward order) go, in order, to
devices 0 … D−1 as contiguous runs (a run may be empty). Device d holding run R carries

    load_d(R) = always_d + max(floor_d, max_{i∈R} p_i) + (if R ≠ ∅: if_used_d + Σ_{i∈R} w_i)

and must stay within t × budget_d. The peak term is the activation workspace: a device runs its
items one after another, so it needs the largest of their workspaces, not their sum (`floor_d`: a
workspace the device carries whatever it holds, e.g. that of units offloaded to run there).
`min_max_split` finds the smallest t (the optimal maximum utilisation) and a split achieving it.

Why this is exact: load_d grows with R (loads and peaks are non-negative), so for a given t,
filling each device in turn with as many items as fit (`greedy_split`) succeeds whenever any split
does — any feasible split can be changed into the greedy one device by device, because a device
that takes more leaves a shorter remainder, and every suffix of a feasible remainder is feasible
(a sub-run has a smaller sum and maximum; an emptied device only drops its if_used cost).
Feasibility is monotone in t, so bisection on t converges to the optimum; the split returned is the
greedy split at the upper end of the final interval, whose utilisation is within 1e-12 (relative)
of the optimum. Each check costs O(D log n) (prefix sums, a sparse table of range maxima, bisect).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from itertools import accumulate

RELATIVE_TOLERANCE = 1e-12


class RangeMax:
    """max(values[lo:hi]) in O(1) after O(n log n) preparation (a sparse table); 0 when empty."""

    def __init__(self, values: Sequence[int]) -> None:
        self.table = [list(values)]
        width = 1
        while 2 * width <= len(values):
            row = self.table[-1]
            self.table.append([max(row[i], row[i + width]) for i in range(len(row) - width)])
            width *= 2

    def __call__(self, lo: int, hi: int) -> int:
        if hi <= lo:
            return 0
        level = (hi - lo).bit_length() - 1
        row = self.table[level]
        return max(row[lo], row[hi - (1 << level)])


def greedy_split(
    prefix: Sequence[int],
    budgets: Sequence[int],
    always: Sequence[int],
    if_used: Sequence[int],
    t: float,
    peaks: RangeMax | None = None,
    floors: Sequence[int] | None = None,
) -> list[int] | None:
    """Run boundaries b (device d gets items b[d]:b[d+1]) if every item fits at bound t, else None.

    `prefix` is the list of prefix sums of the loads, starting with 0; `peaks` the items' peaks.
    """
    n = len(prefix) - 1
    floors = floors if floors is not None else [0] * len(budgets)
    bounds = [0]
    start = 0
    for budget, fixed, extra, floor in zip(budgets, always, if_used, floors, strict=True):
        cap = t * budget
        if fixed + floor > cap:
            return None
        room = cap - fixed - extra
        end = start
        if budget > 0 and room >= 0 and start < n:
            end = max(start, bisect.bisect_right(prefix, prefix[start] + room - floor) - 1)
            if peaks is not None:  # the largest end whose sum and peak fit (monotone in end)
                lo, hi = start, end
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    fits = prefix[mid] - prefix[start] + max(floor, peaks(start, mid)) <= room
                    lo, hi = (mid, hi) if fits else (lo, mid - 1)
                end = lo
        bounds.append(end)
        start = end
    return bounds if start == n else None


def utilisation(
    loads: Sequence[int],
    bounds: Sequence[int],
    budgets: Sequence[int],
    always: Sequence[int],
    if_used: Sequence[int],
    peaks: Sequence[int] | None = None,
    floors: Sequence[int] | None = None,
) -> float:
    """The maximum over devices of load_d / budget_d for a split (inf where a budget is ≤ 0)."""
    worst = 0.0
    for d, budget in enumerate(budgets):
        run = range(bounds[d], bounds[d + 1])
        peak = max([floors[d] if floors else 0, *(peaks[i] for i in run if peaks)])
        load = always[d] + peak + (if_used[d] + sum(loads[i] for i in run) if run else 0)
        if load > 0:
            worst = max(worst, load / budget if budget > 0 else math.inf)
    return worst


def min_max_split(
    loads: Sequence[int],
    budgets: Sequence[int],
    always: Sequence[int] | None = None,
    if_used: Sequence[int] | None = None,
    peaks: Sequence[int] | None = None,
    floors: Sequence[int] | None = None,
) -> tuple[list[int], float]:
    """The split of `loads` onto devices (in order) minimising the maximum utilisation.

    Args:
        loads: non-negative item loads in forward order (weights, KV cache).
        budgets: per-device budgets (bytes); a device with budget ≤ 0 gets nothing.
        always: load a device carries even when empty (e.g. the offload streaming buffer).
        if_used: load a device carries once it holds any item.
        peaks: per item, a load the device carries while it runs the item (activation
            workspace): a device carries the largest of its items', not their sum.
        floors: per device, the least peak it carries, empty or not.

    Returns:
        (bounds, utilisation): device d gets items bounds[d]:bounds[d+1]; utilisation is the
        split's maximum load/budget (inf when no split exists because every budget is ≤ 0).
    """
    n_dev = len(budgets)
    always = list(always) if always is not None else [0] * n_dev
    if_used = list(if_used) if if_used is not None else [0] * n_dev
    floors = list(floors) if floors is not None else [0] * n_dev
    fixed = [a + f for a, f in zip(always, floors, strict=True)]
    usable = [b if b > 0 else 0 for b in budgets]
    empty = [0] * (n_dev + 1)
    if not loads:
        return empty, utilisation(loads, empty, usable, always, if_used, peaks, floors)
    if any(a > 0 and b <= 0 for a, b in zip(fixed, budgets, strict=True)) or not any(usable):
        bounds = [0] * n_dev + [len(loads)] if n_dev else [0]
        return bounds, math.inf
    prefix = list(accumulate(loads, initial=0))
    ranges = RangeMax(peaks) if peaks is not None else None
    best = max(range(n_dev), key=lambda d: usable[d])
    # Feasible upper bound: everything on the device with the largest budget.
    top = max(floors[best], max(peaks, default=0) if peaks is not None else 0)
    hi = max(
        max(a / b for a, b in zip(fixed, usable, strict=True) if b > 0),
        (always[best] + top + if_used[best] + prefix[-1]) / usable[best],
    )

    def split(t: float) -> list[int] | None:
        return greedy_split(prefix, usable, always, if_used, t, ranges, floors)

    while split(hi) is None:  # float rounding
        hi = math.nextafter(hi, math.inf)
    lo = max((a / b for a, b in zip(fixed, usable, strict=True) if b > 0), default=0.0)
    if split(lo) is not None:
        hi = lo
    while hi - lo > RELATIVE_TOLERANCE * hi:
        mid = (lo + hi) / 2
        if split(mid) is None:
            lo = mid
        else:
            hi = mid
    found = split(hi)
    assert found is not None  # hi is feasible by construction
    return found, utilisation(loads, found, usable, always, if_used, peaks, floors)
