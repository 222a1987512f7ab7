"""What vLLM 0.33.0 refuses, said before it starts, and the dtype its `auto` resolves to.

Each rule names the vLLM source it replays (see `facts`); each refusal is a `Problem` with the
reason vLLM gives and a fix the user can paste. Nothing here needs torch: the anatomy and the
checkpoint facts are plain data.
"""

from __future__ import annotations

from collections.abc import Sequence

from glmdeploy.config.settings import Deployment, Dtype, Quantization, Rendezvous
from glmdeploy.engines.vllm.checkpoint import VllmCheckpoint
from glmdeploy.engines.vllm.facts import (
    FP16_UNSUPPORTED,
    ONLINE_FP8,
    ONLINE_FP8_MIN_CAPABILITY,
    PP_UNSUPPORTED,
    QUANTIZATION_METHODS,
    VLLM_DTYPE_NAMES,
    VLLM_VERSION,
    padded_vocab,
    supported_dtypes,
)
from glmdeploy.hardware.precision import GpuCapability
from glmdeploy.model.anatomy import Anatomy
from glmdeploy.problems import ConfigError, HardwareError, Problem

ENGINE_HINT = "glmdeploy export vllm … (config for vLLM), or glmdeploy serve engine=vllm …"


def vllm_dtype(
    requested: Dtype, checkpoint: VllmCheckpoint, gpus: Sequence[GpuCapability]
) -> tuple[Dtype, str]:
    """The model dtype vLLM runs with, and why (config/model.py `_resolve_auto_dtype`).

    `auto` keeps the checkpoint's dtype when every GPU supports it and turns float32 (or an
    unsupported or unknown dtype) into the platform's preferred one: bf16 from compute capability
    8.0, else fp16, and never fp16 for the model types vLLM refuses it for.

    Raises:
        ConfigError: fp16 for a model type vLLM refuses it for.
        HardwareError: bf16 on a GPU older than compute capability 8.0.
    """
    lowest = min((g.compute_capability for g in gpus), default=(8, 0))
    supported = supported_dtypes(lowest, checkpoint.model_type)
    if requested is Dtype.FP16 and checkpoint.model_type in FP16_UNSUPPORTED:
        reason = FP16_UNSUPPORTED[checkpoint.model_type]
        message = f"vLLM: The model type {checkpoint.model_type!r} does not support float16. "
        hint = "precision=bf16 (or precision=fp32 on GPUs without bf16)"
        raise ConfigError([Problem("precision.dtype", message + f"Reason: {reason}", None, hint)])
    if requested is Dtype.BF16 and lowest < (8, 0):
        old = [g for g in gpus if g.compute_capability < (8, 0)]
        message = (
            f"vLLM: Bfloat16 is only supported on GPUs with compute capability of at least "
            f"8.0; GPU {old[0].physical_id} ({old[0].name}) has "
            f"{old[0].compute_capability[0]}.{old[0].compute_capability[1]}"
        )
        raise HardwareError([Problem("precision.dtype", message, None, "precision=fp16")])
    if requested is not Dtype.AUTO:
        return requested, f"{VLLM_DTYPE_NAMES[requested]}, as configured"
    preferred = supported[0]
    config = checkpoint.config_dtype
    if config is None:
        why = "vLLM's preferred dtype here (the checkpoint's config.json is not at hand)"
        return preferred, f"auto: {VLLM_DTYPE_NAMES[preferred]}, {why}"
    if config is Dtype.FP32 or config not in supported:
        why = "float32 checkpoints run" if config is Dtype.FP32 else "not supported here: runs"
        return preferred, f"auto: {VLLM_DTYPE_NAMES[preferred]} (checkpoint {config}: {why} in it)"
    return config, f"auto: {VLLM_DTYPE_NAMES[config]}, the checkpoint's dtype"


