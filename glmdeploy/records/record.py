"""The run record of one job in its run directory (run.json, plan.json, plan.png, resolved.yaml).

`run.json` is written when the job starts (`running`) and rewritten when it ends (`ok`, `failed`
with the error, `interrupted`). Every file goes to a temporary name renamed over the target, so a
run directory never holds a half-written file. A record that can no longer be written (a full disk)
never goes on saying `running`: it becomes a small `failed` record, or is removed, and the writer
raises `OutputError`. `plan.json` is what `placement=plan_file` reads.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NoReturn

from glmdeploy import atomic
from glmdeploy.config.settings import Deployment, ModelSpec, SourceKind
from glmdeploy.hardware.environment import environment_facts
from glmdeploy.outputs import make_directory, output_error
from glmdeploy.planning.types import Plan, PlanDoesNotFit
from glmdeploy.problems import ConfigError, ExitCode, GlmDeployError, OutputError, Problem

RECORD_FORMAT = "glmdeploy.run/1"
RUN_JSON, PLAN_JSON, PLAN_PNG, RESOLVED_YAML = "run.json", "plan.json", "plan.png", "resolved.yaml"
Status = Literal["running", "ok", "failed", "interrupted"]
WEIGHTLESS_COMMANDS = frozenset({"plan"})  # jobs that read no weights: no content fingerprint
_RUN_DIR_HINT = "set hydra.run.dir=DIR to a directory you can write, or free some space"


@dataclass
class RunRecord:
    """What one job did, with everything needed to reproduce it (JSON through `to_dict`).

    `config` is the fully resolved config (interpolations frozen); `plan` is `Plan.to_dict()`;
    `results` holds `{"load": LoadedModel.to_dict(), "generate": GenerateResult.to_dict(),
    "bench": BenchResult.to_dict()}` as far as the command got; `error` is `{title, exit_code,
    problems}` (or `{title: "internal error", exit_code, message}`); `timings` are seconds per step.
    """

    command: str  # plan | load | generate | bench | run | export
    config: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option
    status: Status = "running"
    started_at: str = ""  # ISO 8601, UTC
    finished_at: str | None = None
    duration_s: float | None = None
    plan: dict[str, Any] | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. the plan picture could not be drawn
    format: str = RECORD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, **{k: v for k, v in asdict(self).items() if k != "format"}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The inverse of `to_dict`; ValueError on another format, TypeError on missing fields."""
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a {RECORD_FORMAT} record (format: {data.get('format')!r})")
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.config = _gpu_keys_as_ints(record.config)
        return record


def new_record(
    command: str,
    overrides: Sequence[str],
    choices: Mapping[str, str],
    config: Mapping[str, Any],
    deployment: Deployment,
    *,
    progress: bool = False,
) -> RunRecord:
    """A record started now, with this machine's environment and the checkpoint's facts
    (`progress`: show the first hashing of a local checkpoint's weights)."""
    choices = {str(k): str(v) for k, v in choices.items()}
    weights = command not in WEIGHTLESS_COMMANDS
    checkpoint = checkpoint_facts(deployment.model, weights=weights, progress=progress)
    env = environment_facts()
    return RunRecord(command, dict(config), list(overrides), choices, started_at=_now(),
                     environment=env, checkpoint=checkpoint)  # fmt: skip


def _gpu_keys_as_ints(config: dict[str, Any]) -> dict[str, Any]:
    """JSON turns int keys into strings; GPU ids in `gpus.max_memory_gib` are ints again."""
    gpus = config.get("gpus")
    caps = gpus.get("max_memory_gib") if isinstance(gpus, dict) else None
    if isinstance(gpus, dict) and isinstance(caps, dict):
        gpus["max_memory_gib"] = {int(k) if str(k).isdigit() else k: v for k, v in caps.items()}
    return config


