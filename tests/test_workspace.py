"""The traced activation workspace against real forwards of tiny models (CPU, real tensors)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from glmdeploy.config.settings import Dtype, Runtime
from glmdeploy.model import workspace_trace
from glmdeploy.model.live_bytes import LiveBytes
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.model.workspace import (
    GENERATE_FP32_COPIES,
    GENERATE_VOCAB_BYTES,
    WorkspaceModel,
    formula_workspace,
    workspace_bytes,
)
from glmdeploy.model.workspace_build import build_workspace
from glmdeploy.planning.memory import activation_bytes, logits_bytes

TINY: dict[str, dict[str, Any]] = {
    "glm": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                pad_token_id=None),
    "glm4_moe": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4,
                     moe_intermediate_size=32, num_experts_per_tok=2, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=1, topk_group=1, pad_token_id=None),
}  # fmt: skip
DTYPES = {Dtype.FP32: torch.float32, Dtype.BF16: torch.bfloat16}


def config(model_type: str, **overrides: Any) -> Any:
    return AutoConfig.for_model(model_type, **{**TINY[model_type], **overrides})


def traced(cfg: Any, dtype: Dtype = Dtype.FP32, attn: str = "sdpa") -> WorkspaceModel:
    model = build_workspace(build_anatomy(cfg), dtype, attn_implementation=attn, target="cpu")
    assert model.method == "traced", model.note
    return model


def real_peaks(cfg: Any, dtype: Dtype, attn: str, batch: int, tokens: int) -> dict[str, int]:
    """Peak live bytes (KV cache left out) while each decoder layer and the head run, in a real
    prefill forward as generate calls it, measured by `LiveBytes` on real tensors."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype], attn_implementation=attn)
    tracker = LiveBytes()
    units = [*((f"layer{i}", m) for i, m in enumerate(model.model.layers)),
             ("head", model.model.norm)]  # fmt: skip
    for name, module in units:
        module.register_forward_pre_hook(lambda *_, n=name: tracker.mark(n + "<"))
    for name, module in units[:-1]:
        module.register_forward_hook(lambda *_, n=name: tracker.mark(n + ">"))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), tracker:
        ids = torch.randint(0, cfg.vocab_size, (batch, tokens))
        positions = torch.arange(tokens).expand(batch, tokens).contiguous()
        out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
    tracker.mark("head>")
    assert out.logits.shape == (batch, 1, cfg.vocab_size)  # generate's prefill: last position only
    kept = {tracker.index_of(t) for layer in cache.layers for t in (layer.keys, layer.values)}
    live = tracker.timeline(exclude={i for i in kept if i is not None})
    return {name: max(live[tracker.marks[name + "<"] : tracker.marks[name + ">"]])
            for name, _ in units}  # fmt: skip


@pytest.mark.parametrize(("dtype", "batch", "tokens"), [(Dtype.FP32, 2, 13), (Dtype.BF16, 3, 70)])
def test_traced_dense_glm_equals_a_real_forward(dtype: Dtype, batch: int, tokens: int) -> None:
    cfg = config("glm")
    model = traced(cfg, dtype)
    real = real_peaks(cfg, dtype, "sdpa", batch, tokens)
    assert [k.kind for k in model.kinds] == ["dense", "head"]
    assert model.kind("dense").layers == (0, 1, 2)
    # Layers after the first hold the embedding output and their own input, as the trace models.
    assert real["layer1"] == real["layer2"] == workspace_bytes(model, "dense", tokens, batch)
    assert real["layer0"] < workspace_bytes(model, "dense", tokens, batch)
    assert real["head"] == workspace_bytes(model, "head", tokens, batch)


def test_batch_one_is_bounded_by_the_fit_and_batch_scales_linearly() -> None:
    cfg = config("glm")
    model = traced(cfg)
    real = real_peaks(cfg, Dtype.FP32, "sdpa", 1, 40)
    predicted = workspace_bytes(model, "dense", 40, 1)
    assert real["layer1"] <= predicted < real["layer1"] * 1.001 + 1024
    dense = model.kind("dense")
    assert dense.bytes(40, 4) == 4 * dense.bytes(40, 1)  # no batch-independent tensors here
    assert all(p.shared_per_token == p.shared_per_token2 == p.shared == 0 for p in dense.phases)


