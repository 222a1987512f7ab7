"""Benchmark: the traced activation workspace against real allocations of real-width blocks on CPU.

For each case a real decoder block (random weights, bf16, transformers' own modules built by
`from_config` with a small vocabulary) runs one prefill step on real tensors: random hidden states,
rotary cos/sin from the model's own rotary module, a `DynamicCache`. The *measured* bytes are the
block call's peak above what was allocated before it, from torch.profiler's allocation events
(`profile_memory=True`: every allocation and free through torch's CPU allocator, kernel scratch
included), leaving out the KV-cache tensors the call stores (the plan counts those separately). The
*predicted* bytes are `KindWorkspace.transient_bytes` of the model that `build_workspace` traced on
fake tensors for the full-size config. For the first row of each case, the dispatch-mode tracker
(`LiveBytes`) on the same real tensors is shown too: it must equal the prediction exactly and sit a
few MiB (kernel scratch) below the profiler.

The MoE case uses 8 experts instead of 128 to save memory; the second table shows why that is
sound: the traced per-token bytes of the MoE kind are 4 × E above a constant (the router's fp32
logits, T × E, alive through the experts), i.e. 0.1 % at E = 128.

    python benchmarks/workspace.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from glmdeploy.config.settings import Dtype
from glmdeploy.model.live_bytes import LiveBytes
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.model.workspace import WorkspaceModel
from glmdeploy.model.workspace_build import build_workspace

GLM_4_9B = ("glm", dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696,
                        num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                        head_dim=128, attention_bias=True))  # fmt: skip
AIR_8 = ("glm4_moe", dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944,
                          num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
                          head_dim=128, n_routed_experts=8, moe_intermediate_size=1408,
                          num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1,
                          n_group=1, topk_group=1))  # fmt: skip
# (label, config, attention, decoder layer to run, [(batch, tokens), …])
CASES = [
    ("GLM-4-9B dense", GLM_4_9B, "sdpa", 0, [(1, 512), (1, 1024), (1, 2048), (2, 1024)]),
    ("GLM-4-9B dense", GLM_4_9B, "eager", 0, [(1, 512), (1, 1024), (1, 2048)]),
    ("GLM-4.5-Air MoE (8 experts)", AIR_8, "sdpa", 1, [(1, 512), (1, 1024), (1, 2048), (2, 1024)]),
]
QUICK = {"GLM-4-9B dense": [(1, 512)], "GLM-4.5-Air MoE (8 experts)": [(1, 512)]}


def real_block(model_type: str, kwargs: dict[str, Any], attn: str, layer: int) -> tuple[Any, Any]:
    """The model truncated after `layer` (vocabulary 1024), real bf16 weights; and the block."""
    small = {**kwargs, "vocab_size": 1024, "num_hidden_layers": layer + 1, "pad_token_id": None}
    cfg = AutoConfig.for_model(model_type, **small)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    return model.eval(), model.model.layers[layer]


def block_inputs(model: Any, batch: int, tokens: int) -> dict[str, Any]:
    hidden = torch.randn(batch, tokens, model.config.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(tokens).expand(batch, tokens).contiguous()
    mask = None
    if model.config._attn_implementation == "eager":  # what the model builds before its blocks
        mask = torch.full((tokens, tokens), float("-inf"), dtype=torch.bfloat16).triu(1)
        mask = mask.expand(batch, 1, tokens, tokens).contiguous()
    return dict(hidden_states=hidden, attention_mask=mask, position_ids=positions,
                position_embeddings=model.model.rotary_emb(hidden, positions),
                cache=DynamicCache(config=model.config), use_cache=True)  # fmt: skip


def profiler_peak(block: Any, inputs: dict[str, Any]) -> int:
    """Peak bytes allocated during the call above its start, from the profiler's allocation events,
    without the KV-cache tensors the call keeps."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = block(**inputs)
    kept = {t.data_ptr() for t in _cache_tensors(inputs["cache"])}
    events = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()))
    last_alloc: dict[int, int] = {}  # ptr -> index of its allocation still live at the end
    for i, (_, ptr, size) in enumerate(events):
        if size > 0:
            last_alloc[ptr] = i
        else:
            last_alloc.pop(ptr, None)
    skip = {i for ptr, i in last_alloc.items() if ptr in kept}
    live = peak = 0
    for i, (_, _, size) in enumerate(events):
        if i not in skip:
            live += size
            peak = max(peak, live)
    del out
    return peak


def _cache_tensors(cache: Any) -> list[Any]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]


def _allocations(nodes: Any) -> list[tuple[int, int, int]]:
    from torch._C._profiler import _EventType

    found = []
    for node in nodes:
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            found.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        found.extend(_allocations(node.children))
    return found


def dispatch_peak(block: Any, inputs: dict[str, Any]) -> int:
    """The same call's peak from `LiveBytes` on the real tensors (KV cache left out)."""
    tracker = LiveBytes()
    with torch.no_grad(), tracker:
        out = block(**inputs)
    kept = {tracker.index_of(t) for t in _cache_tensors(inputs["cache"])}
    del out
    return tracker.peak(exclude={i for i in kept if i is not None})


def expert_count_table() -> list[str]:
    lines = ["| experts E | top-k | traced moe bytes/token | minus 4·E (router logits) |",
             "|---|---|---|---|"]  # fmt: skip
    for experts in (8, 16, 128):
        cfg = AutoConfig.for_model(AIR_8[0], **{**AIR_8[1], "n_routed_experts": experts})
        model = build_workspace(build_anatomy(cfg), Dtype.BF16, target="cpu")
        per_token = model.kind("moe").leading(4096).per_token
        lines.append(f"| {experts} | 8 | {per_token} | {per_token - 4 * experts} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one prompt length per case")
    args = parser.parse_args()
    started = time.perf_counter()
    lines = ["| architecture | implementation | B | T | predicted B/token | measured B/token "
             "(profiler) | measured / predicted | dispatch tracker B/token |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    predictions: dict[tuple[str, str], WorkspaceModel] = {}
    for label, (model_type, kwargs), attn, layer, points in CASES:
        if args.quick and label in QUICK and attn == "sdpa":
            points = QUICK[label]
        elif args.quick:
            continue
        anatomy = build_anatomy(AutoConfig.for_model(model_type, **copy.deepcopy(kwargs)))
        predicted = build_workspace(anatomy, Dtype.BF16, attn_implementation=attn, target="cpu")
        predictions[(label, attn)] = predicted
        kind = predicted.kind_of_layer(layer)
        model, block = real_block(model_type, kwargs, attn, layer)
        impl = f"{predicted.attn_implementation} ({predicted.attention_kernel})"
        if predicted.experts_implementation:
            impl += f", experts {predicted.experts_implementation}"
        for n, (batch, tokens) in enumerate(points):
            want = predicted.kind(kind).transient_bytes(tokens, batch)
            got = profiler_peak(block, block_inputs(model, batch, tokens))
            per = batch * tokens
            check = ""
            if n == 0:
                check = f"{dispatch_peak(block, block_inputs(model, batch, tokens)) / per:.0f}"
            lines.append(f"| {label} | {impl} | {batch} | {tokens} | {want / per:.0f} | "
                         f"{got / per:.0f} | {got / want:.4f} | {check} |")  # fmt: skip
        del model, block
    print("\n".join(lines))
    print()
    print("\n".join(expert_count_table()))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