def vllm_problems(
    deployment: Deployment,
    checkpoint: VllmCheckpoint,
    anatomy: Anatomy,
    gpus: Sequence[GpuCapability],
    dtype: Dtype,
) -> list[Problem]:
    """Everything vLLM would refuse for this deployment, before any process starts."""
    return [
        *_parallel_problems(deployment, checkpoint, anatomy),
        *_quantization_problems(deployment, checkpoint, gpus),
        *_checkpoint_problems(deployment, checkpoint, anatomy, dtype),
    ]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _parallel_problems(
    deployment: Deployment, checkpoint: VllmCheckpoint, anatomy: Anatomy
) -> list[Problem]:
    tp, pp = deployment.parallel.tp_size, deployment.parallel.pp_size
    heads, kv = anatomy.num_attention_heads, anatomy.num_key_value_heads
    out: list[Problem] = []
    if heads % tp:  # config/model.py verify_with_parallel_config
        out.append(
            Problem(
                "parallel.tp_size",
                f"vLLM: Total number of attention heads ({heads}) must be divisible by tensor "
                f"parallel size ({tp}).",
                f"one of {_divisors(heads)}",
                "choose another tp_size",
            )
        )
    elif (kv >= tp and kv % tp) or (kv < tp and tp % kv):  # linear.py QKVParallelLinear
        out.append(
            Problem(
                "parallel.tp_size",
                f"vLLM cannot split {kv} KV heads over tp {tp}: it needs tp to divide the KV "
                "heads, or the KV heads to divide tp (then each is replicated); its attention "
                "layers assert this when the model is built",
                "a divisor or a multiple of the KV heads",
                "choose another tp_size",
            )
        )
    sizes = [("intermediate_size", anatomy.intermediate_size)]
    moe = getattr(anatomy.hf_config, "moe_intermediate_size", None)
    if getattr(anatomy.hf_config, "n_routed_experts", None) and moe:
        sizes.append(("moe_intermediate_size", int(moe)))
    sizes.append(("vocabulary padded to a multiple of 64", padded_vocab(anatomy.vocab_size)))
    for what, size in sizes:
        if size % tp:  # linear.py / vocab_parallel_embedding.py / fused_moe config: divide()
            out.append(
                Problem(
                    "parallel.tp_size",
                    f"vLLM splits the {what} ({size}) evenly over tp {tp}: not divisible",
                    f"a divisor of {size}",
                    "choose another tp_size",
                )
            )
    if pp > 1 and checkpoint.architecture in PP_UNSUPPORTED:  # config/model.py
        out.append(
            Problem(
                "parallel.pp_size",
                "vLLM: Pipeline parallelism is not supported for this model "
                f"({checkpoint.architecture}). Supported models implement the `SupportsPP` "
                "interface.",
                "1",
                "parallel.pp_size=1",
            )
        )
    layers = len(anatomy.blocks)
    if pp > layers:
        out.append(
            Problem(
                "parallel.pp_size",
                f"{pp} pipeline stages for {layers} decoder layers",
                f"at most {layers}",
                None,
            )
        )
    if deployment.launch.nnodes > 1 and deployment.launch.rendezvous is Rendezvous.C10D:
        out.append(
            Problem(
                "launch.rendezvous",
                "c10d: vLLM's multi-node mp backend has no rendezvous; every "
                "node is started with its own --node-rank",
                "static",
                "launch.rendezvous=static",
            )
        )
    return out