def test_traced_moe_equals_a_real_forward_and_grows_with_top_k() -> None:
    cfg = config("glm4_moe")
    model = traced(cfg)
    assert model.experts_implementation == "grouped_mm"
    assert model.kind("dense").layers == (0,) and model.kind("moe").layers == (1, 2)
    real = real_peaks(cfg, Dtype.FP32, "sdpa", 2, 24)
    assert real["layer1"] == real["layer2"] == workspace_bytes(model, "moe", 24, 2)
    per_token = [traced(config("glm4_moe", num_experts_per_tok=k)).kind("moe").leading(512)
                 .per_token for k in (1, 2, 4)]  # fmt: skip
    step = per_token[1] - per_token[0]
    # grouped_mm copies each token once per selected expert into several live buffers
    assert step > 4 * cfg.hidden_size * 3
    assert per_token[2] - per_token[1] == 2 * step


def test_quadratic_term_is_zero_for_flash_and_positive_for_eager() -> None:
    cfg = config("glm")
    flash = traced(cfg, attn="sdpa")
    eager = traced(cfg, attn="eager")
    assert flash.attention_kernel == "flash"
    assert all(p.per_token2 == p.shared_per_token2 == 0 for k in flash.kinds for p in k.phases)
    assert eager.attention_kernel == "eager"
    assert eager.kind("dense").leading(4096).per_token2 > 0
    real = real_peaks(cfg, Dtype.FP32, "eager", 2, 33)
    assert real["layer1"] == workspace_bytes(eager, "dense", 33, 2)


def test_allocator_agrees_with_the_dispatch_tracker() -> None:
    """torch.profiler's allocation events (the CPU allocator) see the same peak for a dense block,
    up to the CPU flash kernel's scratch."""
    cfg = config("glm", num_hidden_layers=1)
    model = traced(cfg)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    batch, tokens = 2, 64
    hidden = torch.randn(batch, tokens, cfg.hidden_size)
    positions = torch.arange(tokens).expand(batch, tokens).contiguous()
    cos_sin = real.model.rotary_emb(hidden, positions)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        real.model.layers[0](hidden, position_embeddings=cos_sin, attention_mask=None)
    live = peak = 0
    for size in sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree())):
        live += size[1]
        peak = max(peak, live)
    predicted = model.kind("dense").transient_bytes(tokens, batch)
    # no cache here: the block's K/V (2 × kv heads × head_dim per token) stay transient
    kv = batch * tokens * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert predicted <= peak <= predicted + kv


def _allocations(nodes: Any) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType

    found = []
    for node in nodes:
        if node.tag == _EventType.Allocation:
            found.append((node.start_time_ns, node.extra_fields.alloc_size))
        found.extend(_allocations(node.children))
    return found


@pytest.mark.parametrize(
    ("options", "fp32_copies", "vocab_bytes"),
    [
        ({}, 1, 0),
        ({"min_new_tokens": 2}, 4, 9),
        ({"do_sample": True, "temperature": 0.7, "top_k": 0}, 3, 0),
    ],
)
def test_generate_keeps_one_logits_row_and_makes_fp32_copies(
    options: dict[str, Any], fp32_copies: int, vocab_bytes: int
) -> None:
    """Prefill computes logits for the last position only; after the forward, generate makes
    fp32 copies of them (runner.generate: greedy; bench: greedy with min_new_tokens)."""
    cfg = config("glm")
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    tracker = LiveBytes()
    heads: list[tuple[int, ...]] = []
    real.lm_head.register_forward_hook(lambda m, a, out: heads.append(tuple(out.shape)))
    real.register_forward_pre_hook(lambda *_: tracker.mark(f"in{len(heads)}"))
    real.register_forward_hook(lambda *_: tracker.mark(f"out{len(heads)}"))
    batch, tokens, vocab = 2, 9, cfg.vocab_size
    ids = torch.randint(6, vocab, (batch, tokens))
    options = {"do_sample": False, "eos_token_id": 5, "pad_token_id": 5, **options}
    with torch.inference_mode(), tracker:
        real.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, **options)
    assert heads[0] == (batch, 1, vocab)
    start, end = tracker.marks["out1"], tracker.marks["in1"]
    made = max(sum(life.nbytes for life in tracker.lives
                   if start <= life.birth <= j and (life.death is None or life.death > j))
               for j in range(start, end))  # fmt: skip
    token_ids = 4 * batch * (tokens + 2) * 8  # a few token-id-sized tensors (the grown input_ids)
    assert 0 <= made - (batch * vocab * 4 * fp32_copies + vocab * vocab_bytes) <= token_ids
    assert fp32_copies <= GENERATE_FP32_COPIES and vocab_bytes <= GENERATE_VOCAB_BYTES


