"""`glmdeploy report <sweep dir>`: one row per job's run record, as Markdown, CSV and a plot.

Hydra writes sweep jobs into numbered subdirectories (`0/`, `1/`, …), each with its `run.json`.
The swept values are the overrides that differ between jobs; the results are read from the
records' `plan` (`Plan.to_dict()`) and `results` (`load`: `LoadedModel.to_dict()`, `generate`:
`GenerateResult.to_dict()`, `bench`: `BenchResult.to_dict()`, `vllm`: `VllmExport.to_dict()` of
`export vllm` and `plan engine=vllm`), tolerating whatever a job lacks.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmdeploy import atomic
from glmdeploy.config.settings import GIB
from glmdeploy.outputs import check_file
from glmdeploy.problems import ConfigError, GlmDeployError, Problem
from glmdeploy.records.record import RUN_JSON, RunRecord, read_record

REPORT_MD, REPORT_CSV, REPORT_PNG = "report.md", "report.csv", "report.png"


@dataclass(frozen=True)
class Row:
    """One job of a sweep: what it varied and what it gave (None: the job has no such result)."""

    job: str  # the job's directory name: Hydra's job number
    status: str  # running | ok | failed | interrupted | unreadable | not started
    swept: dict[str, str]  # swept key -> this job's value ("" when the job does not set it)
    fits: bool | None = None
    max_utilisation: float | None = None
    hops: int | None = None
    gpus_used: int | None = None
    load_s: float | None = None
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    peak_gib: dict[str, float] = field(default_factory=dict)  # device -> peak memory in GiB
    error: str | None = None
    # `export vllm` / `plan engine=vllm`: vLLM's fit check (None for other jobs)
    vllm_largest_max_model_len: int | None = None
    vllm_concurrency: float | None = None  # at the job's max-model-len, as vLLM logs it
    vllm_min_gpu_memory_utilization: float | None = None


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    csv: Path
    png: Path


def collect_rows(sweep_dir: Path | str) -> list[Row]:
    """A row per job directory holding a `run.json`, in job order (or the run itself).

    Raises:
        ConfigError: `sweep_dir` is missing or holds no run record.
    """
    root = Path(sweep_dir)
    dirs = sorted((p.parent for p in root.glob(f"*/{RUN_JSON}")), key=_job_order)
    if not dirs and (root / RUN_JSON).is_file():
        dirs = [root]  # a single run directory
    listed = _listed_jobs(root)
    if not dirs and not listed:
        what = "holds no job with a run.json" if root.is_dir() else "does not exist"
        hint = "give the directory of a `glmdeploy … -m` sweep, e.g. multirun/2025-01-31/12-00-00"
        problem = Problem(
            str(root),
            f"the sweep directory {what}",
            f"numbered job directories (0/, 1/, …) with {RUN_JSON}",
            hint,
        )
        raise ConfigError([problem], "nothing to report")
    records: list[tuple[str, RunRecord | str]] = []
    for job_dir in dirs:
        try:
            records.append((job_dir.name, read_record(job_dir)))
        except GlmDeployError as exc:
            where = Path(exc.problems[0].path).name  # run.json, or run.json:results
            records.append((job_dir.name, f"{where}: {exc.problems[0].message}"))
    started = {name for name, _ in records}
    waiting = [(str(num), overrides) for num, overrides in listed if str(num) not in started]
    planned = {str(num): overrides for num, overrides in listed}  # an unreadable job's too
    swept = swept_values(
        [r.overrides if isinstance(r, RunRecord) else planned.get(n, []) for n, r in records]
        + [overrides for _, overrides in waiting]
    )
    rows = [
        _row(name, rec, values) if isinstance(rec, RunRecord) else _broken(name, rec, values)
        for (name, rec), values in zip(records, swept, strict=False)
    ]
    rows += [
        Row(job=name, status="not started", swept=values)
        for (name, _), values in zip(waiting, swept[len(records) :], strict=True)
    ]
    return sorted(rows, key=lambda row: _job_order(Path(row.job)))


def _listed_jobs(root: Path) -> list[tuple[int, list[str]]]:
    """The jobs `sweep.json` lists (checked against its schema), or none without one."""
    from glmdeploy.formats import read_document

    path = root / "sweep.json"
    if not path.exists():
        return []
    data = read_document(path, "sweep", title="not a glmdeploy sweep directory")
    return [(int(job["num"]), list(job["overrides"])) for job in data["jobs"]]


def swept_values(overrides: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    """Per job, the value of every override key whose value differs across the jobs."""
    parsed = [dict(_split(o) for o in job) for job in overrides]
    keys = list(dict.fromkeys(k for job in parsed for k in job))
    varied = [k for k in keys if len({job.get(k) for job in parsed}) > 1]
    return [{k: job.get(k, "") for k in varied} for job in parsed]


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _job_order(path: Path) -> tuple[int, str]:
    name = path.name
    return (int(name), "") if name.isdigit() else (1 << 62, name)


def _row(job: str, record: RunRecord, swept: dict[str, str]) -> Row:
    plan, results = record.plan or {}, record.results
    bench, load = _section(results, "bench"), _section(results, "load")
    vllm = _section(results, "vllm")
    fit = _section(vllm, "fit")
    gpu_rows = [r for r in plan.get("rows", []) if isinstance(r.get("device"), int)]
    return Row(
        job=job,
        status=record.status,
        swept=swept,
        fits=plan.get("fits") if plan else vllm.get("ok"),
        max_utilisation=plan.get("max_utilisation") if plan else None,
        hops=len(plan.get("hops", [])) if plan else None,
        gpus_used=sum(1 for r in gpu_rows if r.get("weights_bytes", 0) > 0) if plan else None,
        load_s=_number(bench.get("load_seconds", load.get("load_seconds"))),
        ttft_s=_number(bench.get("ttft_seconds")),
        decode_tokens_per_s=_number(bench.get("decode_tokens_per_s")),
        peak_gib=_peaks(bench.get("memory") or []),
        error=_error_text(record.error) if record.status != "ok" else None,
        vllm_largest_max_model_len=fit.get("largest_max_model_len"),
        vllm_concurrency=_number(fit.get("concurrency")),
        vllm_min_gpu_memory_utilization=_number(fit.get("min_gpu_memory_utilization")),
    )


def _broken(job: str, why: str, swept: dict[str, str]) -> Row:
    return Row(job=job, status="unreadable", swept=swept, error=why)


def _section(results: Mapping[str, Any], step: str) -> Mapping[str, Any]:
    value = results.get(step)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _peaks(memory: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Peak memory per device: what the allocator reserved (GPUs), else the process's peak RSS."""
    peaks: dict[str, float] = {}
    for entry in memory:
        for key in ("peak_reserved_bytes", "peak_allocated_bytes", "peak_rss_bytes"):
            if isinstance(entry.get(key), int):
                peaks[str(entry.get("device"))] = entry[key] / GIB
                break
    return peaks


