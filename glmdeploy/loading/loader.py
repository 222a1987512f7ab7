"""Load a planned model: the checkpoint, with the plan's exact device map and the resolved dtype.

`load_model` resolves the checkpoint (embedded: materialised; legacy ChatGLM: converted to native
safetensors; hub: by revision, pinned for remote code), maps the plan's physical GPU ids to this
process's logical ids, calls `from_pretrained` with that exact map, and then has
`glmdeploy.loading.verify` prove every tensor landed where the plan put it. The dispatched model
is never moved.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from glmdeploy.cache import cache_root as default_cache_root
from glmdeploy.config.rules import is_pinned
from glmdeploy.config.settings import CheckpointLayout, Deployment, ModelSource, SourceKind
from glmdeploy.hardware.gpu_select import GpuAssignment, apply_environment, to_logical
from glmdeploy.hardware.precision import ResolvedPrecision, resolve_precision, selected_gpus
from glmdeploy.loading import verify
from glmdeploy.loading.checkpoint import check_float_weights, list_tensors
from glmdeploy.loading.convert import ensure_native
from glmdeploy.loading.embedded import materialize
from glmdeploy.loading.verify import DeviceBytes
from glmdeploy.model.hf_config import read_config_json
from glmdeploy.planning.types import Plan
from glmdeploy.problems import ConfigError, DoesNotFitError, HardwareError, LoadError, Problem

if TYPE_CHECKING:
    from glmdeploy.planning.deployment_plan import PlannedDeployment

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_LEGACY_FILES = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "modeling_chatglm.py"]


@dataclass
class LoadedModel:
    """A live, verified model.

    Attributes:
        model: the transformers model, dispatched with accelerate hooks when the map spans
            devices: never call `.to()`/`.cuda()` on it.
        tokenizer: from the checkpoint, or None (then `glmdeploy.inference.runner` feeds token ids).
        dtype, precision: the compute `torch.dtype`; how it was chosen, with its warnings.
        checkpoint: the directory (or hub id) loaded.
        device_map: the map given to `from_pretrained`, GPUs as logical ids.
        device_bytes: predicted vs actual weight bytes per device, in plan order.
        prepare_seconds, load_seconds, verify_seconds: materialising/converting the checkpoint
            (~0 when cached), `from_pretrained`, the placement check.
        input_device: where inputs go (the embedding's execution device).
        offload_folder: where disk-offloaded weights not read in place are written.
        warnings: what the user should know (precision hazards, no tokenizer, …).
        planned: the plan it was loaded for, with its resolved deployment (set by
            `glmdeploy.load`; None when `load_model` is called directly).
    """

    model: Any
    tokenizer: Any | None
    dtype: torch.dtype
    precision: ResolvedPrecision
    checkpoint: str
    device_map: dict[str, int | str]
    device_bytes: tuple[DeviceBytes, ...]
    prepare_seconds: float
    load_seconds: float
    verify_seconds: float
    input_device: torch.device
    offload_folder: Path | None = None
    warnings: tuple[str, ...] = field(default=())
    planned: PlannedDeployment | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "model_class": type(self.model).__name__,
            "tokenizer": type(self.tokenizer).__name__ if self.tokenizer is not None else None,
            "precision": self.precision.to_dict(),
            "device_map": dict(self.device_map),
            "device_bytes": [d.to_dict() for d in self.device_bytes],
            "prepare_seconds": self.prepare_seconds,
            "load_seconds": self.load_seconds,
            "verify_seconds": self.verify_seconds,
            "input_device": str(self.input_device),
            "warnings": list(self.warnings),
        }


def load_model(
    deployment: Deployment,
    plan: Plan,
    assignment: GpuAssignment,
    *,
    cache_root: Path | None = None,
    offload_folder: Path | str | None = None,
    precision: ResolvedPrecision | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load `deployment`'s model on `plan`'s devices and verify that it landed as planned.

    Args:
        deployment: the validated config (model source, precision, placement).
        plan: the plan; its dtype and quantisation must be the resolved precision's.
        assignment: the selected GPUs; its environment is applied first (`apply_environment`).
        cache_root: materialised and converted checkpoints (default: `materialize.cache_root()`).
        offload_folder: for disk offload (default: `placement.offload_folder`, else a temporary
            directory removed with the model).
        precision: the resolved precision (default: resolved here for the assignment's GPUs).
        progress: show conversion progress.

    Raises:
        ConfigError: a source that cannot be loaded, or a plan made for another precision.
        HardwareError: CUDA is missing or sees other GPUs than the assignment.
        LoadError: checkpoint problems (the file named), or tensors not where the plan put them.
        DoesNotFitError: a GPU ran out of memory while loading.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    if assignment.declared:
        hint = "declared GPUs are for planning: load on this machine's GPUs (remove "
        hint += "gpus.declared: gpus=auto, gpus=ids …) or with gpus=cpu"
        raise HardwareError([Problem("gpus", "cannot load on declared GPUs", hint=hint)])
    logical = logical_device_map(plan, assignment)
    devices = set(logical.values())
    if any(isinstance(d, int) for d in devices):
        apply_environment(assignment)
        verify.check_visible_gpus(assignment)
    started = time.perf_counter()
    location, warnings = resolve_checkpoint(deployment, root, progress=progress)
    prepare_seconds = time.perf_counter() - started
    if precision is None:
        offloads = len(devices) > 1 and bool(devices & {"cpu", "disk"})
        model_type = _model_type(deployment, location)
        precision = resolve_precision(deployment.precision, selected_gpus(assignment),
                                      model_type=model_type, offload=offloads)  # fmt: skip
    mismatches = precision.mismatches(plan.fingerprint.dtype, plan.fingerprint.quantization)
    if mismatches:
        raise ConfigError(mismatches)
    folder = offload_folder or deployment.placement.offload_folder
    temporary = folder is None and "disk" in devices
    if temporary:
        (root / "offload").mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="offload-", dir=root / "offload")
    started = time.perf_counter()
    with quiet_transformers():
        model = _from_pretrained(deployment.model.source, location, logical, plan, assignment,
                                 precision, folder)  # fmt: skip
    load_seconds = time.perf_counter() - started
    if temporary:  # the model reads it until it is garbage-collected
        weakref.finalize(model, shutil.rmtree, str(folder), True)
    started = time.perf_counter()
    actual = verify.verify_placement(model, logical)
    per_device = verify.device_bytes(plan, assignment, actual)
    verify_seconds = time.perf_counter() - started
    tokenizer, note = _load_tokenizer(deployment.model.source, location)
    return LoadedModel(
        model, tokenizer, precision.torch_dtype(), precision, location, logical, per_device,
        prepare_seconds, load_seconds, verify_seconds, verify.input_device(model),
        Path(folder).expanduser() if folder else None, (*precision.warnings, *warnings, *note),
    )  # fmt: skip


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """glmdeploy reports what it loaded and where: transformers' and accelerate's own progress
    bars and notes are noise while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    accelerate = logging.getLogger("accelerate")
    level = accelerate.level
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    accelerate.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        accelerate.setLevel(level)


def resolve_checkpoint(
    deployment: Deployment, cache_root: Path, *, progress: bool = True
) -> tuple[str, tuple[str, ...]]:
    """The directory (or hub id) `from_pretrained` reads, materialising or converting as needed."""
    source, arch = deployment.model.source, deployment.model.architecture
    warnings: tuple[str, ...] = ()
    if source.kind is SourceKind.EMBEDDED:
        if arch is None:
            raise ConfigError([Problem("model.architecture", "an embedded model needs one")])
        return str(materialize(arch, source.seed, cache_root / "embedded")), ()
    if source.kind is SourceKind.NONE:
        hint = "this model option describes an architecture for planning; choose one with weights"
        raise ConfigError([Problem("model.source.kind", "none: nothing to load", hint=hint)])
    if source.layout is CheckpointLayout.CHATGLM and source.trust_remote_code:
        warnings = ("trust_remote_code is ignored: legacy ChatGLM checkpoints run natively",)
    if source.kind is SourceKind.HUB:
        _check_hub_source(source)
        if source.layout is CheckpointLayout.NATIVE:
            return str(source.hub_id), warnings
        from huggingface_hub import snapshot_download

        try:
            snapshot = snapshot_download(str(source.hub_id), revision=source.revision,
                                         allow_patterns=_HUB_LEGACY_FILES)  # fmt: skip
        except Exception as exc:  # network, auth and missing-revision errors alike
            raise LoadError([Problem("model.source.hub_id", f"cannot download: {exc}")]) from exc
        directory = Path(snapshot)
    else:
        directory = Path(str(source.path)).expanduser()
    native = ensure_native(directory, cache_root / "converted", progress=progress)
    if native.path == directory:
        config = read_config_json(directory)
        infos = list_tensors(directory)  # missing, truncated or corrupt files, named
        check_float_weights(infos, quantized="quantization_config" in config)
    return str(native.path), (*warnings, *native.notes)


def logical_device_map(plan: Plan, assignment: GpuAssignment) -> dict[str, int | str]:
    """The plan's map with GPUs as the `cuda:N` indices this process sees."""
    return {
        name: to_logical(assignment, device, "placement") if isinstance(device, int) else device
        for name, device in plan.device_map.items()
    }


def _from_pretrained(
    source: ModelSource,
    location: str,
    device_map: dict[str, int | str],
    plan: Plan,
    assignment: GpuAssignment,
    precision: ResolvedPrecision,
    offload_folder: Path | str | None,
) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "device_map": device_map,
        "dtype": precision.torch_dtype(),
        "weights_only": True,  # pickled .bin shards: tensors only, never code
        "output_loading_info": True,
        "trust_remote_code": source.trust_remote_code and source.layout is CheckpointLayout.NATIVE,
    }
    max_memory = {
        to_logical(assignment, r.device) if isinstance(r.device, int) else r.device:
        r.capacity_bytes for r in plan.rows if r.device != "disk" and r.capacity_bytes > 0
    }  # fmt: skip
    if max_memory:
        kwargs["max_memory"] = max_memory
    if "disk" in device_map.values():
        kwargs["offload_folder"] = str(Path(str(offload_folder)).expanduser())
    if precision.quantization_config is not None:
        kwargs["quantization_config"] = precision.quantization_config
    if not Path(location).is_dir():
        kwargs["revision"] = source.revision
    elif any(Path(location).glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    auto: Any = AutoModelForCausalLM  # untyped upstream
    try:
        model, info = auto.from_pretrained(location, **kwargs)
    except torch.OutOfMemoryError as exc:
        hint = "raise placement.reserve_gib, or free the GPUs (`glmdeploy doctor` lists processes)"
        message = f"a GPU ran out of memory while loading: {_first_line(exc)}"
        raise DoesNotFitError([Problem("placement", message, hint=hint)]) from exc
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        problem = Problem(location, f"transformers cannot load it: {_first_line(exc)}")
        if "ignore_mismatched_sizes" in str(exc):  # its load report (stderr) lists the tensors
            message = "tensor shapes differ from what config.json describes (listed above)"
            hint = "restore the config.json these weights were saved with"
            problem = Problem(str(Path(location) / "config.json"), message, hint=hint)
        raise LoadError([problem]) from exc
    problems = [
        Problem(location, f"{what} in the checkpoint: {_few(sorted(map(str, info[key])))}")
        for key, what in (("missing_keys", "tensors the model needs are missing"),
                          ("unexpected_keys", "tensors the model does not have"),
                          ("mismatched_keys", "tensors of the wrong shape"))
        if info.get(key)
    ]  # fmt: skip
    if problems:
        raise LoadError(problems)
    return model


def _load_tokenizer(source: ModelSource, location: str) -> tuple[Any | None, tuple[str, ...]]:
    directory = Path(location)
    if directory.is_dir() and not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        return None, ()
    from transformers import AutoTokenizer

    remote = source.trust_remote_code and source.layout is CheckpointLayout.NATIVE
    revision = None if directory.is_dir() else source.revision
    try:
        auto: Any = AutoTokenizer  # untyped upstream
        return auto.from_pretrained(location, trust_remote_code=remote, revision=revision), ()
    except Exception as exc:  # remote-code tokenizers, missing files, sentencepiece absent, …
        return None, (f"no tokenizer ({_first_line(exc)}): generate feeds token ids instead",)


def _check_hub_source(source: ModelSource) -> None:
    """A hub source is a repository id, never a path, and remote code only from a pinned commit.

    transformers reads an id that names a local directory from disk, ignoring the revision: with
    remote code, it would run whatever Python sits there. Validation refuses such ids already;
    this is the last check before transformers sees one.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    hub_id = str(source.hub_id)
    try:
        validate_repo_id(hub_id)
    except HFValidationError as exc:
        hint = "a checkpoint directory is model.source.kind=local model.source.path=…"
        raise ConfigError([Problem("model.source.hub_id", str(exc), "owner/name", hint)]) from exc
    if Path(hub_id).expanduser().exists():
        message = f"'{hub_id}' is a hub id but also a path here ({Path(hub_id).resolve()})"
        hint = (
            "transformers would read it from disk and ignore the revision: use "
            f"model.source.kind=local model.source.path=./{hub_id}, or run from another directory"
        )
        raise ConfigError([Problem("model.source.hub_id", message, "a hub repository", hint)])
    if source.trust_remote_code and not is_pinned(source.revision):
        message = f"remote code from {source.hub_id} needs a pinned revision, got {source.revision}"
        hint = "set model.source.revision to the full commit sha you have reviewed"
        raise ConfigError([Problem("model.source.revision", message, "a 40-hex commit", hint)])


def _model_type(deployment: Deployment, location: str) -> str:
    if deployment.model.architecture is not None:
        return deployment.model.architecture.model_type
    directory = Path(location)
    return str(read_config_json(directory).get("model_type", "")) if directory.is_dir() else ""


def _few(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
