"""What vLLM refuses is refused before anything starts, with vLLM's reason and a fix; vLLM's
`dtype: auto`; which checkpoint vLLM gets (legacy ChatGLM: the original, remote code opted in)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from glmdeploy.config.deployments import load_deployment
from glmdeploy.config.settings import Dtype, Parallel
from glmdeploy.engines.vllm.checkpoint import VllmCheckpoint
from glmdeploy.engines.vllm.export import VllmDoesNotFit, export_vllm
from glmdeploy.engines.vllm.rules import vllm_dtype, vllm_problems
from glmdeploy.hardware.precision import GpuCapability
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.problems import ConfigError, HardwareError

from builders import TINY_ARCH, make_deployment

AMPERE = (GpuCapability(0, "A100", (8, 0)),)
TURING = (GpuCapability(0, "T4", (7, 5)),)
VOLTA = (GpuCapability(0, "V100", (7, 0)),)


def _refusal(*overrides: str) -> ConfigError:
    deployment = load_deployment(["engine=vllm", *overrides]).deployment
    with pytest.raises(ConfigError) as info:
        export_vllm(deployment)
    return info.value


def _ckpt(model_type: str, dtype: Dtype | None = None, arch: str = "X") -> VllmCheckpoint:
    return VllmCheckpoint("m", None, arch, model_type, config_dtype=dtype)


def test_heads_not_divisible_by_tp() -> None:
    error = _refusal("model=llama-3-8b", "gpus=4x24gib", "parallel.tp_size=3")
    assert error.exit_code == 2
    (problem,) = [p for p in error.problems if "attention heads" in p.message]
    assert problem.path == "parallel.tp_size"
    assert "Total number of attention heads (32) must be divisible by tensor parallel size (3)" in (
        problem.message
    )


def test_kv_heads_neither_divide_nor_are_divided_by_tp() -> None:
    error = _refusal("model=glm-4.5-air", "gpus=8x80gib", "parallel.tp_size=12")
    messages = [p.message for p in error.problems]
    assert any("cannot split 8 KV heads over tp 12" in m for m in messages)
    assert any("moe_intermediate_size (1408)" in m for m in messages)


def test_tp_4_on_two_kv_heads_is_refused_by_transformers_with_a_pointer_to_vllm() -> None:
    with pytest.raises(ConfigError) as info:
        load_deployment(["model=glm-4-9b-chat-hf", "gpus=4x24gib", "parallel=tp4"])
    (problem,) = info.value.problems
    assert problem.path == "parallel.tp_size"
    assert "does not divide the model's 2 KV heads" in problem.message
    assert problem.hint is not None and "engine=vllm" in problem.hint
    accepted = load_deployment(
        ["model=glm-4-9b-chat-hf", "gpus=4x24gib", "parallel=tp4", "engine=vllm"]
    ).deployment
    assert export_vllm(accepted).fit.ranks[0].kv_heads == 1


def test_fp16_is_refused_for_the_glm4_model_type() -> None:
    error = _refusal(
        "model=glm-4-9b-chat-hf",
        "model.architecture.model_type=glm4",
        "gpus=2x24gib",
        "precision=fp16",
    )
    (problem,) = error.problems
    assert problem.path == "precision.dtype"
    assert "The model type 'glm4' does not support float16" in problem.message
    assert "Numerical instability" in problem.message


def test_pipeline_parallelism_is_refused_for_a_model_without_it() -> None:
    anatomy = build_anatomy(config_from_architecture(TINY_ARCH))
    deployment = replace(make_deployment(architecture=TINY_ARCH), parallel=Parallel(1, 2))
    problems = vllm_problems(
        deployment, _ckpt("gemma3n_text", arch="Gemma3nForCausalLM"), anatomy, AMPERE, Dtype.BF16
    )
    assert [p.path for p in problems] == ["parallel.pp_size"]
    assert "Supported models implement the `SupportsPP` interface" in problems[0].message
    assert not vllm_problems(
        deployment, _ckpt("glm", arch="GlmForCausalLM"), anatomy, AMPERE, Dtype.BF16
    )


def test_bitsandbytes_precisions_map_or_are_refused_with_alternatives() -> None:
    error = _refusal("model=llama-3-8b", "gpus=1x80gib", "precision=int4")
    (problem,) = error.problems
    assert "no bitsandbytes" in problem.message and "AWQ or GPTQ" in str(problem.hint)
    int8 = export_vllm(
        load_deployment(
            ["engine=vllm", "model=llama-3-8b", "gpus=1x80gib", "precision=int8"]
        ).deployment
    )
    assert int8.config["quantization"] == "fp8_per_channel"
    assert any("a different numeric format" in n for n in int8.notes)
    volta = _refusal(
        "model=llama-3-8b",
        "precision=int8",
        "gpus=1x80gib",
        "gpus.declared=[{name: V100, memory_gib: 32, compute_capability: [7, 0]}]",
    )
    assert "needs compute capability 7.5" in volta.problems[0].message


def test_a_bitsandbytes_checkpoint_is_refused(tmp_path: Path, chatglm3_tiny: Path) -> None:
    from glmdeploy.model.hf_config import read_config_json

    ckpt = tmp_path / "bnb"
    shutil.copytree(chatglm3_tiny, ckpt)
    config = read_config_json(ckpt)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (ckpt / "config.json").write_text(json.dumps(config))
    error = _refusal(
        "model=local",
        f"model.source.path={ckpt}",
        "gpus=1x80gib",
        "runtime.max_context_tokens=128",
        "model.source.trust_remote_code=true",
    )
    assert any("a bitsandbytes checkpoint" in p.message for p in error.problems)


def test_legacy_chatglm_needs_remote_code_opted_in_and_gets_the_original(
    chatglm3_tiny: Path,
) -> None:
    base = [
        "model=local",
        f"model.source.path={chatglm3_tiny}",
        "gpus=1x80gib",
        "runtime.max_context_tokens=128",
        "runtime.max_new_tokens=8",
    ]
    error = _refusal(*base)
    (problem,) = error.problems
    assert problem.path == "model.source.trust_remote_code"
    assert "tokenization_chatglm.py" in problem.message and "AutoTokenizer" in problem.message
    export = export_vllm(
        load_deployment(["engine=vllm", *base, "model.source.trust_remote_code=true"]).deployment
    )
    assert export.config["model"] == str(chatglm3_tiny.resolve())  # the original, not converted
    assert export.config["trust-remote-code"] is True
    assert export.checkpoint.architecture == "ChatGLMModel"
    assert export.checkpoint.implementation is not None
    assert export.checkpoint.implementation.vllm_class == "chatglm.ChatGLMForCausalLM"
    assert export.dtype is Dtype.BF16  # its float32 config runs in vLLM's preferred dtype


def test_hub_chatglm_names_the_remote_tokenizer_and_the_hf_alternative() -> None:
    error = _refusal("model=glm-4-9b-chat", "gpus=1x80gib")
    (problem,) = error.problems
    assert "model=glm-4-9b-chat-hf" in str(problem.hint)
    with pytest.raises(ConfigError) as unpinned:
        load_deployment(
            ["engine=vllm", "model=glm-4-9b-chat", "model.source.trust_remote_code=true"]
        )
    assert unpinned.value.problems[0].path == "model.source.revision"
    with pytest.raises(ConfigError):  # the transformers engine converts it: no remote code
        load_deployment(
            [
                "model=glm-4-9b-chat",
                "model.source.trust_remote_code=true",
                "model.source.revision=abc",
            ]
        )


def test_context_beyond_the_checkpoints_limit_and_fp32_kv_cache(chatglm3_tiny: Path) -> None:
    error = _refusal(
        "model=local",
        f"model.source.path={chatglm3_tiny}",
        "gpus=1x80gib",
        "model.source.trust_remote_code=true",
        "runtime.kv_cache_dtype=fp32",
        "precision=bf16",
    )
    messages = {p.path: p.message for p in error.problems}
    assert (
        "User-specified max_model_len (4096) is greater than the derived max_model_len (128"
        in (messages["runtime.max_context_tokens"])
    )
    assert "no float32" in messages["runtime.kv_cache_dtype"]


@pytest.mark.parametrize(
    ("requested", "config", "model_type", "gpus", "expected"),
    [
        (Dtype.AUTO, Dtype.FP32, "glm", AMPERE, Dtype.BF16),  # fp32 checkpoints run in bf16
        (Dtype.AUTO, Dtype.FP32, "glm", TURING, Dtype.FP16),
        (Dtype.AUTO, Dtype.FP16, "glm", AMPERE, Dtype.FP16),  # a supported config dtype stays
        (Dtype.AUTO, Dtype.BF16, "glm", TURING, Dtype.FP16),  # bf16 unsupported: preferred
        (Dtype.AUTO, Dtype.FP16, "glm4", AMPERE, Dtype.BF16),  # glm4 never runs in fp16
        (Dtype.AUTO, Dtype.BF16, "glm4", TURING, Dtype.FP32),
        (Dtype.AUTO, None, "llama", AMPERE, Dtype.BF16),  # unknown: vLLM's preferred
        (Dtype.FP32, Dtype.BF16, "glm", AMPERE, Dtype.FP32),
    ],
)
def test_vllm_auto_dtype(
    requested: Dtype,
    config: Dtype | None,
    model_type: str,
    gpus: tuple[GpuCapability, ...],
    expected: Dtype,
) -> None:
    assert vllm_dtype(requested, _ckpt(model_type, config), gpus)[0] is expected


def test_bf16_on_a_gpu_without_it_is_a_hardware_error() -> None:
    with pytest.raises(HardwareError) as info:
        vllm_dtype(Dtype.BF16, _ckpt("glm"), VOLTA)
    assert "compute capability of at least 8.0" in info.value.problems[0].message


def test_fewer_gpus_than_ranks_per_node() -> None:
    deployment = load_deployment(
        ["engine=vllm", "model=llama-3-8b", "gpus=2x24gib", "parallel=tp4"]
    ).deployment
    with pytest.raises(HardwareError) as info:
        export_vllm(deployment)
    assert "need 4 GPU(s) on this node, but gpus selects 2" in info.value.problems[0].message


def test_does_not_fit_says_vllms_estimate_and_the_fixes() -> None:
    deployment = load_deployment(
        [
            "engine=vllm",
            "model=glm-4-9b-chat-hf",
            "gpus=1x80gib",
            "runtime.max_context_tokens=131072",
            "engine.gpu_memory_utilization=0.3",
        ]
    ).deployment
    with pytest.raises(VllmDoesNotFit) as info:
        export_vllm(deployment)
    error, fit = info.value, info.value.export.fit
    assert error.exit_code == 5
    problems = {p.path: p for p in error.problems}
    length = problems["runtime.max_context_tokens"]
    assert "To serve at least one request with the model's max seq len (131072)" in length.message
    assert f"the estimated maximum model length is {fit.largest_max_model_len}." in length.message
    assert length.hint == f"runtime.max_context_tokens={fit.largest_max_model_len}"
    assert problems["engine.gpu_memory_utilization"].hint == (
        f"engine.gpu_memory_utilization={fit.min_gpu_memory_utilization}"
    )
    fixed = load_deployment(
        [
            "engine=vllm",
            "model=glm-4-9b-chat-hf",
            "gpus=1x80gib",
            "runtime.max_context_tokens=131072",
            f"engine.gpu_memory_utilization={fit.min_gpu_memory_utilization}",
        ]
    )
    assert export_vllm(fixed.deployment).fits
