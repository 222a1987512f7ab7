"""The typed view from a validated config dict: `deployment_from_dict` and its sections.

Validation (`glmdeploy.config.validate`) has checked every key and value first; this only types
them, filling what older records lack with the defaults of `glmdeploy.config.settings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glmdeploy.config.serve_settings import runtime_serving_from_dict, serve_from_dict
from glmdeploy.config.settings import (
    Architecture,
    CheckpointLayout,
    DeclaredGpu,
    Deployment,
    Dtype,
    Engine,
    EngineName,
    GpuSelection,
    Launch,
    MapEntry,
    ModelSource,
    ModelSpec,
    Offload,
    Parallel,
    Placement,
    Precision,
    Quantization,
    Rendezvous,
    Runtime,
    SourceKind,
    Strategy,
    use_mode,
)


def _tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if value is not None else ()


def deployment_from_dict(cfg: Mapping[str, Any]) -> Deployment:
    """Build the typed view from a config dict that has already passed validation."""
    m, g, p, pl, r = (cfg["model"], cfg["gpus"], cfg["precision"], cfg["placement"], cfg["runtime"])
    src = m["source"]
    arch = m.get("architecture")
    return Deployment(
        model=ModelSpec(
            name=m["name"],
            source=ModelSource(
                kind=SourceKind(src["kind"]),
                path=src.get("path"),
                hub_id=src.get("hub_id"),
                revision=src.get("revision"),
                trust_remote_code=bool(src.get("trust_remote_code", False)),
                layout=CheckpointLayout(src.get("layout", "native")),
                seed=int(src.get("seed", 0)),
            ),
            architecture=Architecture(**arch) if arch else None,
        ),
        gpus=GpuSelection(
            mode=use_mode(g.get("mode", "auto"), g.get("ids"), g.get("count")),
            ids=_tuple(g.get("ids")),
            count=g.get("count"),
            declared=tuple(
                DeclaredGpu(
                    name=d["name"],
                    memory_gib=float(d["memory_gib"]),
                    compute_capability=_capability(d.get("compute_capability", (8, 0))),
                )
                for d in _tuple(g.get("declared"))
            ),
            max_memory_gib={int(k): float(v) for k, v in (g.get("max_memory_gib") or {}).items()},
        ),
        precision=Precision(
            dtype=Dtype(p["dtype"]), quantization=Quantization(p.get("quantization", "none"))
        ),
        placement=Placement(
            strategy=Strategy(pl["strategy"]),
            reserve_gib=float(pl.get("reserve_gib", 1.0)),
            gpu0_free_fraction=float(pl.get("gpu0_free_fraction", 0.3)),
            offload=Offload(pl.get("offload", "none")),
            cpu_memory_gib=pl.get("cpu_memory_gib"),
            offload_folder=pl.get("offload_folder"),
            map=tuple(
                MapEntry(modules=_modules(e["modules"]), device=e["device"])
                for e in _tuple(pl.get("map"))
            ),
            plan_file=pl.get("plan_file"),
        ),
        runtime=Runtime(
            max_context_tokens=int(r["max_context_tokens"]),
            batch_size=int(r.get("batch_size", 1)),
            max_new_tokens=int(r.get("max_new_tokens", 32)),
            prompt=str(r.get("prompt", "The capital of France is")),
            kv_cache_dtype=Dtype(r.get("kv_cache_dtype", "auto")),
            **runtime_serving_from_dict(r),
        ),
        parallel=_parallel(cfg.get("parallel") or {}),
        launch=_launch(cfg.get("launch") or {}),
        engine=_engine(cfg.get("engine") or {}),
        serve=serve_from_dict(cfg.get("serve") or {}),
    )


def _parallel(p: Mapping[str, Any]) -> Parallel:
    return Parallel(tp_size=int(p.get("tp_size", 1)), pp_size=int(p.get("pp_size", 1)))


def _launch(la: Mapping[str, Any]) -> Launch:
    default = Launch()
    threads = la.get("omp_num_threads")
    return Launch(
        nnodes=int(la.get("nnodes", default.nnodes)),
        node_rank=int(la.get("node_rank", default.node_rank)),
        rendezvous=Rendezvous(la.get("rendezvous", default.rendezvous)),
        master_addr=str(la.get("master_addr", default.master_addr)),
        master_port=int(la.get("master_port", default.master_port)),
        join_timeout_s=float(la.get("join_timeout_s", default.join_timeout_s)),
        omp_num_threads=int(threads) if threads is not None else None,
        socket_ifname=la.get("socket_ifname"),
        env={str(k): str(v) for k, v in (la.get("env") or {}).items()},
    )


def _engine(e: Mapping[str, Any]) -> Engine:
    default = Engine()
    return Engine(
        name=EngineName(e.get("name", default.name)),
        gpu_memory_utilization=float(
            e.get("gpu_memory_utilization", default.gpu_memory_utilization)
        ),
        max_num_seqs=e.get("max_num_seqs"),
        max_num_batched_tokens=e.get("max_num_batched_tokens"),
        block_size=int(e.get("block_size", default.block_size)),
        enforce_eager=bool(e.get("enforce_eager", default.enforce_eager)),
    )


def _capability(value: Any) -> tuple[int, int]:
    major, minor = value
    return int(major), int(minor)


def _modules(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
