"""Golden tests of `export vllm`: only vLLM 0.33.0 option names, and fit numbers that follow the
documented formula, recomputed here independently from the architecture (not with the package's
helpers) on a few cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

import glmdeploy
from glmdeploy.config.deployments import load_deployment
from glmdeploy.engines.vllm.export import VllmDoesNotFit, VllmExport, export_vllm
from glmdeploy.engines.vllm.flags import bad_config_keys

GIB = 1024**3
MIB = 1024**2
FLAGS_FILE = Path(glmdeploy.__file__).parent / "engines" / "vllm" / "serve_flags_0.33.0.txt"
REMOTE = ["model.source.trust_remote_code=true", "model.source.revision=" + "0123abcd" * 5]
MODELS = {
    "glm-4-9b-chat-hf": [],
    "glm-4-9b-chat": REMOTE,
    "chatglm3-6b": REMOTE,
    "llama-3-8b": [],
    "glm-4.5-air": [],
}
FLEETS = {  # declared fleet -> a parallel layout that uses it
    "1x80gib": [],
    "2x24gib": ["parallel=tp2"],
    "4x24gib": ["parallel=tp4"],
    "8x80gib": ["parallel=tp8", "runtime.max_context_tokens=8192", "runtime.batch_size=4"],
    "mixed-10-24-24gib": ["parallel.pp_size=3", "engine.enforce_eager=true"],
}


def _flags() -> set[str]:
    lines = FLAGS_FILE.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _export(*overrides: str) -> VllmExport:
    """The export of a deployment, also when it does not fit (the exception carries it)."""
    deployment = load_deployment(["engine=vllm", *overrides]).deployment
    try:
        return export_vllm(deployment)
    except VllmDoesNotFit as exc:
        return exc.export


def test_the_flag_list_is_vllm_0_33_0s() -> None:
    flags = _flags()
    assert len(flags) == 410
    for name in (
        "tensor-parallel-size",
        "pipeline-parallel-size",
        "max-model-len",
        "dtype",
        "gpu-memory-utilization",
        "kv-cache-dtype",
        "quantization",
        "enforce-eager",
        "distributed-executor-backend",
        "nnodes",
        "node-rank",
        "master-addr",
        "master-port",
        "headless",
        "trust-remote-code",
        "no-enforce-eager",
    ):
        assert name in flags


@pytest.mark.parametrize("fleet", sorted(FLEETS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_exported_yaml_uses_only_vllm_0_33_0_option_names(model: str, fleet: str) -> None:
    export = _export(f"model={model}", f"gpus={fleet}", *MODELS[model], *FLEETS[fleet])
    written = yaml.safe_load(export.yaml_text())
    assert written == export.config
    flags = _flags()
    for key, value in written.items():
        name = key.replace("_", "-")
        assert name in flags, f"{key} is not a vllm serve option"
        assert not name.startswith("no-"), key
        assert value is not False and value is not None, key  # vLLM drops false, misreads null
    assert written["model"] and written["tensor-parallel-size"] >= 1
    for command in export.commands:
        for arg in command.argv[2:]:
            if arg.startswith("--"):
                assert arg[2:] in flags


def test_the_checker_names_what_vllm_would_not_read() -> None:
    problems = bad_config_keys(
        {
            "tensor_parallel_size": 2,
            "enforce-eager": False,
            "no-enforce-eager": True,
            "max-model-len": None,
            "tensor-paralel-size": 2,
        }
    )
    assert len(problems) == 4
    assert any("tensor-paralel-size" in p and "not an option" in p for p in problems)
    assert any("no-enforce-eager" in p and "negation" in p for p in problems)


def _activation(
    tokens: int,
    requests: int,
    hidden: int,
    width: int,
    q: int,
    kv: int,
    head_dim: int,
    vocab: int,
    b: int,
) -> int:
    """The documented activation estimate: 1.10 × max(MLP, QKV, logits) for a dense last stage."""
    mlp = tokens * (width + hidden) * b
    qkv = tokens * ((q + 2 * kv) * head_dim + hidden) * b
    logits = requests * vocab * (b + 8)
    return math.ceil(1.10 * max(mlp, qkv, logits))


def _graphs(max_num_seqs: int, tokens: int, layers: int, peak_at: int) -> int:
    largest = min(2 * max_num_seqs, 512, tokens)
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, largest + 1, 16)]
    sizes = [s for s in sizes if s <= largest]
    return len(sizes) * layers * MIB // 4 + peak_at


def test_glm_4_9b_tp4_on_4x24gib_follows_the_formula_with_replicated_kv_heads() -> None:
    export = _export(
        "model=glm-4-9b-chat-hf", "gpus=4x24gib", "parallel=tp4", "runtime=long-context"
    )
    # GLM-4-9B: hidden 4096, 13696 intermediate, 32 heads, 2 KV heads of 128, 40 layers, 151552
    # vocabulary (a multiple of 64). tp 4: every tensor split by 4 except k/v (1 head per rank,
    # replicated), the o_proj/down_proj inputs, and the norms; bf16; Transformers backend: no rope
    # cache.
    h, f, layers, vocab, tp, b = 4096, 13696, 40, 151552, 4, 2
    per_layer = (h * h // tp + h // tp) + 2 * (128 * h + 128) + h * h // tp
    per_layer += 2 * f // tp * h + h * f // tp + 2 * h
    weights = (vocab // tp * h + layers * per_layer + h + vocab // tp * h) * b
    requested = math.ceil(24 * GIB * 0.92)
    tokens, seqs = 2048, 256  # vLLM's defaults below 70 GiB
    activation = _activation(tokens, seqs, h, 3 * f // tp, 32 // tp, 1, 128, vocab, b)
    peak_512 = 512 * (3 * f // tp + h) * b
    graphs = _graphs(seqs, tokens, layers, peak_512)
    available = requested - weights - GIB // 4 - activation - graphs
    per_token = layers * 2 * 1 * 128 * b  # 1 KV head per rank although tp 4 > 2 KV heads
    per_block = per_token * 16
    blocks = available // per_block
    for rank in export.fit.ranks:
        assert rank.weights_bytes == weights
        assert rank.requested_bytes == requested
        assert (rank.activation_bytes, rank.cudagraph_bytes) == (activation, graphs)
        assert rank.kv_available_bytes == available
        assert (rank.kv_heads, rank.kv_bytes_per_token) == (1, 20 * 1024)
        assert rank.num_blocks == blocks
    assert export.fit.concurrency == blocks / (32768 // 16)
    assert export.fit.kv_cache_tokens == int(blocks / 2048 * 32768)
    largest = min((available - per_block) // per_block * 16, 131072)
    assert export.fit.largest_max_model_len == largest
    assert export.fit.concurrency_at_largest == blocks / (largest // 16)
    need = weights + GIB // 4 + activation + graphs + (2048 + 1) * per_block
    assert export.fit.min_gpu_memory_utilization == math.ceil(need / (24 * GIB) * 100) / 100
    assert export.fits
    assert any("replicated on 2 ranks" in n and "costs 2×" in n for n in export.notes)


def test_llama_3_8b_on_one_h100_follows_the_formula() -> None:
    export = _export("model=llama-3-8b", "gpus=1x80gib", "engine.enforce_eager=true")
    h, f, layers, vocab, b = 4096, 14336, 32, 128256, 2
    per_layer = (h * h + 2 * 1024 * h + h * h + 3 * f * h + 2 * h) * b
    rope = 8192 * 128 * b  # vLLM's native Llama keeps a cos/sin cache of max positions × head_dim
    weights = 2 * vocab * h * b + layers * per_layer + h * b + rope
    requested = math.ceil(80 * GIB * 0.92)
    tokens = min(1024 * 4096, 8192)  # H100 class: 8192 tokens, 1024 sequences
    activation = _activation(tokens, 1024, h, 3 * f, 32, 8, 128, vocab, b)
    available = requested - weights - GIB // 4 - activation  # enforce-eager: no CUDA graphs
    per_block = layers * 2 * 8 * 128 * b * 16
    (rank,) = export.fit.ranks
    assert (rank.weights_bytes, rank.activation_bytes, rank.cudagraph_bytes) == (
        weights,
        activation,
        0,
    )
    assert rank.num_blocks == available // per_block
    assert export.config["max-num-batched-tokens"] == 8192
    assert export.config["max-num-seqs"] == 1024
    assert export.config["enforce-eager"] is True


def test_glm_4_5_air_moe_weights_per_rank_at_tp8() -> None:
    export = _export("model=glm-4.5-air", "gpus=8x80gib", "parallel=tp8")
    h, tp, b, experts, moe, dense, vocab = 4096, 8, 2, 128, 1408, 10944, 151552
    attention = (12288 * h // tp + 2 * 1024 // tp * h + h * 12288 // tp + 2 * h) * b
    attention += (12288 + 2 * 1024) // tp * b  # q/k/v biases (attention_bias: true), split too
    dense_mlp = 3 * dense // tp * h * b
    moe_mlp = experts * 3 * moe // tp * h * b  # fused experts: the intermediate splits
    moe_mlp += 3 * moe // tp * h * b  # the shared expert
    moe_mlp += experts * h * 4 + experts * 4  # router weight and score bias: fp32, replicated
    rope = 131072 * 64 * b  # partial rotary factor 0.5 of 128
    weights = 2 * vocab // tp * h * b + h * b + rope
    weights += 46 * attention + dense_mlp + 45 * moe_mlp
    assert {r.weights_bytes for r in export.fit.ranks} == {weights}
    assert export.fit.ranks[0].kv_heads == 1


def test_unequal_gpus_get_a_balanced_pipeline_split() -> None:
    export = _export(
        "model=glm-4-9b-chat-hf",
        "gpus=mixed-10-24-24gib",
        "parallel.pp_size=3",
        "runtime=long-context",
    )
    parts = export.pp_partition
    assert sum(parts) == 40 and len(parts) == 3
    assert export.env["VLLM_PP_LAYER_PARTITION"] == ",".join(map(str, parts))
    assert parts[0] < parts[1]  # the 10 GiB card holds fewer layers than a 24 GiB one
    even = _export("model=glm-4-9b-chat-hf", "gpus=4x24gib", "parallel.pp_size=3")
    assert even.pp_partition == (13, 14, 13)  # vLLM's own split: the remainder before the last
    assert "VLLM_PP_LAYER_PARTITION" not in even.env
