"""Resolve `precision` for the selected devices: the compute dtype, quantisation config, warnings.

The rules are pure functions of the GPUs' compute capabilities (no CUDA call), so they are tested
with invented fleets and can be shared by the planner; torch and bitsandbytes are imported only by
`torch_dtype` and `resolve_precision`.

- `auto`: bf16 when every selected GPU has compute capability ≥ 8.0, else fp16; fp32 on CPU only.
- explicit bf16 on a GPU without it: a `HardwareError` naming the GPU and its capability.
- int8/int4: a `BitsAndBytesConfig` when CUDA is present and bitsandbytes is importable.
- known model-specific hazards (GLM-4-0414, `model_type: glm4`, is unstable in fp16) as warnings.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from glmdeploy.config.settings import Dtype, Precision, Quantization
from glmdeploy.hardware.gpu_select import GpuAssignment
from glmdeploy.problems import HardwareError, LoadError, Problem

BF16_CAPABILITY = (8, 0)  # Ampere; V100 (7.0) and T4 (7.5) have no bf16
_TORCH_NAMES = {Dtype.BF16: "bfloat16", Dtype.FP16: "float16", Dtype.FP32: "float32"}
# model_type -> (dtype, why it is a bad idea)
FP_HAZARDS: dict[tuple[str, Dtype], str] = {
    ("glm4", Dtype.FP16): (
        "GLM-4-0414 models (model_type glm4) are numerically unstable in fp16 (overflowing "
        "activations give NaNs or garbage); use bf16 on GPUs with compute capability ≥ 8.0, or fp32"
    ),
}


@dataclass(frozen=True)
class GpuCapability:
    """What precision needs to know about one selected GPU."""

    physical_id: int
    name: str
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class ResolvedPrecision:
    """The outcome of `resolve_precision`.

    Attributes:
        dtype: the concrete compute dtype (bf16, fp16 or fp32).
        quantization: `precision.quantization`.
        reason: one line saying why this dtype (shown by the CLI).
        warnings: known hazards of this choice.
        quantization_config: a `transformers.BitsAndBytesConfig` for int8/int4, else None.
    """

    dtype: Dtype
    quantization: Quantization
    reason: str
    warnings: tuple[str, ...] = ()
    quantization_config: Any = None

    def torch_dtype(self) -> Any:
        """The `torch.dtype` for `from_pretrained(dtype=…)`."""
        return torch_dtype(self.dtype)

    def mismatches(self, plan_dtype: str, plan_quantization: str) -> list[Problem]:
        """Why a plan made for `plan_dtype`/`plan_quantization` does not size this precision."""
        pairs = [
            ("precision.dtype", plan_dtype, str(self.dtype)),
            ("precision.quantization", plan_quantization, str(self.quantization)),
        ]
        return [
            Problem(
                path,
                f"the plan was made for {old}, this load resolves to {new}",
                hint=f"plan with {path}={new}, or set {path}={old}",
            )
            for path, old, new in pairs
            if old != new
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype),
            "quantization": str(self.quantization),
            "reason": self.reason,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class QuantizationSupport:
    """Whether int8/int4 (bitsandbytes on CUDA GPUs) can run on the GPUs a plan is for.

    Attributes:
        runs: they can run there. Declared GPUs are assumed to; this machine's selected GPUs only
            with bitsandbytes installed; never without a GPU.
        missing_here: what this machine lacks to run them ("a CUDA GPU", "bitsandbytes").
        declared: the plan is for a declared fleet, not for this machine.
    """

    runs: bool
    missing_here: tuple[str, ...] = ()
    declared: bool = False

    def refusal(self, quant: Quantization) -> Problem:
        """Why `quant` cannot be planned for this machine."""
        lacking = " and ".join(self.missing_here)
        why = f"this machine lacks {lacking}" if lacking else "no GPU is selected"
        return Problem(
            "precision.quantization",
            f"{quant} runs on CUDA GPUs through bitsandbytes; {why}",
            expected="quantization=none here",
            hint="precision.quantization=none; or plan for a declared fleet (e.g. gpus=2x24gib), "
            "or on a machine with a CUDA GPU and bitsandbytes",
        )

    def note(self, quant: Quantization) -> str | None:
        """What a plan with `quant` assumes that this machine cannot do (None: nothing)."""
        if quant is Quantization.NONE or not self.missing_here:
            return None
        return (
            f"{quant} assumes the declared GPUs run bitsandbytes; this machine lacks "
            f"{' and '.join(self.missing_here)}, so it can plan this deployment but not load it"
        )


ASSUMED = QuantizationSupport(runs=True)  # planning for invented devices: assume it runs


def quantization_support(
    assignment: GpuAssignment,
    *,
    machine_has_gpu: bool | None = None,
    bitsandbytes: bool | None = None,
) -> QuantizationSupport:
    """Whether int8/int4 can run on `assignment`'s GPUs, and what this machine lacks for them.

    Nothing here initialises CUDA: this machine has a GPU when NVML lists one (for a probed
    assignment: when it selected one). `machine_has_gpu` and `bitsandbytes` replace the real
    checks in tests.
    """
    if bitsandbytes is None:
        bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    if machine_has_gpu is None:
        if assignment.declared:
            from glmdeploy.hardware.nvml import probe

            machine_has_gpu = bool(probe().gpus)
        else:
            machine_has_gpu = bool(assignment.devices)
    lacks = [("a CUDA GPU", machine_has_gpu), ("bitsandbytes", bitsandbytes)]
    missing = tuple(what for what, present in lacks if not present)
    if assignment.declared:
        return QuantizationSupport(bool(assignment.devices), missing, declared=True)
    return QuantizationSupport(not missing, missing)


def torch_dtype(dtype: Dtype) -> Any:
    """`torch.bfloat16` / `torch.float16` / `torch.float32` for a concrete dtype."""
    import torch

    if dtype not in _TORCH_NAMES:
        raise ValueError(f"dtype {dtype!s} must be resolved first (resolve_dtype)")
    return getattr(torch, _TORCH_NAMES[dtype])


def resolve_dtype(dtype: Dtype, gpus: tuple[GpuCapability, ...]) -> tuple[Dtype, str]:
    """The concrete dtype for `precision.dtype` on `gpus` (empty: CPU only), and why.

    Raises:
        HardwareError: bf16 asked for on a GPU without it (every such GPU named).
    """
    lacking = [g for g in gpus if g.compute_capability < BF16_CAPABILITY]
    if dtype is Dtype.AUTO:
        if not gpus:
            return Dtype.FP32, "auto: fp32, the model runs on the CPU"
        if not lacking:
            return Dtype.BF16, "auto: bf16, every selected GPU has compute capability ≥ 8.0"
        return Dtype.FP16, f"auto: fp16, {_gpu_list(lacking)} without bf16 (capability < 8.0)"
    if dtype is Dtype.BF16 and lacking:
        problems = [
            Problem(
                "precision.dtype",
                f"GPU {g.physical_id} ({g.name}) has compute capability "
                f"{g.compute_capability[0]}.{g.compute_capability[1]}; bf16 needs 8.0 or newer",
                expected="fp16 or fp32 on this GPU",
                hint="precision=fp16 (or precision=auto), or select GPUs with compute capability "
                "≥ 8.0 (`glmdeploy doctor` lists them)",
            )
            for g in lacking
        ]
        raise HardwareError(problems)
    return dtype, f"{dtype}, as configured"


def model_warnings(model_type: str, dtype: Dtype) -> tuple[str, ...]:
    """Known hazards of running `model_type` in `dtype`."""
    hazard = FP_HAZARDS.get((model_type, dtype))
    return (hazard,) if hazard else ()


def resolve_precision(
    precision: Precision,
    gpus: tuple[GpuCapability, ...],
    *,
    model_type: str,
    offload: bool = False,
    cuda_available: bool | None = None,
    bitsandbytes_available: bool | None = None,
) -> ResolvedPrecision:
    """Resolve `precision` for the selected GPUs (empty: CPU only).

    Args:
        precision: the configured precision.
        gpus: the selected GPUs.
        model_type: `config.model_type`, for model-specific warnings.
        offload: the plan puts weights on cpu/disk (int8 then keeps those in fp32).
        cuda_available: whether CUDA works here (None: ask torch; asked only for int8/int4).
        bitsandbytes_available: whether bitsandbytes imports (None: look for it).

    Raises:
        HardwareError: bf16 on a GPU without it; int8/int4 without a CUDA GPU.
        LoadError: int8/int4 without bitsandbytes installed.
    """
    dtype, reason = resolve_dtype(precision.dtype, gpus)
    warnings = list(model_warnings(model_type, dtype))
    if not gpus and dtype is Dtype.FP16:
        warnings.append("fp16 on the CPU is slow and some kernels lack it; fp32 or bf16 is better")
    quant = precision.quantization
    config = None
    if quant is not Quantization.NONE:
        config = _bitsandbytes_config(
            quant, dtype, bool(gpus), offload, cuda_available, bitsandbytes_available
        )
    return ResolvedPrecision(dtype, quant, reason, tuple(warnings), config)


def _bitsandbytes_config(
    quant: Quantization,
    dtype: Dtype,
    has_gpus: bool,
    offload: bool,
    cuda_available: bool | None,
    bnb_available: bool | None,
) -> Any:
    if cuda_available is None and has_gpus:
        import torch

        cuda_available = bool(torch.cuda.is_available())
    if not has_gpus or not cuda_available:
        why = "no GPU is selected" if not has_gpus else "CUDA is not available in this process"
        raise HardwareError(
            [
                Problem(
                    "precision.quantization",
                    f"{quant} quantisation runs on CUDA GPUs through bitsandbytes, but {why}",
                    expected="quantization=none without a CUDA GPU",
                    hint="precision.quantization=none, or select a GPU (`glmdeploy doctor`)",
                )
            ]
        )
    if bnb_available is None:
        bnb_available = importlib.util.find_spec("bitsandbytes") is not None
    if not bnb_available:
        raise LoadError(
            [
                Problem(
                    "precision.quantization",
                    f"{quant} quantisation needs bitsandbytes, which is not installed",
                    hint="pip install bitsandbytes, or precision.quantization=none",
                )
            ]
        )
    from transformers import BitsAndBytesConfig as Config

    bnb: Any = Config  # untyped upstream
    if quant is Quantization.INT8:
        # Offloaded modules stay unquantised, in fp32, on cpu/disk: bitsandbytes cannot run them.
        return bnb(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)
    return bnb(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch_dtype(dtype),
        llm_int8_enable_fp32_cpu_offload=offload,
    )


def _gpu_list(gpus: list[GpuCapability]) -> str:
    names = ", ".join(
        f"GPU {g.physical_id} ({g.name}, {g.compute_capability[0]}.{g.compute_capability[1]})"
        for g in gpus
    )
    return names + (" is" if len(gpus) == 1 else " are")


def selected_gpus(assignment: GpuAssignment) -> tuple[GpuCapability, ...]:
    """The `GpuCapability` of every GPU in `assignment` (empty for a CPU-only one)."""
    return tuple(
        GpuCapability(d.physical_id, d.name, d.compute_capability) for d in assignment.devices
    )
