"""An export for humans: the header, the per-rank fit table (rich), the verdict and the notes."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from glmdeploy.config.settings import GIB
from glmdeploy.engines.vllm import facts

if TYPE_CHECKING:
    from glmdeploy.engines.vllm.export import VllmExport
    from glmdeploy.engines.vllm.fit import RankFit, VllmFit

_COLUMNS = ("rank", "GPU", "layers", "requested", "weights", "activ.*", "graphs*", "other*",
            "KV cache", "KV heads", "KiB/token", "verdict")  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def fit_table(fit: VllmFit) -> Any:
    """One row per rank: its GPU, layers and budget terms (GiB); * marks estimates."""
    from rich import box
    from rich.table import Table

    title = f"vLLM {facts.VLLM_VERSION} fit check per rank (sizes in GiB, * estimates)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in _COLUMNS:
        left = col in ("GPU", "layers", "verdict")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    multinode = len({r.node for r in fit.ranks}) > 1
    for r in fit.ranks:
        table.add_row(
            str(r.rank), f"{f'n{r.node} ' if multinode else ''}GPU {r.gpu_id}",
            f"{r.layers[0]}-{r.layers[1] - 1}", _gib(r.requested_bytes), _gib(r.weights_bytes),
            _gib(r.activation_bytes), _gib(r.cudagraph_bytes), _gib(r.overhead_bytes),
            _gib(r.kv_available_bytes), str(r.kv_heads), f"{r.kv_bytes_per_token / 1024:g}",
            _rank_verdict(r),
        )  # fmt: skip
    return table


def _rank_verdict(r: RankFit) -> str:
    if not r.starts:
        return "no start"
    if r.kv_available_bytes <= 0:
        return "no KV room"
    return f"{r.num_blocks:,} blocks" if r.one_request_fits else "len too long"


def verdict_lines(fit: VllmFit) -> list[str]:
    """What vLLM would log, the largest length, the smallest utilisation, and the verdict."""
    s = fit.settings
    length, target = s.max_model_len, f"{s.batch_size}×{s.max_model_len:,} tokens"
    capped = " (the model's limit)" if fit.largest_max_model_len >= s.model_max_len else ""
    need, ceiling = fit.min_gpu_memory_utilization, fit.max_gpu_memory_utilization
    utilization = (
        f"smallest gpu-memory-utilization for {target}: {need} (now {s.gpu_memory_utilization}, "
        f"startup allows at most {ceiling})"
        if need is not None
        else f"no gpu-memory-utilization fits {target} (startup allows at most {ceiling})"
    )
    verdict = (
        f"fits: {target} on every rank (max-num-batched-tokens {s.max_num_batched_tokens}, "
        f"max-num-seqs {s.max_num_seqs})"
        if fit.fits
        else f"does not fit {target} under vLLM's rules"
    )
    return [
        f"vLLM would log: GPU KV cache size: {fit.kv_cache_tokens:,} tokens, Maximum concurrency "
        f"for {length:,} tokens per request: {fit.concurrency:.2f}x",
        f"largest max-model-len that fits: {fit.largest_max_model_len:,}{capped}, maximum "
        f"concurrency there {fit.concurrency_at_largest:.2f}x",
        utilization,
        verdict,
    ]


def print_export(export: VllmExport, *, written: str | None = None) -> None:
    """The export as the CLI prints it (stdout); the YAML and commands printed verbatim."""
    from rich.console import Console

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
    ckpt, dep = export.checkpoint, export.deployment
    impl = ckpt.implementation
    runs = f"vLLM's {impl.vllm_class}" if impl else "an implementation glmdeploy has not checked"
    gpus = sorted({f"GPU {r.gpu_id} {r.gpu_name}" for r in export.fit.ranks})
    console.print(f"model {dep.model.name} for vLLM {facts.VLLM_VERSION}: "
                  f"{ckpt.model or '(no checkpoint)'} ({ckpt.architecture}, {runs})")  # fmt: skip
    console.print(f"deployment: {dep.summary()}")
    console.print(f"dtype: {export.dtype_reason}")
    console.print(f"GPUs: {', '.join(gpus)}")
    console.print(fit_table(export.fit))
    for line in verdict_lines(export.fit):
        console.print(line)
    for note in export.notes:
        console.print(f"note: {note}")
    for name, text in export.fit.estimates.items():
        console.print(f"estimate: {name}: {text}")
    if written is None:
        return
    print(f"wrote {written}:", flush=True)
    print(export.yaml_text(), end="")  # verbatim: a wrapped line would break the YAML
    for command in export.commands:
        node = f" on node {command.node}" if len(export.commands) > 1 else ""
        print(f"run{node}: {command.shell}")
