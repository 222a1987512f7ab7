"""Run a loaded model: greedy generation, and a benchmark of time to first token, tokens/s, memory.

Inputs go to the embedding's execution device (`LoadedModel.input_device`); the dispatched model
itself is never moved. Without a tokenizer the prompt becomes token ids, one per UTF-8 byte modulo
the vocabulary size, so runs stay deterministic.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from glmdeploy.config.settings import Runtime
from glmdeploy.loading.loader import LoadedModel, quiet_transformers
from glmdeploy.loading.verify import DeviceBytes
from glmdeploy.problems import ConfigError, Problem
from glmdeploy.process import default_collector


@dataclass(frozen=True)
class GenerateResult:
    """Greedy generation: the prompt's ids, the new ids per sequence, and their text if known."""

    prompt: str
    prompt_ids: tuple[tuple[int, ...], ...]
    new_ids: tuple[tuple[int, ...], ...]
    text: tuple[str, ...] | None  # decoded new tokens; None without a tokenizer
    seconds: float
    input_device: str

    @property
    def new_tokens(self) -> int:
        return sum(len(ids) for ids in self.new_ids)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["new_tokens"] = self.new_tokens
        return out


@dataclass(frozen=True)
class DeviceMemory:
    """Peak memory of one device during the benchmark (bytes; None where it cannot be measured).

    CUDA devices: `torch.cuda.max_memory_allocated` / `max_memory_reserved`, reset before the runs.
    The CPU: the process's resident set now, and its peak over the process lifetime (`ru_maxrss`).
    """

    device: str
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    rss_bytes: int | None = None
    peak_rss_bytes: int | None = None


