"""What vLLM 0.33.0 does, as constants and small pure functions, each naming the source it follows.

Read in vLLM 0.33.0's published wheel (paths are repository paths under `vllm/`); nothing here
imports vLLM. Where glmdeploy has to estimate rather than replay (activation peak, CUDA graphs,
memory outside torch), the constant says so and the README states the formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmdeploy.config.settings import GIB, Dtype

VLLM_VERSION = "0.33.0"

DEFAULT_BLOCK_SIZE = 16  # config/cache.py CacheConfig.DEFAULT_BLOCK_SIZE (FlashAttention on CUDA)
VOCAB_PADDING = 64  # model_executor/layers/vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # config/cache.py

# config/model.py _FLOAT16_NOT_SUPPORTED_MODELS: model types that reject float16.
FP16_UNSUPPORTED = {
    "gemma2": "Numerical instability. Please use bfloat16 or float32 instead.",
    "gemma3": "Numerical instability. Please use bfloat16 or float32 instead.",
    "gemma3_text": "Numerical instability. Please use bfloat16 or float32 instead.",
    "glm4": "Numerical instability. Please use bfloat16 or float32 instead.",
}

# Architectures of model_executor/models/registry.py _TEXT_GENERATION_MODELS whose class does not
# implement SupportsPP (every other text model, the Transformers backend included, does).
PP_UNSUPPORTED = frozenset({"Gemma3nForCausalLM", "Mamba2ForCausalLM", "Zamba2ForCausalLM"})

# model_executor/layers/quantization/__init__.py QUANTIZATION_METHODS (bitsandbytes is gone).
QUANTIZATION_METHODS = frozenset((
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4",
    "modelopt_mxfp8", "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming",
    "compressed-tensors", "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4",
    "gpt_oss_mxfp4", "deepseek_v4_fp8", "online", "fp8_per_tensor", "fp8_per_block",
    "fp8_per_channel", "int8_per_channel_weight_only", "nvfp4_per_token", "mxfp8",
))  # fmt: skip
# config/quantization.py _ONLINE_SHORTHANDS "fp8_per_channel": every LinearBase layer and the MoE
# experts get fp8 weights with one fp32 scale per output channel; embeddings and the LM head stay.
# model_executor/layers/quantization/online/base.py get_min_capability: 75.
ONLINE_FP8 = "fp8_per_channel"
ONLINE_FP8_MIN_CAPABILITY = (7, 5)


@dataclass(frozen=True)
class Implementation:
    """How vLLM runs one Hugging Face architecture (model_executor/models/registry.py)."""

    vllm_class: str
    backend: str  # "native" (vLLM's own model code) or "transformers" (its Transformers backend)


IMPLEMENTATIONS = {
    "ChatGLMModel": Implementation("chatglm.ChatGLMForCausalLM", "native"),
    "ChatGLMForConditionalGeneration": Implementation("chatglm.ChatGLMForCausalLM", "native"),
    "GlmForCausalLM": Implementation("transformers.TransformersForCausalLM", "transformers"),
    "Glm4ForCausalLM": Implementation("glm4.Glm4ForCausalLM", "native"),
    "Glm4MoeForCausalLM": Implementation("glm4_moe.Glm4MoeForCausalLM", "native"),
    "LlamaForCausalLM": Implementation("llama.LlamaForCausalLM", "native"),
}

# Estimates (not replayed from vLLM's code; see the README's "Deploying on vLLM"):
CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context + cuBLAS handles, created before vLLM's snapshot
COMMUNICATOR_BYTES = GIB // 2  # NCCL communicators / custom all-reduce buffers when world > 1
PROFILE_OVERHEAD_BYTES = GIB // 4  # persistent buffers and non-torch growth after the snapshot
ACTIVATION_SLACK = 1.10  # allocator rounding and fragmentation on top of the live tensors
CUDAGRAPH_BYTES_PER_PIECE = GIB // 4096  # 0.25 MiB per captured size and decoder layer


def padded_vocab(vocab_size: int) -> int:
    """vocab_parallel_embedding.py pad_vocab_size: up to a multiple of 64."""
    return -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING


def kv_heads_per_rank(kv_heads: int, tp_size: int) -> int:
    """config/model.py get_num_kv_heads: KV heads are replicated when tp exceeds them."""
    return max(1, kv_heads // tp_size)


def default_pp_partition(num_layers: int, pp_size: int) -> list[int]:
    """distributed/utils.py get_pp_indices without VLLM_PP_LAYER_PARTITION: an even split, the
    remainder going one each to the stages before the last, counting backwards."""
    parts = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        parts[-i] += 1
    return parts


def batch_defaults(total_bytes: int, gpu_name: str, capability: tuple[int, int]) -> tuple[int, int]:
    """engine/arg_utils.py get_batch_defaults for `vllm serve` (OPENAI_API_SERVER usage context):
    (max_num_batched_tokens, max_num_seqs) by the first GPU's total memory and name."""
    if total_bytes >= 160 * GIB:
        return 16384, 1024
    if total_bytes >= 70 * GIB and "a100" not in gpu_name.lower() and capability != (12, 1):
        return 8192, 1024
    return 2048, 256


def scheduler_limits(
    max_num_batched_tokens: int | None,
    max_num_seqs: int | None,
    max_model_len: int,
    defaults: tuple[int, int],
) -> tuple[int, int]:
    """engine/arg_utils.py _set_default_max_num_seqs_and_batched_tokens_args with chunked prefill
    on (the default for generative models): the (max_num_batched_tokens, max_num_seqs) in force."""
    seqs = max_num_seqs if max_num_seqs is not None else defaults[1]
    tokens = max_num_batched_tokens
    if tokens is None:
        tokens = min(seqs * max_model_len, defaults[0])
    if max_num_seqs is None:
        seqs = min(seqs, tokens)
    return tokens, seqs


def cudagraph_capture_sizes(
    max_num_seqs: int, max_num_batched_tokens: int, capability: tuple[int, int]
) -> list[int]:
    """config/vllm.py: the batch sizes CUDA graphs are captured for (no speculative decoding)."""
    ceiling = 1024 if capability[0] == 10 else 512
    largest = min(max_num_seqs * 2, ceiling, max_num_batched_tokens)
    sizes = [i for i in (1, 2, 4) if i <= largest]
    if largest >= 8:
        sizes += list(range(8, min(largest + 1, 256), 8))
    if largest >= 256:
        sizes += list(range(256, largest + 1, 16))
    if max_num_batched_tokens <= largest and max_num_batched_tokens not in sizes:
        sizes.append(max_num_batched_tokens)
    return sizes


def supported_dtypes(capability: tuple[int, int], model_type: str) -> list[Dtype]:
    """platforms/cuda.py supported_dtypes, minus float16 where config/model.py rejects it."""
    if capability >= (8, 0):
        found = [Dtype.BF16, Dtype.FP16, Dtype.FP32]
    elif capability >= (6, 0):
        found = [Dtype.FP16, Dtype.FP32]
    else:
        found = [Dtype.FP32]
    return [d for d in found if not (d is Dtype.FP16 and model_type in FP16_UNSUPPORTED)]


VLLM_DTYPE_NAMES = {Dtype.BF16: "bfloat16", Dtype.FP16: "float16", Dtype.FP32: "float32"}