def test_formula_is_the_fallback_when_tracing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(workspace_trace, "trace_kinds", broken)
    anatomy = build_anatomy(config("glm"))
    model = build_workspace(anatomy, Dtype.BF16)
    assert model.method == "formula"
    assert "RuntimeError: boom" in model.note
    assert replace(model, seconds=0.0) == formula_workspace(anatomy, Dtype.BF16, note=model.note)
    runtime = Runtime(max_context_tokens=300, max_new_tokens=44, batch_size=3)
    activations = activation_bytes(anatomy, runtime, Dtype.BF16)
    assert workspace_bytes(model, "dense", 256, 3) == activations
    # the formula's composition: activations on every GPU, the logits on top at the head's
    head = workspace_bytes(model, "head", 256, 3)
    assert head == activations + logits_bytes(anatomy, runtime, Dtype.BF16)


def test_workspace_module_imports_no_torch() -> None:
    code = (
        "import sys; import glmdeploy.model.workspace; "
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_kind_names_the_known_ones() -> None:
    model = traced(config("glm"))
    with pytest.raises(KeyError, match="kinds: dense, head"):
        workspace_bytes(model, "moe", 16)


FORK_SCRIPT = """
import os, sys
from dataclasses import replace
from transformers import AutoConfig
from glmdeploy.model import workspace_trace
from glmdeploy.model.skeleton import build_anatomy

cfg = AutoConfig.for_model(sys.argv[1], **TINY[sys.argv[1]])
anatomy = replace(build_anatomy(cfg), hf_config=cfg)
assert workspace_trace._can_fork(), "a fresh process on this machine should fork"
children, in_parent, parent = [], [], os.getpid()
real_fork, real_run = os.fork, workspace_trace._run

def fork():
    pid = real_fork()
    children.extend([pid] if pid else [])
    return pid

def run(model, first, head, batch, tokens):
    if sys.argv[2] == "child-fails" and os.getpid() != parent:
        raise RuntimeError("the child fails")  # it exits 1, sending nothing
    if os.getpid() == parent:
        in_parent.append((batch, tokens))
    return real_run(model, first, head, batch, tokens)

os.fork, workspace_trace._run = fork, run
forked = workspace_trace.trace_kinds(anatomy, "float32", "sdpa", None)
points = workspace_trace.GRID + workspace_trace.CHECKS
mine, theirs = list(points[0::2]), list(points[1::2])
assert len(children) == 1
assert in_parent == (mine + theirs if sys.argv[2] == "child-fails" else mine), in_parent
try:
    os.waitpid(children[0], os.WNOHANG)
    raise AssertionError("the child was not reaped")
except ChildProcessError:
    pass
workspace_trace._can_fork = lambda: False
assert workspace_trace.trace_kinds(anatomy, "float32", "sdpa", None) == forked
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
                    reason="the trace forks on Linux with 2+ cores")  # fmt: skip
@pytest.mark.parametrize(("model_type", "child"), [("glm4_moe", "child-works"),
                                                   ("glm", "child-fails")])  # fmt: skip
def test_forked_trace_equals_the_in_process_trace(model_type: str, child: str) -> None:
    """In a fresh process, as the CLI runs it (the fork needs a process with no other thread):
    half the points run in the child, or, when the child fails, the parent runs them too; the
    child is reaped, and the result equals the in-process trace."""
    code = f"TINY = {TINY!r}\n{FORK_SCRIPT}"
    proc = subprocess.run([sys.executable, "-c", code, model_type, child], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