@dataclass(frozen=True)
class BenchResult:
    """`bench`: medians over the repeats (after one warm-up run), memory, plan vs actual bytes.

    `ttft_seconds` is prefill plus the first token; `decode_tokens_per_s` counts the tokens after
    the first (all sequences of the batch) over the time after the first; None with one new token.
    """

    repeats: int
    batch_size: int
    prompt_tokens: int
    new_tokens: int  # per sequence, every run
    load_seconds: float
    ttft_seconds: float
    decode_tokens_per_s: float | None
    ttft_runs: tuple[float, ...]
    decode_runs: tuple[float, ...]
    memory: tuple[DeviceMemory, ...]
    device_bytes: tuple[DeviceBytes, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["device_bytes"] = [d.to_dict() for d in self.device_bytes]
        return out


def prompt_ids(loaded: LoadedModel, runtime: Runtime) -> torch.Tensor:
    """The prompt as a (batch_size × tokens) id tensor on the CPU."""
    if loaded.tokenizer is not None:
        ids = [int(i) for i in loaded.tokenizer(runtime.prompt)["input_ids"]]
    else:
        vocab = int(loaded.model.config.get_text_config().vocab_size)
        ids = [byte % vocab for byte in runtime.prompt.encode("utf-8")]
    if not ids:
        raise ConfigError([Problem("runtime.prompt", "the prompt is empty", "some text")])
    return torch.tensor([ids] * runtime.batch_size, dtype=torch.long)


def generate(
    loaded: LoadedModel, runtime: Runtime, input_ids: torch.Tensor | None = None
) -> GenerateResult:
    """Greedy-decode up to `runtime.max_new_tokens` (within `max_context_tokens`) new tokens.

    Args:
        loaded: the model.
        runtime: prompt, batch size, token limits.
        input_ids: ids to use instead of the prompt (batch × tokens).
    """
    ids = prompt_ids(loaded, runtime) if input_ids is None else input_ids
    config = _greedy_config(loaded, runtime, ids.shape[1])
    default_collector()  # the model runs as in any process (glmdeploy.process)
    started = time.perf_counter()
    with torch.inference_mode(), quiet_transformers():
        out = loaded.model.generate(
            ids.to(loaded.input_device),
            attention_mask=torch.ones_like(ids).to(loaded.input_device),
            generation_config=config,
        )
    seconds = time.perf_counter() - started
    new = out[:, ids.shape[1] :].cpu()
    text = None
    if loaded.tokenizer is not None:
        text = tuple(loaded.tokenizer.batch_decode(new, skip_special_tokens=True))
    return GenerateResult(
        prompt=runtime.prompt if input_ids is None else "",
        prompt_ids=tuple(tuple(int(t) for t in row) for row in ids.tolist()),
        new_ids=tuple(tuple(int(t) for t in row) for row in new.tolist()),
        text=text,
        seconds=seconds,
        input_device=str(loaded.input_device),
    )


def bench(loaded: LoadedModel, runtime: Runtime, repeats: int = 5) -> BenchResult:
    """Time `repeats` greedy runs of exactly `max_new_tokens` new tokens (after a warm-up run)."""
    if repeats < 1:
        raise ConfigError([Problem("repeats", f"{repeats}", "at least 1")])
    ids = prompt_ids(loaded, runtime)
    config = _greedy_config(loaded, runtime, ids.shape[1])
    config.min_new_tokens = config.max_new_tokens  # every run decodes the same number of tokens
    default_collector()  # timed as in any process (glmdeploy.process)
    reset_peak_memory(loaded)
    ttft: list[float] = []
    decode: list[float] = []
    inputs = ids.to(loaded.input_device)
    mask = torch.ones_like(ids).to(loaded.input_device)
    for run in range(repeats + 1):
        clock = _TokenClock()
        with torch.inference_mode(), quiet_transformers():
            started = time.perf_counter()
            loaded.model.generate(inputs, attention_mask=mask, generation_config=config,
                                  streamer=clock)  # fmt: skip
        if run == 0:
            continue  # warm-up: allocator, kernels, page cache
        stamps = clock.stamps[1:]  # the first call hands over the prompt
        ttft.append(stamps[0] - started)
        if len(stamps) > 1:
            decode.append((len(stamps) - 1) * ids.shape[0] / (stamps[-1] - stamps[0]))
    return BenchResult(
        repeats=repeats,
        batch_size=ids.shape[0],
        prompt_tokens=ids.shape[1],
        new_tokens=int(config.max_new_tokens),
        load_seconds=loaded.load_seconds,
        ttft_seconds=statistics.median(ttft),
        decode_tokens_per_s=statistics.median(decode) if decode else None,
        ttft_runs=tuple(ttft),
        decode_runs=tuple(decode),
        memory=peak_memory(loaded),
        device_bytes=loaded.device_bytes,
    )


class _TokenClock(BaseStreamer):
    """Records when `generate` hands over each step's tokens (after they reach the host)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def reset_peak_memory(loaded: LoadedModel) -> None:
    """Start a new peak-memory period on the model's GPUs (see `DeviceMemory`)."""
    for gpu in _gpus(loaded):
        torch.cuda.synchronize(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)


def peak_memory(loaded: LoadedModel) -> tuple[DeviceMemory, ...]:
    """Peak memory of each of the model's GPUs since `reset_peak_memory`, then the CPU's."""
    return (*(_gpu_memory(gpu, loaded) for gpu in _gpus(loaded)), _cpu_memory())


def special_token_ids(model: Any) -> dict[str, Any]:
    """The checkpoint's end, padding and start ids for `GenerationConfig` (padding defaults to
    the first end id, then 0)."""
    base = model.generation_config
    eos = base.eos_token_id
    first_eos = eos[0] if isinstance(eos, Sequence) and eos else eos
    pad = base.pad_token_id if base.pad_token_id is not None else first_eos
    return {"eos_token_id": eos, "pad_token_id": pad if pad is not None else 0,
            "bos_token_id": base.bos_token_id}  # fmt: skip


def _gpus(loaded: LoadedModel) -> list[int]:
    return sorted({d for d in loaded.device_map.values() if isinstance(d, int)})


def _greedy_config(loaded: LoadedModel, runtime: Runtime, prompt_tokens: int) -> Any:
    """Greedy decoding with the checkpoint's eos/pad ids and none of its sampling settings."""
    room = runtime.max_context_tokens - prompt_tokens
    if room < 1:
        message = f"the prompt has {prompt_tokens} tokens, the context {runtime.max_context_tokens}"
        hint = "raise runtime.max_context_tokens or shorten runtime.prompt"
        raise ConfigError([Problem("runtime.max_context_tokens", message, hint=hint)])
    config: Any = GenerationConfig  # untyped upstream
    return config(
        max_new_tokens=min(runtime.max_new_tokens, room),
        do_sample=False,
        num_beams=1,
        **special_token_ids(loaded.model),
    )


def _gpu_memory(gpu: int, loaded: LoadedModel) -> DeviceMemory:
    label = next((d.label for d in loaded.device_bytes if d.device == gpu), f"cuda:{gpu}")
    torch.cuda.synchronize(gpu)
    return DeviceMemory(
        device=label,
        peak_allocated_bytes=int(torch.cuda.max_memory_allocated(gpu)),
        peak_reserved_bytes=int(torch.cuda.max_memory_reserved(gpu)),
    )


def _cpu_memory() -> DeviceMemory:
    rss = peak = None
    try:
        import psutil

        rss = int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        import resource

        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except ImportError:  # Windows
        pass
    return DeviceMemory(device="cpu", rss_bytes=rss, peak_rss_bytes=peak)
