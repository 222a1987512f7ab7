"""Traces a causal LM's real prefill forward on fake tensors and fits its live bytes per unit kind.

How (`trace_kinds`):

1. The model is rebuilt with only as many decoder layers as it takes to contain one block of every
   kind (`block_kinds`; GLM-4.5-Air: layer 0 dense, layer 1 MoE), under `FakeTensorMode` on the
   CPU device: real module code, real shapes and dtypes, no memory.
2. The forward that `generate` runs in prefill (input ids and (batch, T) position ids, a
   `DynamicCache`, `logits_to_keep=1`, no attention mask: unpadded prompts) runs under
   `LiveBytes` at six (batch, T) points, and a seventh to check the fit; on two or more cores
   half of them run in a forked child (`_run_all`). The first block's input is cloned on entry so
   that it sees what every later block sees: the embedding output still alive plus its own input.
3. KV-cache storages are left out (the plan counts them separately). Every op sees the same
   sequence of shapes at every (batch, T), so the live bytes after op j are exactly
   B·(a·T + b·T² + c) + (a₀·T + b₀·T² + c₀); the six points determine the six integers. A unit's
   peak is the largest of its ops' polynomials (dominated ones are dropped), exact at every
   (batch, T) and checked at a held-out point.

On CPU the fake tensors dispatch SDPA exactly as real ones do (torch 2.13: the CPU flash kernel,
for bf16, fp16 and fp32). The kernels' internal scratch buffers are not seen (a few MiB, constant).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from glmdeploy.model.anatomy import Anatomy
from glmdeploy.model.live_bytes import LiveBytes
from glmdeploy.model.workspace import Polynomial, block_kinds

# (batch, tokens) fit points. Batch 1 takes other code paths in places (Llama's eager mask: another
# op sequence), so the fit uses batch ≥ 2; at batch 1 it is exact or an upper bound (tests).
GRID = ((2, 16), (2, 32), (2, 48), (3, 16), (3, 32), (3, 48))
CHECKS = ((4, 40),)  # a held-out point (new batch and length) the fit must reproduce exactly


class TraceError(RuntimeError):
    """The forward could not be traced, or its live bytes are not polynomial in (batch, T)."""


@dataclass(frozen=True)
class TracedKind:
    """One unit kind's traced live bytes: at its entry, and each op's (dominated ones dropped)."""

    kind: str
    entry: Polynomial
    phases: tuple[Polynomial, ...]


@dataclass(frozen=True)
class Trace:
    """What `trace_kinds` found: per-kind polynomials and the implementations that ran."""

    kinds: tuple[TracedKind, ...]
    attn_implementation: str
    attention_kernel: str
    experts_implementation: str | None


@dataclass
class _Run:
    ops: list[str]
    live: list[int]
    windows: dict[str, tuple[int, int]]  # kind -> [first op, end op) of its first unit
    entries: dict[str, int]  # kind -> live bytes when its first unit starts


def trace_kinds(
    anatomy: Anatomy, torch_dtype: str, attn_implementation: str, experts: str | None
) -> Trace:
    """Trace one unit of each kind (see the module docstring); `torch_dtype` as `bfloat16`."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    kinds = block_kinds(anatomy)
    first = {kind: layers[0] for kind, layers in kinds.items()}
    n_layers = max(first.values()) + 1
    head_entry = _head_entry(anatomy)
    with FakeTensorMode(), _cpu_grouped_mm():
        model = _build(anatomy, n_layers, getattr(torch, torch_dtype), attn_implementation, experts)
        runs = _run_all(model, first, head_entry, GRID + CHECKS)
    fit_runs, check_runs = runs[: len(GRID)], runs[len(GRID) :]
    traced = []
    for kind in [*first, "head"]:
        windows = [_window(run, kind) for run in fit_runs]
        if any(ops != windows[0][0] for ops, _ in windows):
            raise TraceError(f"{kind}: the op sequence changes with batch or prompt length")
        phases = _envelope(
            [_fit([live[j] for _, live in windows]) for j in range(len(windows[0][1]))]
        )
        entry = _fit([run.entries[kind] for run in fit_runs])
        for (batch, tokens), run in zip(CHECKS, check_runs, strict=True):
            want = max(_window(run, kind)[1])
            got = max(p.bytes(tokens, batch) for p in phases)
            if got != want:
                raise TraceError(f"{kind}: fit gives {got} bytes at {batch}×{tokens}, trace {want}")
        traced.append(TracedKind(kind, entry, tuple(phases)))
    ops = set(runs[0].ops)
    experts_used = model.config._experts_implementation if any("moe" in k for k in kinds) else None
    return Trace(
        kinds=tuple(traced),
        attn_implementation=str(model.config._attn_implementation),
        attention_kernel=_attention_kernel(ops, str(model.config._attn_implementation)),
        experts_implementation=None if experts_used is None else str(experts_used),
    )


