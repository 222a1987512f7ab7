"""Running a loaded model on the CPU: prompt ids, greedy generation, limits, the benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from glmdeploy.config.settings import Dtype, GpuMode, ModelSource, Runtime, SourceKind, Strategy
from glmdeploy.hardware.gpu_select import GpuAssignment
from glmdeploy.inference.runner import bench, generate, prompt_ids
from glmdeploy.loading.embedded import materialize
from glmdeploy.loading.loader import LoadedModel, load_model
from glmdeploy.model.hf_config import config_from_architecture
from glmdeploy.model.skeleton import build_anatomy
from glmdeploy.planning.strategies import plan_placement
from glmdeploy.problems import ConfigError

from builders import TINY_ARCH, make_deployment

RUNTIME = Runtime(max_context_tokens=64, max_new_tokens=6, prompt="The capital of France is")
WORDS = ["[UNK]", "The", "capital", "of", "France", "is"]


def load(source: ModelSource, cache: Path) -> LoadedModel:
    dep = make_deployment(  # dtype auto: fp32 on the CPU
        Strategy.AUTO, architecture=TINY_ARCH, source=source, gpus=GpuMode.CPU,
        precision=Dtype.AUTO, runtime=RUNTIME,
    )  # fmt: skip
    plan = plan_placement(dep, build_anatomy(config_from_architecture(TINY_ARCH)), [])
    return load_model(dep, plan, GpuAssignment(GpuMode.CPU, ()), cache_root=cache)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def loaded(cache: Path) -> LoadedModel:
    """The embedded tiny GLM without its tokenizer: prompts become byte ids."""
    directory = cache / "without-tokenizer"
    shutil.copytree(materialize(TINY_ARCH, 0, cache / "embedded"), directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).unlink()
    return load(ModelSource(SourceKind.LOCAL, path=str(directory)), cache)


def test_the_embedded_model_has_a_tokenizer_with_a_chat_template(cache: Path) -> None:
    embedded = load(ModelSource(SourceKind.EMBEDDED, seed=0), cache)
    tokenizer = embedded.tokenizer
    assert tokenizer is not None and len(tokenizer) == TINY_ARCH.vocab_size
    assert embedded.model.generation_config.eos_token_id == tokenizer.eos_token_id
    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nHi\n<|assistant|>\n"
    assert tokenizer.decode(tokenizer("héllo wörld 🙂")["input_ids"]) == "héllo wörld 🙂"


@pytest.fixture(scope="module")
def with_tokenizer(cache: Path) -> LoadedModel:
    """The same weights beside a word-level tokenizer, loaded as a local checkpoint."""
    directory = cache / "with-tokenizer"
    shutil.copytree(materialize(TINY_ARCH, 0, cache / "embedded"), directory)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    return load(ModelSource(SourceKind.LOCAL, path=str(directory)), cache)


def test_prompt_without_a_tokenizer_is_bytes_modulo_the_vocabulary(loaded: LoadedModel) -> None:
    assert loaded.tokenizer is None
    ids = prompt_ids(loaded, Runtime(max_context_tokens=64, prompt="Ωmega", batch_size=2))
    expected = [b % 512 for b in "Ωmega".encode()]
    assert ids.tolist() == [expected, expected]
    with pytest.raises(ConfigError, match="empty"):
        prompt_ids(loaded, Runtime(max_context_tokens=64, prompt=""))


def test_generate_is_greedy_and_deterministic(loaded: LoadedModel) -> None:
    first = generate(loaded, RUNTIME)
    assert first.new_tokens == RUNTIME.max_new_tokens and first.text is None
    assert first.input_device == "cpu"
    assert generate(loaded, RUNTIME).new_ids == first.new_ids
    batch = generate(loaded, Runtime(max_context_tokens=64, max_new_tokens=6, batch_size=2))
    assert batch.new_ids == first.new_ids * 2
    assert json.loads(json.dumps(first.to_dict()))["new_tokens"] == 6


def test_context_limits_new_tokens(loaded: LoadedModel) -> None:
    prompt_tokens = len(RUNTIME.prompt.encode())
    short = Runtime(max_context_tokens=prompt_tokens + 2, max_new_tokens=6, prompt=RUNTIME.prompt)
    assert generate(loaded, short).new_tokens == 2
    with pytest.raises(ConfigError) as err:
        generate(loaded, Runtime(max_context_tokens=prompt_tokens, prompt=RUNTIME.prompt))
    assert err.value.problems[0].path == "runtime.max_context_tokens"


def test_tokenizer_is_used_when_the_checkpoint_has_one(with_tokenizer: LoadedModel) -> None:
    assert with_tokenizer.tokenizer is not None
    ids = prompt_ids(with_tokenizer, RUNTIME)
    assert ids.tolist() == [[1, 2, 3, 4, 5]]
    result = generate(with_tokenizer, RUNTIME)
    assert result.text is not None and len(result.text) == 1
    assert result.new_tokens == RUNTIME.max_new_tokens


def test_bench_returns_sane_numbers(loaded: LoadedModel) -> None:
    result = bench(loaded, RUNTIME, repeats=3)
    assert result.repeats == len(result.ttft_runs) == len(result.decode_runs) == 3
    assert result.new_tokens == 6 and result.prompt_tokens == len(RUNTIME.prompt.encode())
    assert 0 < result.ttft_seconds < 5
    assert result.decode_tokens_per_s is not None and result.decode_tokens_per_s > 1
    assert min(result.decode_runs) <= result.decode_tokens_per_s <= max(result.decode_runs)
    (cpu,) = result.memory
    assert cpu.device == "cpu" and cpu.peak_allocated_bytes is None
    assert cpu.peak_rss_bytes is not None and cpu.peak_rss_bytes > 10 * 2**20
    assert result.device_bytes == loaded.device_bytes
    assert json.loads(json.dumps(result.to_dict()))["device_bytes"][0]["device"] == "cpu"
    one = bench(loaded, Runtime(max_context_tokens=64, max_new_tokens=1), repeats=1)
    assert one.decode_tokens_per_s is None and one.ttft_seconds > 0
    with pytest.raises(ConfigError):
        bench(loaded, RUNTIME, repeats=0)