def checkpoint_facts(
    model: ModelSpec, *, weights: bool = True, progress: bool = False
) -> dict[str, Any] | None:
    """Where the weights come from and their content fingerprint (None: plan-only, no weights).

    The first look at a local checkpoint hashes its weight files (cached; see
    `glmdeploy.loading.content_hash`), with a progress bar on stderr when `progress`; a job that
    reads no weights (`weights=False`, e.g. `plan`) records no fingerprint and reads none."""
    src = model.source
    if src.kind is SourceKind.NONE:
        return None
    if src.kind is SourceKind.EMBEDDED:
        from glmdeploy.loading.embedded import embedded_key

        key = embedded_key(model.architecture, src.seed) if model.architecture else None
        return {"kind": "embedded", "seed": src.seed, "fingerprint": key}
    if src.kind is SourceKind.HUB:
        return {"kind": "hub", "hub_id": src.hub_id, "revision": src.revision}
    from glmdeploy.loading.checkpoint import fingerprint

    path = Path(src.path or "").expanduser().resolve()
    facts: dict[str, Any] = {"kind": "local", "path": str(path), "layout": str(src.layout)}
    if not weights:
        facts["fingerprint"] = None
        return facts
    try:
        facts["fingerprint"] = fingerprint(path, progress=progress)
    except (GlmDeployError, OSError) as exc:  # the load step reports it properly
        facts["fingerprint"] = None
        facts["fingerprint_error"] = str(exc).splitlines()[-1].strip()
    return facts


def error_dict(exc: BaseException) -> dict[str, Any]:
    """How a record says why a job stopped."""
    if isinstance(exc, GlmDeployError):
        problems = [p.to_dict() for p in exc.problems]
        return {"title": exc.title, "exit_code": int(exc.exit_code), "problems": problems}
    if isinstance(exc, KeyboardInterrupt):
        return {"title": "interrupted", "exit_code": int(ExitCode.INTERRUPTED), "problems": []}
    message = f"{type(exc).__name__}: {exc}"
    return {"title": "internal error", "exit_code": int(ExitCode.FAILURE), "message": message}


