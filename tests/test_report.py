"""`glmdeploy report`: a row per job of a sweep, swept values as columns, failed jobs kept."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.config.deployments import load_deployment
from glmdeploy.config.settings import GIB
from glmdeploy.inference.runner import BenchResult, DeviceMemory
from glmdeploy.loading.verify import DeviceBytes
from glmdeploy.planning.deployment_plan import plan_deployment
from glmdeploy.planning.types import Plan
from glmdeploy.problems import ConfigError, LoadError, Problem
from glmdeploy.records.record import RecordWriter, RunRecord
from glmdeploy.records.report import collect_rows, markdown, swept_values, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV: dict[str, Any] = {"python": "3.11.9", "packages": {}, "gpus": [], "env": {}}


@pytest.fixture(scope="module")
def plan() -> Plan:
    return plan_deployment(load_deployment(["gpus=2x24gib"]).deployment).plan


def bench(tokens_per_s: float) -> dict[str, Any]:
    return BenchResult(
        repeats=3,
        batch_size=1,
        prompt_tokens=5,
        new_tokens=8,
        load_seconds=1.25,
        ttft_seconds=0.02,
        decode_tokens_per_s=tokens_per_s,
        ttft_runs=(0.02, 0.02, 0.02),
        decode_runs=(tokens_per_s,) * 3,
        memory=(DeviceMemory("cuda:0", GIB, 2 * GIB), DeviceMemory("cpu", peak_rss_bytes=GIB)),
        device_bytes=(DeviceBytes(0, 0, 100, 100),),
    ).to_dict()


def write_job(
    root: Path, job: str, overrides: list[str], plan: Plan, outcome: str, tokens_per_s: float = 0
) -> None:
    record = RunRecord("bench", {"job": job}, overrides, environment=dict(ENV))
    writer = RecordWriter(root / job).start(record)
    writer.save_plan(plan)
    if outcome == "ok":
        writer.finish("ok", results={"bench": bench(tokens_per_s)})
    elif outcome == "plan-only":
        writer.finish("ok")
    else:
        problems = [Problem("model.source.path", "no weights found"), Problem("x", "more")]
        writer.finish("failed", error=LoadError(problems))


@pytest.fixture
def sweep(tmp_path: Path, plan: Plan) -> Path:
    const = "gpus=2x24gib"
    write_job(tmp_path, "0", [const, "precision=fp16", "placement=auto"], plan, "ok", 120.0)
    write_job(tmp_path, "1", [const, "precision=bf16", "placement=auto"], plan, "ok", 100.0)
    write_job(tmp_path, "2", [const, "precision=fp16", "placement=balanced"], plan, "failed")
    write_job(tmp_path, "3", [const, "precision=bf16", "placement=balanced"], plan, "plan-only")
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "notes").mkdir()  # not a run: ignored
    return tmp_path


def test_a_row_per_job_with_swept_values_and_results(sweep: Path) -> None:
    rows = collect_rows(sweep)
    assert [r.job for r in rows] == ["0", "1", "2", "3"]
    assert [r.status for r in rows] == ["ok", "ok", "failed", "ok"]
    assert rows[0].swept == {"precision": "fp16", "placement": "auto"}  # gpus is not swept
    first = rows[0]
    assert first.fits is True and first.hops == 0 and first.gpus_used == 1
    assert first.max_utilisation is not None and 0 < first.max_utilisation < 0.01
    assert (first.load_s, first.ttft_s, first.decode_tokens_per_s) == (1.25, 0.02, 120.0)
    assert first.peak_gib == {"cuda:0": 2.0, "cpu": 1.0}
    assert rows[2].error == "cannot load the model: model.source.path: no weights found (+1 more)"
    plan_only = rows[3]
    assert plan_only.decode_tokens_per_s is None and plan_only.peak_gib == {}
    assert plan_only.fits is True and plan_only.error is None


def test_report_files_markdown_csv_and_plot(sweep: Path) -> None:
    paths = write_report(sweep)
    text = paths.markdown.read_text()
    assert "4 job(s), 3 ok, 1 failed" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4
    assert table[0].startswith("| job | status | precision | placement | fits | max_utilisation")
    assert "| 2 | failed | fp16 | balanced |" in table[4]
    assert "cannot load the model" in table[4]
    rows = list(csv.DictReader(io.StringIO(paths.csv.read_text())))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    assert rows[1]["decode_tokens_per_s"] == "100.0" and rows[3]["decode_tokens_per_s"] == ""
    assert rows[0]["peak_gib[cuda:0]"] == "2.0"
    assert paths.png.read_bytes().startswith(PNG_MAGIC)
    assert not [p.name for p in sweep.iterdir() if p.name.startswith(".")]


def test_unreadable_records_are_rows_and_jobs_sort_by_number(sweep: Path) -> None:
    (sweep / "10").mkdir()
    (sweep / "10" / "run.json").write_text("{oops")
    rows = collect_rows(sweep)
    assert [r.job for r in rows] == ["0", "1", "2", "3", "10"]
    assert rows[-1].status == "unreadable" and "cannot read the run record" in str(rows[-1].error)
    assert "| 10 | unreadable |" in markdown(rows)


def test_a_plot_of_nothing_but_unreadable_records_is_drawn_without_warnings(sweep: Path) -> None:
    """Rotated status notes on empty axes collapsed matplotlib's layout (a UserWarning on stderr,
    the notes outside the picture)."""
    import warnings

    for n in range(4):
        (sweep / str(n) / "run.json").write_text("{oops")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(sweep)
    assert paths.png.read_bytes().startswith(PNG_MAGIC)


def test_an_unreadable_record_keeps_its_swept_values_and_says_which_field(sweep: Path) -> None:
    import json

    def overrides(n: int) -> Any:
        return json.loads((sweep / str(n) / "run.json").read_text())["overrides"]

    jobs = [{"num": n, "overrides": overrides(n)} for n in range(4)]
    (sweep / "sweep.json").write_text(json.dumps({"command": "plan", "jobs": jobs}))
    broken = json.loads((sweep / "1" / "run.json").read_text())
    broken["results"] = None
    (sweep / "1" / "run.json").write_text(json.dumps(broken))
    rows = collect_rows(sweep)
    assert rows[1].status == "unreadable"
    assert rows[1].swept == {"precision": "bf16", "placement": "auto"}  # from sweep.json
    assert rows[1].error == "run.json:results: found null"  # the field, not only "found null"


def test_a_report_that_cannot_be_written_is_an_output_error(sweep: Path) -> None:
    from glmdeploy.problems import OutputError

    (sweep / "report.csv").mkdir()  # in the way: was an internal error after report.md was written
    with pytest.raises(OutputError, match="cannot write the output") as err:
        write_report(sweep)
    assert err.value.problems[0].message == "the report (report.csv) is a directory"
    assert not (sweep / "report.md").exists() and not (sweep / "report.png").exists()


def test_a_single_run_directory_reports_one_row(tmp_path: Path, plan: Plan) -> None:
    write_job(tmp_path, "run", ["precision=bf16"], plan, "ok", 50.0)
    rows = collect_rows(tmp_path / "run")
    assert [(r.job, r.status, r.swept) for r in rows] == [("run", "ok", {})]


def test_an_empty_or_missing_sweep_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        collect_rows(tmp_path)
    assert info.value.title == "nothing to report"
    assert "holds no job with a run.json" in info.value.problems[0].message
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_swept_values_are_the_overrides_that_differ() -> None:
    jobs = [["a=1", "b=x", "+c=1"], ["a=2", "b=x"], ["a=3", "b=x", "+c=1"]]
    assert swept_values(jobs) == [{"a": "1", "c": "1"}, {"a": "2", "c": ""}, {"a": "3", "c": "1"}]
