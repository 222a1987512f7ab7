"""A placement plan as data: device map, per-device budget rows, hops, and what it was computed for.

Plans are frozen, serialise to JSON-friendly dicts (`to_dict`/`from_dict`) and carry a
`Fingerprint` of their inputs, so that a saved plan is refused, with the reason, when it is applied
to another model, precision, runtime or fleet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from glmdeploy.config.settings import GIB
from glmdeploy.planning.workspace_term import WorkspaceTerm
from glmdeploy.problems import DoesNotFitError, Problem

DeviceKey = int | str  # a physical GPU id, "cpu" or "disk"
PLAN_FORMAT = "glmdeploy.plan/1"


@dataclass(frozen=True)
class DeviceSpec:
    """A device the planner may use.

    Attributes:
        key: the physical GPU id (as nvidia-smi and `gpus.ids` number it), "cpu" or "disk".
        physical_id: the physical GPU id; None for cpu/disk.
        name: e.g. "NVIDIA RTX 3090".
        capacity_bytes: total memory (GPUs; `gpus.max_memory_gib` caps are applied by the
            planner), RAM the plan may use (cpu), or free space (disk; 0 means unknown).
        compute_capability: a GPU's (major, minor): `precision.dtype=auto` resolves by it.
    """

    key: DeviceKey
    physical_id: int | None
    name: str
    capacity_bytes: int
    compute_capability: tuple[int, int] = (8, 0)


@dataclass(frozen=True)
class BudgetRow:
    """One device's share of the plan (bytes).

    `total_bytes` = weights + kv + workspace + reserve. `utilisation` = (total − reserve) /
    (capacity − reserve): the plan fits when it is ≤ 1 on every GPU (inf: no budget left at all).
    """

    device: DeviceKey
    physical_id: int | None
    name: str
    units: str  # e.g. "model.embed_tokens, model.rotary_emb, model.layers.0-13"
    n_params: int
    weights_bytes: int
    kv_bytes: int
    workspace_bytes: int
    reserve_bytes: int
    total_bytes: int
    capacity_bytes: int
    utilisation: float
    rank: int | None = None  # parallel plans: the rank this row budgets (`Plan.parallel`)


@dataclass(frozen=True)
class RankShare:
    """Where one rank of a tensor/pipeline-parallel plan runs and which layers its stage holds."""

    rank: int
    node: int  # torchrun's group rank
    local_rank: int  # the rank's index on its node: GPU cuda:<local_rank>
    stage: int  # pipeline stage
    tp_rank: int  # index within the stage's tensor-parallel group
    layers: tuple[int, int]  # decoder layers [start, end) of its stage


@dataclass(frozen=True)
class ParallelLayout:
    """How a parallel plan splits the model: `rows[i]` of the plan budgets `ranks[i]`.

    `split` lists the parameters divided across a stage's tensor-parallel ranks (name, global
    shape, rank 0's shard, what is split), `replicated` the parameters and buffers every rank
    holds whole; both by wildcard name (`model.layers.*.…`).
    """

    tp_size: int
    pp_size: int
    nnodes: int
    backend: str  # gloo (CPU ranks) or nccl (GPU ranks)
    ranks: tuple[RankShare, ...]
    split: tuple[str, ...] = ()
    replicated: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParallelLayout:
        return cls(
            tp_size=int(data["tp_size"]),
            pp_size=int(data["pp_size"]),
            nnodes=int(data["nnodes"]),
            backend=str(data["backend"]),
            ranks=tuple(RankShare(**{**r, "layers": tuple(r["layers"])}) for r in data["ranks"]),
            split=tuple(data.get("split", ())),
            replicated=tuple(data.get("replicated", ())),
        )


@dataclass(frozen=True)
class Hop:
    """A device change between consecutive units in forward order."""

    before: str  # the last unit on `source`
    after: str  # the first unit on `target`
    source: DeviceKey
    target: DeviceKey


@dataclass(frozen=True)
class Fingerprint:
    """What a plan was computed for."""

    config_hash: str
    model_class: str
    dtype: str
    quantization: str
    kv_cache_dtype: str
    max_context_tokens: int
    batch_size: int
    devices: tuple[tuple[DeviceKey, int], ...]  # (key, capacity in bytes after caps), in order

    def mismatches(self, current: Fingerprint) -> list[Problem]:
        """Why a plan with this fingerprint must not be applied to `current` (empty: it may)."""
        hint = (
            "plan again (`glmdeploy plan … --save`) or restore the settings the plan was made for"
        )
        checks = [
            ("model", "model architecture", self._model(), current._model()),
            ("precision.dtype", "dtype", self.dtype, current.dtype),
            ("precision.quantization", "quantization", self.quantization, current.quantization),
            ("runtime.kv_cache_dtype", "KV cache dtype", self.kv_cache_dtype,
             current.kv_cache_dtype),
            ("runtime.max_context_tokens", "context", self.max_context_tokens,
             current.max_context_tokens),
            ("runtime.batch_size", "batch size", self.batch_size, current.batch_size),
            ("gpus", "GPUs", _gpus(self.devices), _gpus(current.devices)),
            ("placement.offload", "offload devices", _offload(self.devices),
             _offload(current.devices)),
        ]  # fmt: skip
        return [
            Problem(
                path,
                f"the saved plan was made for {what} {_show(old)}, this run has {_show(new)}",
                hint=hint,
            )
            for path, what, old, new in checks
            if old != new
        ]

    def _model(self) -> str:
        return f"{self.model_class} {self.config_hash}"


def _gpus(devices: tuple[tuple[DeviceKey, int], ...]) -> tuple[tuple[DeviceKey, int], ...]:
    """The GPUs and their capacities: a plan is valid for exactly these."""
    return tuple((k, c) for k, c in devices if isinstance(k, int))


def _offload(devices: tuple[tuple[DeviceKey, int], ...]) -> str:
    """cpu/disk by name only: free RAM and disk space change from run to run."""
    return ", ".join(str(k) for k, _ in devices if not isinstance(k, int)) or "none"


def _show(value: object) -> str:
    if not isinstance(value, tuple):
        return str(value)
    if not value:
        return "no GPU"
    return ", ".join(
        f"{'GPU ' if isinstance(k, int) else ''}{k} ({c / GIB:.3g} GiB)" for k, c in value
    )


@dataclass(frozen=True)
class Verdict:
    """Whether a plan fits, decided once (`glmdeploy.planning.budget.judge`) and shown everywhere:
    the table's verdict line, JSON, run records, reports, pictures, fit advice and doctor.

    Attributes:
        fits: every unit is placed where it may go and every device with a budget is within it.
        device: the binding device: the row with the highest utilisation among those with a
            budget (every GPU; cpu/disk when their capacity is known); None when none has one.
        utilisation: that row's utilisation (the table's `used`); 0.0 when `device` is None.
        sentence: the verdict in one line, for humans.
    """

    fits: bool
    device: DeviceKey | None
    utilisation: float
    sentence: str


@dataclass(frozen=True)
class Plan:
    """A placement and its memory budget.

    Attributes:
        strategy: the `placement.strategy` that produced it.
        device_map: unit name -> device key, in forward order (GPUs by physical id).
        rows: one per selected GPU (empty ones included), then cpu/disk when used.
        hops: device changes along the forward order.
        verdict: fits or not, the binding device and its utilisation, in one sentence.
        notes: explanations (auto's choice, tied weights, offload cost, …).
        fingerprint: what it was computed for.
        offloaded_bytes: weight bytes on cpu/disk, streamed to the execution GPU every forward
            pass (every generated token).
        parallel: tensor/pipeline-parallel plans: the ranks (one row each); None for device maps.
        workspace: how the workspace column was obtained; None for weights-only plans.
    """

    strategy: str
    device_map: Mapping[str, DeviceKey]
    rows: tuple[BudgetRow, ...]
    hops: tuple[Hop, ...]
    verdict: Verdict
    notes: tuple[str, ...]
    fingerprint: Fingerprint
    offloaded_bytes: int = 0
    parallel: ParallelLayout | None = None
    workspace: WorkspaceTerm | None = None

    @property
    def fits(self) -> bool:
        return self.verdict.fits

    @property
    def max_utilisation(self) -> float:
        """The binding device's utilisation (GPUs, and cpu/disk where their capacity is known)."""
        return self.verdict.utilisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite utilisations become None).

        `fits` and `max_utilisation` repeat the verdict's, for readers that want just those.
        """
        out = asdict(self)
        out["format"] = PLAN_FORMAT
        out["device_map"] = [[name, dev] for name, dev in self.device_map.items()]
        out["verdict"]["utilisation"] = _finite(self.verdict.utilisation)
        out["fits"] = self.verdict.fits
        out["max_utilisation"] = _finite(self.verdict.utilisation)
        for row in out["rows"]:
            row["utilisation"] = _finite(row["utilisation"])
        out["fingerprint"]["devices"] = [list(d) for d in self.fingerprint.devices]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The inverse of `to_dict`; raises ValueError on another format."""
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a {PLAN_FORMAT} plan (format: {data.get('format')!r})")
        fp = dict(data["fingerprint"])
        fp["devices"] = tuple((k, int(c)) for k, c in fp["devices"])
        return cls(
            strategy=str(data["strategy"]),
            device_map={str(n): d for n, d in data["device_map"]},
            rows=tuple(
                BudgetRow(**{**r, "utilisation": _infinite(r["utilisation"])}) for r in data["rows"]
            ),
            hops=tuple(Hop(**h) for h in data["hops"]),
            verdict=_verdict(data),
            notes=tuple(data["notes"]),
            fingerprint=Fingerprint(**{f.name: fp[f.name] for f in fields(Fingerprint)}),
            offloaded_bytes=int(data.get("offloaded_bytes", 0)),
            parallel=ParallelLayout.from_dict(data["parallel"]) if data.get("parallel") else None,
            workspace=WorkspaceTerm.from_dict(data["workspace"]) if data.get("workspace") else None,
        )