class RecordWriter:
    """Writes one job's record files into `run_dir`; as a context manager, records how it ended.

    ```
    record = RunRecord("bench", cfg, overrides, choices, checkpoint=checkpoint_facts(model))
    with RecordWriter(run_dir).start(record) as writer:
        writer.save_plan(planned.plan)  # plan.json, plan.png, and the plan in run.json
        loaded = load_model(...)
        writer.finish("ok", results={"load": loaded.to_dict()}, timings={"load": seconds})
    ```
    Leaving the block normally finishes `ok` (unless `finish` was called); a GlmDeployError or
    other exception finishes `failed` with the error, KeyboardInterrupt `interrupted`; the
    exception is re-raised.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self._record: RunRecord | None = None
        self._clock = 0.0
        self.lost: OutputError | None = None  # set when run.json could not be written

    @property
    def record(self) -> RunRecord:
        if self._record is None:
            raise RuntimeError("RecordWriter.start() has not been called")
        return self._record

    def start(self, record: RunRecord) -> RecordWriter:
        """Write `resolved.yaml` and `run.json` (`running`; this machine's facts unless given).

        Raises:
            OutputError: the run directory cannot be created or written; nothing is left of the
                record.
        """
        make_directory(self.run_dir, "the run directory", hint=_RUN_DIR_HINT)
        record.status, record.started_at = "running", record.started_at or _now()
        record.environment = record.environment or environment_facts()
        self._record, self._clock = record, time.monotonic()
        import yaml

        text = yaml.safe_dump(_plain(record.config), sort_keys=False, allow_unicode=True)
        target = self.run_dir / RESOLVED_YAML
        try:
            atomic.write_text(target, text)
            target = self.run_dir / RUN_JSON
            atomic.write_text(target, self._text())
        except OSError as exc:
            for name in (RESOLVED_YAML, RUN_JSON):
                if (self.run_dir / name).is_file():  # a directory in the way is not ours
                    with contextlib.suppress(OSError):
                        (self.run_dir / name).unlink()
            lost = output_error(target, exc, "the run record", _RUN_DIR_HINT)
            raise lost from exc
        return self

    def save_plan(self, plan: Plan, *, write_record: bool = True) -> None:
        """Write `plan.json` and `plan.png`, and put the plan in `run.json` (rewritten unless
        `write_record` is false: `finish` writes it once, with everything else)."""
        record = self.record
        if self.lost is not None:
            return
        text = json.dumps(plan.to_dict(), indent=2) + "\n"
        record.plan = json.loads(text)  # JSON-shaped in memory too: lists, not tuples
        try:
            atomic.write_text(self.run_dir / PLAN_JSON, text)
        except OSError as exc:
            self._give_up(self.run_dir / PLAN_JSON, exc, "the plan")
        try:
            from glmdeploy.records.pictures import save_plan_picture

            save_plan_picture(plan, self.run_dir / PLAN_PNG)
        except Exception as exc:  # a picture must never fail the run it illustrates
            record.warnings.append(f"plan picture not drawn: {type(exc).__name__}: {exc}")
        if write_record:
            self._write()

    def finish(
        self,
        status: Status = "ok",
        *,
        results: Mapping[str, Any] | None = None,
        error: BaseException | Mapping[str, Any] | None = None,
        plan: Plan | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> RunRecord:
        """Rewrite `run.json` with the final status, results, error, plan and timings.

        Raises:
            OutputError: `run.json` could not be written; it now says `failed`, or is gone.
        """
        record = self.record
        if self.lost is not None:
            return record  # already finished `failed`: the record could not be written
        if plan is not None:
            self.save_plan(plan, write_record=False)
        record.results.update(results or {})
        record.timings.update(timings or {})
        if error is None and status == "interrupted":
            error = KeyboardInterrupt()
        if error is not None:
            record.error = error_dict(error) if isinstance(error, BaseException) else dict(error)
        record.status, record.finished_at = status, _now()
        record.duration_s = time.monotonic() - self._clock
        self._write()
        return record

    def fail(self, exc: BaseException) -> RunRecord:
        """Finish `interrupted` (KeyboardInterrupt) or `failed`, with the error (and best plan)."""
        fits_not = isinstance(exc, PlanDoesNotFit) and self.record.plan is None
        plan = exc.plan if isinstance(exc, PlanDoesNotFit) and fits_not else None
        status: Status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        return self.finish(status, error=exc, plan=plan)

    def __enter__(self) -> RecordWriter:
        self.record  # noqa: B018 -- fail early when start() was not called
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self.record.status == "running" and exc is None:
            self.finish("ok")
        elif self.record.status == "running" and exc is not None:
            with contextlib.suppress(OutputError):  # `exc` is the error to report; see `lost`
                self.fail(exc)

    def _text(self) -> str:
        return json.dumps(self.record.to_dict(), indent=2, default=str) + "\n"

    def _write(self) -> None:
        """Rewrite `run.json`. If that fails, the record must not go on saying `running`: it
        becomes a small `failed` record, or, if even that cannot be written, it is removed."""
        if self.lost is not None:
            return  # the record already says why it is incomplete
        try:
            atomic.write_text(self.run_dir / RUN_JSON, self._text())
        except OSError as exc:
            self._give_up(self.run_dir / RUN_JSON, exc, "the run record")

    def _give_up(self, path: Path, exc: OSError, what: str) -> NoReturn:
        self.lost = output_error(path, exc, what, _RUN_DIR_HINT)
        self._salvage(self.run_dir / RUN_JSON)
        raise self.lost from exc

    def _salvage(self, path: Path) -> None:
        record = self.record
        record.status, record.finished_at = "failed", _now()
        record.error = error_dict(self.lost) if self.lost is not None else None
        keep = ("format", "command", "config", "overrides", "choices", "status", "started_at",
                "finished_at", "error")  # fmt: skip
        small = {k: v for k, v in record.to_dict().items() if k in keep}
        text = json.dumps(small, indent=2, default=str) + "\n"
        for _ in range(2):
            try:
                atomic.write_text(path, text)
                return
            except OSError:
                path.unlink(missing_ok=True)  # frees its space; no record rather than a false one


def read_record(run_dir: Path | str) -> RunRecord:
    """The record in `run_dir`, checked against its schema (`schemas/run.schema.json`).

    Raises:
        ConfigError: there is no record, or it is not one (each problem names the file).
    """
    from glmdeploy.formats import read_document

    path = Path(run_dir) / RUN_JSON
    title = "not a glmdeploy run directory"
    if not path.is_file() and not path.is_dir():
        hint = "give a run directory written by glmdeploy plan/load/generate/bench (with run.json)"
        what = "no run.json here" if Path(run_dir).is_dir() else "no such directory"
        problem = Problem(str(run_dir), what, "a glmdeploy run directory", hint)
        raise ConfigError([problem], title)
    return RunRecord.from_dict(read_document(path, "run", title=title))


def _plain(value: Any) -> Any:
    """A copy that `yaml.safe_dump` accepts: tuples as lists, unknown objects as text."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
