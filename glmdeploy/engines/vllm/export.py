"""`glmdeploy export vllm`: the `vllm serve --config` YAML, its environment and per-node commands
(`launch`), after the fit check with vLLM's memory rules (`fit`) and its refusals (`rules`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmdeploy import __version__, atomic
from glmdeploy.config.settings import Deployment, Dtype, Quantization
from glmdeploy.engines.vllm import facts
from glmdeploy.engines.vllm.advice import export_notes, fit_problems
from glmdeploy.engines.vllm.checkpoint import VllmCheckpoint, vllm_checkpoint
from glmdeploy.engines.vllm.fit import (
    ModelShape,
    RankInput,
    Settings,
    VllmFit,
    activation_bytes,
    cudagraph_bytes,
    fit_check,
)
from glmdeploy.engines.vllm.flags import bad_config_keys
from glmdeploy.engines.vllm.launch import (
    NodeCommand,
    node_commands,
    node_environment,
    serve_config,
)
from glmdeploy.engines.vllm.ranks import (
    Slot,
    rank_slots,
    stage_partition,
    stage_ranges,
    used_gpus,
)
from glmdeploy.engines.vllm.rules import vllm_dtype, vllm_problems
from glmdeploy.engines.vllm.shards import RankWeights, rank_weights
from glmdeploy.hardware.gpu_select import select_gpus
from glmdeploy.hardware.nvml import GpuInfo, HardwareSnapshot
from glmdeploy.hardware.precision import selected_gpus
from glmdeploy.model.anatomy import Anatomy, dtype_bytes
from glmdeploy.model.hf_config import hf_config_for
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.deployment_plan import hardware_for
from glmdeploy.problems import ConfigError, DoesNotFitError, HardwareError, Problem


@dataclass(frozen=True)
class VllmExport:
    """Everything `export vllm` produces (`to_dict` is the `--json` form)."""

    deployment: Deployment
    checkpoint: VllmCheckpoint
    dtype: Dtype
    dtype_reason: str
    config: dict[str, Any]
    env: dict[str, str]
    commands: tuple[NodeCommand, ...]
    pp_partition: tuple[int, ...]
    pp_partition_reason: str
    fit: VllmFit
    notes: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.fit.fits

    def yaml_text(self) -> str:
        """The config file: a comment header (what, verdict, how to run), then the options."""
        import yaml

        fit = self.fit
        verdict = "fits" if fit.fits else "DOES NOT FIT"
        lines = [
            f"# vLLM {facts.VLLM_VERSION} config written by glmdeploy {__version__}: "
            f"{self.deployment.summary()}",
            f"# fit check: {verdict}; KV cache {fit.kv_cache_tokens:,} tokens, maximum concurrency "
            f"{fit.concurrency:.2f}x at max-model-len {fit.settings.max_model_len:,}",
            *(f"# node {c.node}: {c.shell}" for c in self.commands),
        ]
        body = str(yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True))
        return "\n".join(lines) + "\n" + body

    def to_dict(self) -> dict[str, Any]:
        ckpt = dataclasses.asdict(self.checkpoint)
        return {
            "ok": self.fits,
            "vllm_version": facts.VLLM_VERSION,
            "deployment": self.deployment.summary(),
            "checkpoint": ckpt,
            "dtype": str(self.dtype),
            "dtype_reason": self.dtype_reason,
            "config": self.config,
            "env": self.env,
            "commands": [dataclasses.asdict(c) for c in self.commands],
            "pp_partition": list(self.pp_partition),
            "pp_partition_reason": self.pp_partition_reason,
            "fit": self.fit.to_dict(),
            "notes": list(self.notes),
        }

    def write(self, path: Path) -> None:
        """Write the config file atomically."""
        atomic.write_text(path, self.yaml_text())


class VllmDoesNotFit(DoesNotFitError):
    """The fit check failed; `export` holds everything computed (for printing and records)."""

    def __init__(self, problems: list[Problem], export: VllmExport) -> None:
        super().__init__(problems, "the deployment does not fit vLLM's memory rules")
        self.export = export


def export_vllm(
    deployment: Deployment,
    *,
    config_path: Path | str = "vllm.yaml",
    snapshot: HardwareSnapshot | None = None,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> VllmExport:
    """The vLLM config, environment and commands for `deployment`, checked with vLLM's rules.

    Args:
        deployment: the validated deployment (any engine; vLLM's settings are `engine.*`).
        config_path: where the YAML will be written (the commands name it).
        snapshot: the GPUs (default: the declared fleet, or this machine's through NVML).
        env: the environment GPU selection reads (default: `os.environ`).
        host, port: where vLLM's API server listens.

    Raises:
        ConfigError: vLLM would refuse the deployment (every reason at once).
        HardwareError: no GPU, or fewer GPUs than ranks per node.
        VllmDoesNotFit: it does not fit; `.export` has the fit and `.problems` the fixes.
    """
    snapshot = snapshot if snapshot is not None else hardware_for(deployment)
    assignment = select_gpus(deployment.gpus, snapshot, os.environ if env is None else env)
    if not assignment.devices:
        hint = "vLLM needs CUDA GPUs; plan for a fleet you lack with e.g. gpus=2x24gib"
        raise HardwareError([Problem("gpus", "no GPU selected", "one GPU per rank", hint)])
    gpus = [g for d in assignment.devices if (g := snapshot.gpu(d.physical_id)) is not None]
    anatomy = build_anatomy(hf_config_for(deployment.model))
    checkpoint = vllm_checkpoint(deployment, anatomy)
    capabilities = selected_gpus(assignment)
    dtype, reason = vllm_dtype(deployment.precision.dtype, checkpoint, capabilities)
    problems = vllm_problems(deployment, checkpoint, anatomy, capabilities, dtype)
    if problems:
        raise ConfigError(problems, f"vLLM {facts.VLLM_VERSION} would refuse this deployment")
    slots = rank_slots(deployment, gpus)
    impl = checkpoint.implementation
    weights = rank_weights(
        anatomy,
        deployment.parallel.tp_size,
        dtype,
        fp8=deployment.precision.quantization is Quantization.INT8,
        native_rope=impl is None or impl.backend == "native",
    )
    shape = model_shape(anatomy)
    s = settings_for(deployment, dtype, slots[0].gpu, anatomy)
    parts, how = _partition(deployment, slots, weights, shape, s)
    ranges = stage_ranges(parts)
    last = deployment.parallel.pp_size - 1
    inputs = [
        RankInput(
            slot.rank,
            slot.node,
            slot.local_rank,
            slot.tp_rank,
            slot.pp_rank,
            slot.gpu.physical_id,
            slot.gpu.name,
            slot.gpu.total_bytes,
            slot.gpu.free_bytes,
            ranges[slot.pp_rank],
            weights.stage_bytes(
                *ranges[slot.pp_rank], first=slot.pp_rank == 0, last=slot.pp_rank == last
            ),
            slot.pp_rank == last,
        )
        for slot in slots
    ]
    fit = fit_check(inputs, shape, s)
    variables = node_environment(deployment, used_gpus(deployment, gpus), parts, how)
    config = serve_config(deployment, checkpoint, dtype, s, host, port)
    bad = bad_config_keys(config)
    assert not bad, f"glmdeploy wrote keys vLLM {facts.VLLM_VERSION} would not read: {bad}"
    notes = export_notes(deployment, checkpoint, anatomy, weights, gpus, (parts, how))
    commands = node_commands(deployment, variables, config_path)
    export = VllmExport(deployment, checkpoint, dtype, reason, config, variables, commands,
                        tuple(parts), how, fit, notes)  # fmt: skip
    if not fit.fits:
        raise VllmDoesNotFit(fit_problems(fit), export)
    return export


def model_shape(anatomy: Anatomy) -> ModelShape:
    cfg = anatomy.hf_config
    experts = int(getattr(cfg, "n_routed_experts", 0) or 0)
    return ModelShape(
        hidden=anatomy.hidden_size,
        intermediate=anatomy.intermediate_size,
        heads=anatomy.num_attention_heads,
        kv_heads=anatomy.num_key_value_heads,
        head_dim=anatomy.head_dim,
        vocab_padded=facts.padded_vocab(anatomy.vocab_size),
        moe_intermediate=int(getattr(cfg, "moe_intermediate_size", 0) or 0) if experts else 0,
        experts_per_token=int(getattr(cfg, "num_experts_per_tok", 0) or 0) if experts else 0,
        first_moe_layer=int(getattr(cfg, "first_k_dense_replace", 0) or 0) if experts else 0,
    )


def settings_for(deployment: Deployment, dtype: Dtype, gpu0: GpuInfo, anatomy: Anatomy) -> Settings:
    """The resolved settings; batch defaults follow rank 0's GPU, as vLLM's do."""
    engine, runtime, p = deployment.engine, deployment.runtime, deployment.parallel
    defaults = facts.batch_defaults(gpu0.total_bytes, gpu0.name, gpu0.compute_capability)
    tokens, seqs = facts.scheduler_limits(
        engine.max_num_batched_tokens, engine.max_num_seqs, runtime.max_context_tokens, defaults
    )
    sizes = (
        ()
        if engine.enforce_eager
        else tuple(facts.cudagraph_capture_sizes(seqs, tokens, gpu0.compute_capability))
    )
    kv = dtype if runtime.kv_cache_dtype is Dtype.AUTO else runtime.kv_cache_dtype
    limit = int(getattr(anatomy.hf_config, "max_position_embeddings", 0) or 0)
    return Settings(
        tp_size=p.tp_size,
        world_size=p.world_size,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        max_model_len=runtime.max_context_tokens,
        model_max_len=limit or runtime.max_context_tokens,
        block_size=engine.block_size,
        max_num_batched_tokens=tokens,
        max_num_seqs=seqs,
        capture_sizes=sizes,
        dtype_bytes=dtype_bytes(dtype),
        kv_dtype_bytes=dtype_bytes(kv),
        batch_size=runtime.batch_size,
    )


def _partition(
    deployment: Deployment, slots: list[Slot], weights: RankWeights, shape: ModelShape, s: Settings
) -> tuple[list[int], str]:
    """Layers per stage: per-layer loads are weights + the target's KV cache + graph pieces."""
    pp, n = deployment.parallel.pp_size, len(weights.layers)
    blocks = s.batch_size * -(-s.max_model_len // s.block_size) + 1
    kv_layer = blocks * s.block_size * 2 * facts.kv_heads_per_rank(shape.kv_heads, s.tp_size)
    kv_layer *= shape.head_dim * s.kv_dtype_bytes
    piece = len(s.capture_sizes) * facts.CUDAGRAPH_BYTES_PER_PIECE
    loads = [w + kv_layer + piece for w in weights.layers]
    fixed = [
        facts.PROFILE_OVERHEAD_BYTES
        + weights.rotary
        + activation_bytes(shape, s, (0, n), stage == pp - 1)
        + cudagraph_bytes(shape, s, (0, 0))  # the per-layer part is in `loads`
        + (weights.embedding if stage == 0 else 0)
        + (weights.head if stage == pp - 1 else 0)
        for stage in range(pp)
    ]
    return stage_partition(slots, pp, loads, fixed, s.gpu_memory_utilization)