def _quantization_problems(
    deployment: Deployment, checkpoint: VllmCheckpoint, gpus: Sequence[GpuCapability]
) -> list[Problem]:
    quant = deployment.precision.quantization
    method = checkpoint.quant_method
    out: list[Problem] = []
    removed = f"vLLM {VLLM_VERSION} has no bitsandbytes (removed from its quantization methods)"
    if quant is Quantization.INT4:
        out.append(
            Problem(
                "precision.quantization",
                f"int4 is bitsandbytes 4-bit in glmdeploy; {removed} and no in-flight 4-bit for "
                "dense models",
                "none or int8 (vLLM's fp8_per_channel)",
                "use a pre-quantised AWQ or GPTQ checkpoint (model=local model.source.path=DIR; "
                "vLLM reads its quantization_config), or precision.quantization=int8",
            )
        )
    if quant is Quantization.INT8:
        old = [g for g in gpus if g.compute_capability < ONLINE_FP8_MIN_CAPABILITY]
        if old:
            cc = old[0].compute_capability
            out.append(
                Problem(
                    "precision.quantization",
                    f"int8 maps to vLLM's {ONLINE_FP8} (bitsandbytes is gone), which needs compute "
                    f"capability 7.5; GPU {old[0].physical_id} ({old[0].name}) has {cc[0]}.{cc[1]}",
                    "none on this GPU",
                    "precision.quantization=none",
                )
            )
    if method == "bitsandbytes":
        out.append(
            Problem(
                "model.source.path",
                f"a bitsandbytes checkpoint: {removed}",
                None,
                "use the unquantised checkpoint (with precision.quantization=int8 for vLLM's "
                f"{ONLINE_FP8}), or an AWQ/GPTQ/FP8 one",
            )
        )
    elif method is not None and method not in QUANTIZATION_METHODS:
        out.append(
            Problem(
                "model.source.path",
                f"quantization_config.quant_method {method!r} is unknown to vLLM {VLLM_VERSION}",
                "one of vLLM's quantization methods",
                None,
            )
        )
    elif method is not None and quant is not Quantization.NONE:
        out.append(
            Problem(
                "precision.quantization",
                f"{quant}, but the checkpoint is already quantised ({method})",
                "none",
                "precision.quantization=none",
            )
        )
    return out


def _checkpoint_problems(
    deployment: Deployment, checkpoint: VllmCheckpoint, anatomy: Anatomy, dtype: Dtype
) -> list[Problem]:
    out: list[Problem] = []
    src = deployment.model.source
    if checkpoint.remote_code and not src.trust_remote_code:
        pin = " model.source.revision=<commit>" if src.hub_id and not src.revision else ""
        glm4 = "glm-4" in f"{src.hub_id} {deployment.model.name}".lower()
        out.append(
            Problem(
                "model.source.trust_remote_code",
                "vLLM must run code from the checkpoint: " + "; ".join(checkpoint.remote_code),
                "true, set by you after reading that code",
                f"opt in: model.source.trust_remote_code=true{pin} (a pinned revision fixes the "
                "code you read)"
                + ("; or model=glm-4-9b-chat-hf, which needs no remote code" if glm4 else ""),
            )
        )
    limit = int(getattr(anatomy.hf_config, "max_position_embeddings", 0) or 0)
    length = deployment.runtime.max_context_tokens
    if limit and length > limit:  # config/model.py _get_and_verify_max_len
        out.append(
            Problem(
                "runtime.max_context_tokens",
                f"vLLM: User-specified max_model_len ({length}) is greater than the derived "
                f"max_model_len ({limit}, the model's max_position_embeddings)",
                f"<= {limit}",
                f"runtime.max_context_tokens={limit} (vLLM overrides this only with "
                "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)",
            )
        )
    kv = deployment.runtime.kv_cache_dtype
    if kv is Dtype.FP32 and dtype is not Dtype.FP32:
        out.append(
            Problem(
                "runtime.kv_cache_dtype",
                "fp32: vLLM's kv-cache-dtype has no float32 (auto follows the model)",
                "auto, bf16 or fp16",
                "runtime.kv_cache_dtype=auto",
            )
        )
    block = deployment.engine.block_size
    if block % 16:  # v1/attention/backends/flash_attn.py: kernel block sizes MultipleOf(16)
        out.append(
            Problem(
                "engine.block_size",
                f"{block}: vLLM's FlashAttention needs a multiple of 16",
                "16, 32, 64, …",
                "engine.block_size=16",
            )
        )
    engine = deployment.engine
    if (
        engine.max_num_seqs
        and engine.max_num_batched_tokens
        and engine.max_num_batched_tokens < engine.max_num_seqs
    ):
        out.append(
            Problem(
                "engine.max_num_batched_tokens",
                f"vLLM: max_num_batched_tokens ({engine.max_num_batched_tokens}) must be greater "
                f"than or equal to max_num_seqs ({engine.max_num_seqs}).",
                None,
                None,
            )
        )
    return out