def _error_text(error: Mapping[str, Any] | None) -> str | None:
    if not error:
        return None
    title = str(error.get("title", "error"))
    problems = error.get("problems") or []
    if problems:
        first = problems[0]
        where = f"{first.get('path')}: " if first.get("path") else ""
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{title}: {where}{first.get('message', '')}{more}"
    return f"{title}: {error['message']}" if error.get("message") else title


Column = tuple[str, Callable[[Row], Any], Callable[[Any], str]]


def columns(rows: Sequence[Row]) -> list[Column]:
    """The table's columns: header, the raw value of a row, and its text for Markdown."""
    swept = list(dict.fromkeys(k for r in rows for k in r.swept))
    devices = list(dict.fromkeys(d for r in rows for d in r.peak_gib))
    plain: Callable[[Any], str] = str
    vllm: list[Column] = [
        ("vllm_largest_max_model_len", lambda r: r.vllm_largest_max_model_len, plain),
        ("vllm_concurrency", lambda r: r.vllm_concurrency, lambda v: f"{v:.2f}x"),
        ("vllm_min_gpu_memory_utilization", lambda r: r.vllm_min_gpu_memory_utilization, plain),
    ]

    def num(digits: int) -> Callable[[Any], str]:
        return lambda v: f"{v:.{digits}f}"

    return [
        ("job", lambda r: r.job, plain),
        ("status", lambda r: r.status, plain),
        *[(k, lambda r, k=k: r.swept.get(k, ""), plain) for k in swept],
        ("fits", lambda r: r.fits, lambda v: "yes" if v else "no"),
        ("max_utilisation", lambda r: r.max_utilisation, lambda v: f"{v:.1%}"),
        ("hops", lambda r: r.hops, plain),
        ("gpus_used", lambda r: r.gpus_used, plain),
        ("load_s", lambda r: r.load_s, num(2)),
        ("ttft_s", lambda r: r.ttft_s, num(4)),
        ("decode_tokens_per_s", lambda r: r.decode_tokens_per_s, num(1)),
        *[(f"peak_gib[{d}]", lambda r, d=d: r.peak_gib.get(d), num(3)) for d in devices],
        *(vllm if any(r.vllm_concurrency is not None for r in rows) else []),
        ("error", lambda r: r.error, plain),
    ]


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (empty cells where a job has no such result)."""
    cols = columns(rows)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [("" if get(row) is None else text(get(row))) for _, get, text in cols]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Row]) -> str:
    """The rows as CSV, numbers unformatted (utilisation as a fraction)."""
    cols = columns(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([h for h, _, _ in cols])
    writer.writerows([["" if get(r) is None else get(r) for _, get, _ in cols] for r in rows])
    return out.getvalue()


def write_report(sweep_dir: Path | str) -> ReportPaths:
    """Write `report.md`, `report.csv` and `report.png` into the sweep directory.

    Raises:
        ConfigError: nothing to report (see `collect_rows`).
        OutputError: one of the three cannot be written (nothing is written then).
    """
    root = Path(sweep_dir)
    rows = collect_rows(root)
    paths = ReportPaths(root / REPORT_MD, root / REPORT_CSV, root / REPORT_PNG)
    for path in (paths.markdown, paths.csv, paths.png):  # all writable, or none is written
        check_file(path, f"the report ({path.name})", hint="write the report where you can: "
                   "move or remove what is in the way, or copy the sweep directory")  # fmt: skip
    title = f"# glmdeploy report: {root}\n\n{len(rows)} job(s), {_counts(rows)}.\n\n"
    atomic.write_text(paths.markdown, title + markdown(rows))
    atomic.write_text(paths.csv, csv_text(rows))
    save_report_plot(rows, paths.png)
    return paths


def _counts(rows: Sequence[Row]) -> str:
    statuses = list(dict.fromkeys(r.status for r in rows))
    return ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in statuses)


def save_report_plot(rows: Sequence[Row], path: Path) -> None:
    """Bars per job: the plan's peak utilisation (its binding device's) and, when measured, decode
    tokens/s; failures marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[tuple[str, Callable[[Row], float | None]]] = [
        ("max utilisation (%)", lambda r: _percent(r.max_utilisation)),
    ]
    if any(r.decode_tokens_per_s is not None for r in rows):
        panels.append(("decode tokens/s", lambda r: r.decode_tokens_per_s))
    if any(r.vllm_concurrency is not None for r in rows):  # export vllm / plan engine=vllm
        panels.append(("vLLM max concurrency (x)", lambda r: r.vllm_concurrency))
        if all(r.max_utilisation is None for r in rows):
            panels.pop(0)
    width = max(5.0, 0.9 * len(rows) + 2.0)
    fig = Figure(figsize=(width, 3.2 * len(panels) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)  # the object-oriented API: no pyplot, no global figure state
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    xs = list(range(len(rows)))
    for ax, (label, value) in zip(axes[:, 0], panels, strict=True):
        for x, row in zip(xs, rows, strict=True):
            y = value(row)
            ok = row.status == "ok"
            if y is not None:
                ax.bar(x, y, 0.6, color="#4C72B0" if ok else "#C44E52", hatch="" if ok else "//")
            note = row.status if not ok else ("not measured" if y is None else "")
            colour = "#C44E52" if not ok else "grey"
            ax.text(x, y or 0, note, ha="center", va="bottom", color=colour, fontsize=8,
                    rotation=90 if y is None else 0, clip_on=True)  # fmt: skip
        if label.startswith("max utilisation"):
            ax.axhline(100, color="black", linewidth=1, linestyle="--")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_ylim(bottom=0)  # bars start at 0; the status notes stand there
        ax.set_ylabel(label, fontsize=9)
    ticks = [_tick(r) for r in rows]
    wide = max((len(line) for t in ticks for line in t.splitlines()), default=0) * len(rows) > 100
    axes[-1, 0].set_xticks(xs, ticks, fontsize=7, rotation=30 if wide else 0,
                           ha="right" if wide else "center")  # fmt: skip
    axes[0, 0].set_title(f"glmdeploy sweep: {len(rows)} job(s), {_counts(rows)}", fontsize=10)
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=110)


def _percent(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else 100 * value


def _tick(row: Row) -> str:
    return "\n".join([f"job {row.job}", *(f"{k}={v}" for k, v in row.swept.items())])