class PlanDoesNotFit(DoesNotFitError):
    """No placement fits: the problems give the shortfall, then the fixes, cheapest first; `plan`
    is the best one."""

    ranked = True

    def __init__(self, problems: Sequence[Problem], plan: Plan) -> None:
        super().__init__(problems)
        self.plan = plan


def _verdict(data: Mapping[str, Any]) -> Verdict:
    """The saved verdict; plans saved before verdicts existed keep their fits/max_utilisation."""
    saved = data.get("verdict")
    if saved is None:
        fits = bool(data["fits"])
        return Verdict(fits, None, _infinite(data["max_utilisation"]),
                       "fits" if fits else "does not fit")  # fmt: skip
    return Verdict(bool(saved["fits"]), saved["device"], _infinite(saved["utilisation"]),
                   str(saved["sentence"]))  # fmt: skip


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _infinite(value: float | None) -> float:
    return math.inf if value is None else float(value)


def device_map_for_transformers(plan: Plan) -> dict[str, int | str]:
    """The `device_map` for `from_pretrained`, GPUs as physical ids (map them to logical ids).

    Every unit is named, tied ones included, so transformers' own checks pass unchanged.
    """
    return dict(plan.device_map)


def device_label(device: DeviceKey, logical: int | None = None) -> str:
    """How glmdeploy names a device: `GPU 2` (physical id), `GPU 2 → cuda:0` when the logical id
    this process uses is known, `cpu`, `disk`."""
    if not isinstance(device, int):
        return str(device)
    return f"GPU {device}" + (f" → cuda:{logical}" if logical is not None else "")


def summarise(names: Iterable[str]) -> str:
    """`a, model.layers.0, model.layers.1, model.layers.2, b` -> `a, model.layers.0-2, b`."""
    parts: list[str] = []
    run: tuple[str, int, int] | None = None
    for name in names:
        match = re.fullmatch(r"(.*\.)(\d+)", name)
        if match and run and run[0] == match.group(1) and run[2] + 1 == int(match.group(2)):
            run = (run[0], run[1], int(match.group(2)))
            continue
        if run:
            parts.append(_run_text(run))
        run = (match.group(1), int(match.group(2)), int(match.group(2))) if match else None
        if not match:
            parts.append(name)
    if run:
        parts.append(_run_text(run))
    return ", ".join(parts)


def _run_text(run: tuple[str, int, int]) -> str:
    prefix, first, last = run
    return f"{prefix}{first}" if first == last else f"{prefix}{first}-{last}"