def _cpu_grouped_mm() -> Any:
    """A dispatch mode giving `_grouped_mm` in fp32/fp16 the output the CPU kernel returns
    ((S, N) in the input dtype, verified on torch 2.13): its meta kernel accepts only bf16."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class CpuGroupedMM(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped upstream
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            if func is torch.ops.aten._grouped_mm.default and args[0].dtype != torch.bfloat16:
                mat_a, mat_b = args[0], args[1]
                if mat_a.dim() == 2 and mat_b.dim() == 3:
                    return mat_a.new_empty((mat_a.shape[0], mat_b.shape[-1]))
            return func(*args, **kwargs)

    return CpuGroupedMM()  # type: ignore[no-untyped-call]


def _build(
    anatomy: Anatomy, n_layers: int, dtype: Any, attn_implementation: str, experts: str | None
) -> Any:
    """The model with its first `n_layers` decoder layers (fake tensors: call in the fake mode)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(anatomy.hf_config)
    full = int(cfg.num_hidden_layers)
    cfg.num_hidden_layers = n_layers
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == full:
        cfg.layer_types = layer_types[:n_layers]
    pad = getattr(cfg, "pad_token_id", None)
    if isinstance(pad, int) and pad >= cfg.vocab_size:
        cfg.pad_token_id = None
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if experts is not None:
        kwargs["experts_implementation"] = experts
    auto: Any = AutoModelForCausalLM  # untyped upstream
    return auto.from_config(cfg, **kwargs).eval()


