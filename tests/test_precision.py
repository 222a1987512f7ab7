"""Precision resolution on invented GPUs: dtype rules, errors, quantisation, model hazards."""

from __future__ import annotations

import pytest
import torch

from glmdeploy.config.settings import Dtype, GpuMode, Precision, Quantization
from glmdeploy.hardware.gpu_select import AssignedGpu, GpuAssignment
from glmdeploy.hardware.precision import (
    GpuCapability,
    model_warnings,
    resolve_dtype,
    resolve_precision,
    selected_gpus,
    torch_dtype,
)
from glmdeploy.problems import HardwareError, LoadError, render_problems

A100 = GpuCapability(0, "NVIDIA A100-SXM4-80GB", (8, 0))
H100 = GpuCapability(1, "NVIDIA H100 80GB HBM3", (9, 0))
V100 = GpuCapability(2, "Tesla V100-SXM2-32GB", (7, 0))
T4 = GpuCapability(3, "Tesla T4", (7, 5))


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ((), Dtype.FP32),
        ((A100,), Dtype.BF16),
        ((A100, H100), Dtype.BF16),
        ((V100,), Dtype.FP16),
        ((A100, T4), Dtype.FP16),  # one GPU without bf16 decides for all
    ],
)
def test_auto_picks_by_capability(gpus: tuple[GpuCapability, ...], expected: Dtype) -> None:
    dtype, reason = resolve_dtype(Dtype.AUTO, gpus)
    assert dtype is expected
    assert reason.startswith(f"auto: {expected}")


def test_auto_fp16_names_the_gpus_without_bf16() -> None:
    _, reason = resolve_dtype(Dtype.AUTO, (A100, T4))
    assert "GPU 3 (Tesla T4, 7.5)" in reason and "A100" not in reason


@pytest.mark.parametrize("dtype", [Dtype.FP16, Dtype.FP32, Dtype.BF16])
def test_explicit_dtypes_pass_where_supported(dtype: Dtype) -> None:
    assert resolve_dtype(dtype, (A100, H100))[0] is dtype
    assert resolve_dtype(dtype, ())[0] is dtype  # the CPU runs all three


def test_bf16_on_gpus_without_it_names_each_gpu() -> None:
    with pytest.raises(HardwareError) as err:
        resolve_dtype(Dtype.BF16, (A100, V100, T4))
    problems = err.value.problems
    assert [p.path for p in problems] == ["precision.dtype", "precision.dtype"]
    assert "GPU 2 (Tesla V100-SXM2-32GB) has compute capability 7.0" in problems[0].message
    assert "GPU 3 (Tesla T4) has compute capability 7.5" in problems[1].message
    assert all("precision=fp16" in (p.hint or "") for p in problems)
    text = render_problems(err.value.title, problems)
    assert text.startswith("error: hardware does not match the config (2 problems)")
    assert "bf16 needs 8.0 or newer" in text


def test_glm4_in_fp16_warns() -> None:
    assert model_warnings("glm4", Dtype.FP16)
    assert not model_warnings("glm4", Dtype.BF16)
    assert not model_warnings("glm", Dtype.FP16)
    resolved = resolve_precision(Precision(Dtype.AUTO), (V100,), model_type="glm4")
    assert resolved.dtype is Dtype.FP16
    assert any("unstable in fp16" in w for w in resolved.warnings)
    assert not resolve_precision(Precision(Dtype.AUTO), (H100,), model_type="glm4").warnings


def test_cpu_resolution() -> None:
    resolved = resolve_precision(Precision(Dtype.AUTO), (), model_type="glm")
    assert (resolved.dtype, resolved.quantization_config) == (Dtype.FP32, None)
    assert resolved.torch_dtype() is torch.float32
    assert resolved.to_dict()["dtype"] == "fp32"
    slow = resolve_precision(Precision(Dtype.FP16), (), model_type="glm")
    assert any("slow" in w for w in slow.warnings)


@pytest.mark.parametrize("quant", [Quantization.INT8, Quantization.INT4])
def test_quantisation_needs_a_cuda_gpu(quant: Quantization) -> None:
    with pytest.raises(HardwareError) as err:
        resolve_precision(Precision(Dtype.AUTO, quant), (), model_type="glm")
    (problem,) = err.value.problems
    assert problem.path == "precision.quantization" and "no GPU is selected" in problem.message
    with pytest.raises(HardwareError, match="CUDA is not available"):
        resolve_precision(
            Precision(Dtype.AUTO, quant), (A100,), model_type="glm", cuda_available=False
        )


def test_quantisation_needs_bitsandbytes() -> None:
    with pytest.raises(LoadError) as err:
        resolve_precision(
            Precision(Dtype.AUTO, Quantization.INT4),
            (A100,),
            model_type="glm",
            cuda_available=True,
            bitsandbytes_available=False,
        )
    (problem,) = err.value.problems
    assert "pip install bitsandbytes" in (problem.hint or "")


def test_quantisation_configs() -> None:
    def resolve(quant: Quantization, offload: bool) -> object:
        return resolve_precision(
            Precision(Dtype.AUTO, quant), (A100,), model_type="glm", offload=offload,
            cuda_available=True, bitsandbytes_available=True,
        ).quantization_config  # fmt: skip

    int8 = resolve(Quantization.INT8, True)
    assert getattr(int8, "load_in_8bit", None) is True
    assert getattr(int8, "llm_int8_enable_fp32_cpu_offload", None) is True
    int4 = resolve(Quantization.INT4, False)
    assert getattr(int4, "load_in_4bit", None) is True
    assert getattr(int4, "bnb_4bit_compute_dtype", None) is torch.bfloat16  # A100: auto -> bf16


def test_torch_dtypes() -> None:
    assert torch_dtype(Dtype.BF16) is torch.bfloat16
    assert torch_dtype(Dtype.FP16) is torch.float16
    with pytest.raises(ValueError, match="resolved first"):
        torch_dtype(Dtype.AUTO)


def test_selected_gpus_from_an_assignment() -> None:
    device = AssignedGpu(5, 0, "Tesla V100", "GPU-x", 32 << 30, 32 << 30, (7, 0))
    assignment = GpuAssignment(GpuMode.IDS, (device,))
    assert selected_gpus(assignment) == (GpuCapability(5, "Tesla V100", (7, 0)),)
    assert selected_gpus(GpuAssignment(GpuMode.CPU, ())) == ()