def _run(model: Any, first: dict[str, int], head_entry: str, batch: int, tokens: int) -> _Run:
    """One prefill forward under `LiveBytes`, with marks around the first unit of each kind."""
    import torch
    from transformers import DynamicCache

    no_split = set(model._no_split_modules or ())
    blocks = [m for m in model.modules() if type(m).__name__ in no_split]
    tracker = LiveBytes()
    handles = []
    for kind, index in first.items():
        block = blocks[index]
        handles.append(block.register_forward_pre_hook(_entry(tracker, kind, index == 0),
                                                       with_kwargs=True))  # fmt: skip
        handles.append(block.register_forward_hook(lambda *_, k=kind: tracker.mark(k + ">")))
    handles.append(model.get_submodule(head_entry).register_forward_pre_hook(
        lambda *_: tracker.mark("head<")))  # fmt: skip
    kwargs: dict[str, Any] = {"use_cache": True, "cache": DynamicCache(config=model.config)}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # what generate passes (GenerationMixin._prefill)
    try:
        with torch.no_grad(), tracker:
            ids = torch.zeros(batch, tokens, dtype=torch.long)
            positions = torch.arange(tokens).expand(batch, tokens).contiguous()
            out = model(input_ids=ids, position_ids=positions, **kwargs)
        tracker.mark("head>")
    except Exception as exc:
        raise TraceError(f"the forward failed on fake tensors: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
    del out  # the logits die after the last event: nothing changes
    cached = [t for layer in kwargs["cache"].layers for t in vars(layer).values()
              if isinstance(t, torch.Tensor)]  # fmt: skip
    exclude = {i for i in map(tracker.index_of, cached) if i is not None}
    windows = {k: (tracker.marks[k + "<"], tracker.marks[k + ">"]) for k in [*first, "head"]}
    entries = {k: _live_at(tracker, start, exclude) for k, (start, _) in windows.items()}
    return _Run(tracker.ops, tracker.timeline(exclude), windows, entries)


def _run_all(
    model: Any, first: dict[str, int], head_entry: str, points: tuple[tuple[int, int], ...]
) -> list[_Run]:
    """`_run` at every (batch, T) point, in order. The runs are independent and CPU-bound: where
    `_can_fork`, a forked child runs every other point meanwhile (on two cores the trace of
    GLM-4.5-Air's two kinds takes 0.35 s instead of 0.52 s, GLM-4-9B's 0.24 s instead of 0.35 s).
    The child shares the fake model by fork, sends its runs back pickled through a pipe and ends
    with `os._exit` (nothing of the parent's runs in it); if it fails or dies, the parent runs its
    points itself."""
    if not _can_fork():
        return [_run(model, first, head_entry, batch, tokens) for batch, tokens in points]
    theirs = points[1::2]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as out:
                pickle.dump([_run(model, first, head_entry, b, t) for b, t in theirs], out)
            code = 0
        finally:
            os._exit(code)  # also on any error or interrupt: the parent runs them itself
    os.close(write_end)
    try:
        mine = [_run(model, first, head_entry, b, t) for b, t in points[0::2]]
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        with os.fdopen(read_end, "rb") as received:
            data = received.read()
        _, status = os.waitpid(pid, 0)
    if status == 0:
        sent: list[_Run] = pickle.loads(data)  # our own child's runs
    else:
        sent = [_run(model, first, head_entry, b, t) for b, t in theirs]
    return [(sent if i % 2 else mine)[i // 2] for i in range(len(points))]


def _can_fork() -> bool:
    """Whether `_run_all` may fork: Linux (fork after importing torch is not safe on macOS), two
    or more usable cores, and no other thread (a fork copies locks that another thread may hold)."""
    return (
        sys.platform == "linux"
        and len(os.sched_getaffinity(0)) >= 2
        and threading.active_count() == 1
    )


def _entry(tracker: LiveBytes, kind: str, clone: bool) -> Any:
    """Pre-hook: layer 0 gets a copy of its input, as if an earlier block had produced it."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if clone:
            if args:
                args = (args[0].clone(), *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].clone()}
        tracker.mark(kind + "<")
        return args, kwargs

    return hook


def _head_entry(anatomy: Anatomy) -> str:
    """The first unit after the last decoder block in forward order: the final norm (or head)."""
    last = max(i for i, unit in enumerate(anatomy.units) if unit.kind == "block")
    for unit in anatomy.units[last + 1 :]:
        if unit.kind in ("norm", "head", "other") and unit.modules:
            return unit.name
    raise TraceError("no final norm or head after the decoder blocks")


def _live_at(tracker: LiveBytes, step: int, exclude: set[int]) -> int:
    """Live bytes when op `step` is about to run (born before it, not dead by then)."""
    return sum(
        life.nbytes
        for i, life in enumerate(tracker.lives)
        if i not in exclude and life.birth < step and (life.death is None or life.death > step)
    )


def _window(run: _Run, kind: str) -> tuple[list[str], list[int]]:
    """The unit's ops and the live bytes after each (`prim` ops, which allocate nothing and come
    and go with tensor layouts, left out)."""
    start, end = run.windows[kind]
    steps = [j for j in range(start, end) if not run.ops[j].startswith("prim.")]
    return [run.ops[j] for j in steps], [run.live[j] for j in steps]


_INVERSE: tuple[list[list[int]], int] | None = None  # inverse of the GRID basis: rows, divisor


def _fit(values: list[int]) -> Polynomial:
    """The integer polynomial through `values` at the `GRID` points."""
    global _INVERSE
    if _INVERSE is None:
        inverse = _invert([[Fraction(v) for v in _basis(b, t)] for b, t in GRID])
        denominator = math.lcm(*(v.denominator for row in inverse for v in row))
        _INVERSE = [[int(v * denominator) for v in row] for row in inverse], denominator
    rows, denominator = _INVERSE
    scaled = [sum(a * v for a, v in zip(row, values, strict=True)) for row in rows]
    if any(c % denominator for c in scaled):
        raise TraceError("live bytes are not an integer polynomial in (batch, T)")
    return Polynomial(*(c // denominator for c in scaled))


def _basis(batch: int, tokens: int) -> list[int]:
    # Same order as Polynomial's fields
    return [batch * tokens, batch * tokens**2, batch, tokens, tokens**2, 1]


def _invert(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """Gauss-Jordan inverse in exact arithmetic (6×6)."""
    n = len(matrix)
    rows = [[*row, *(Fraction(int(i == j)) for j in range(n))] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    return [row[n:] for row in rows]


def _envelope(polys: list[Polynomial]) -> list[Polynomial]:
    """The polynomials no other one dominates coefficient by coefficient (all terms ≥ 0)."""
    unique = sorted(set(polys), key=lambda p: p.coefficients(), reverse=True)
    kept: list[Polynomial] = []
    for p in unique:
        if not any(q.dominates(p) for q in kept):
            kept.append(p)
    return kept


def _attention_kernel(ops: set[str], attn_implementation: str) -> str:
    """Which attention kernel the trace ran, from the aten ops seen."""
    if any("flash_attention" in op for op in ops):
        return "flash"
    if any("efficient_attention" in op for op in ops):
        return "efficient"
    return "eager" if attn_implementation == "eager" else "math"
