"""Reading checkpoint tensors: the four layouts, fingerprints, and every refusal naming its file."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmdeploy.loading.checkpoint import (
    WeightFormat,
    find_weight_files,
    fingerprint,
    iter_tensors,
    list_tensors,
    load_bin,
    read_tensors,
)
from glmdeploy.problems import LoadError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "chatglm3-tiny"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "model.safetensors")


def write_sharded(
    state: dict[str, torch.Tensor], directory: Path, fmt: str, shards: int = 2
) -> list[Path]:
    """Write `state` as `shards` safetensors or .bin shards plus the index transformers writes."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    ext, stem = (".bin", "pytorch_model") if fmt == "bin" else (".safetensors", "model")
    paths, weight_map = [], {}
    for i in range(shards):
        part = {n: state[n].clone() for n in names[i::shards]}
        path = directory / f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
        torch.save(part, path) if fmt == "bin" else save_file(part, path)
        weight_map.update(dict.fromkeys(part, path.name))
        paths.append(path)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / f"{stem}{ext}.index.json").write_text(json.dumps(index))
    return paths


def only_problem_path(err: pytest.ExceptionInfo[LoadError]) -> str:
    assert len(err.value.problems) == 1, err.value
    return err.value.problems[0].path


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded-safetensors", "sharded-bin"])
def test_every_layout_yields_the_same_tensors(
    layout: str, state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    if layout == "safetensors":
        directory = FIXTURE
    elif layout == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
        directory = tmp_path
    else:
        write_sharded(state, tmp_path, layout.removeprefix("sharded-"), shards=3)
        directory = tmp_path
    infos = list_tensors(directory)
    assert infos.keys() == state.keys()
    qkv = infos["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert (qkv.shape, qkv.dtype, qkv.nbytes) == ((128, 64), "float32", 128 * 64 * 4)
    read = dict(iter_tensors(directory))
    assert read.keys() == state.keys()
    assert all(torch.equal(read[n], t) for n, t in state.items())
    assert list(read_tensors(directory, ["transformer.output_layer.weight"])) == [
        "transformer.output_layer.weight"
    ]


def test_safetensors_preferred_and_format_reported(
    state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    shutil.copy(FIXTURE / "model.safetensors", tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert find_weight_files(tmp_path).format is WeightFormat.SAFETENSORS


def test_fingerprint_is_stable_and_tracks_changes(
    state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    write_sharded(state, tmp_path / "a", "safetensors")
    write_sharded(state, tmp_path / "b", "safetensors")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    changed = dict(state, extra=torch.zeros(3))
    write_sharded(changed, tmp_path / "c", "safetensors")
    assert fingerprint(tmp_path / "c") != fingerprint(tmp_path / "a")
    write_sharded(state, tmp_path / "d", "bin")
    write_sharded(state, tmp_path / "e", "bin")
    assert fingerprint(tmp_path / "d") == fingerprint(tmp_path / "e") != fingerprint(tmp_path / "a")
    assert len(fingerprint(FIXTURE)) == 64


def test_missing_directory_and_no_weights(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="does not exist") as err:
        list_tensors(tmp_path / "nope")
    assert only_problem_path(err) == str(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(LoadError, match="no weights found") as err:
        list_tensors(tmp_path)
    assert "config.json, model.ckpt" in str(err.value.problems[0].hint)


def test_missing_shards_are_all_listed(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    paths = write_sharded(state, tmp_path, "safetensors", shards=3)
    paths[0].unlink()
    paths[2].unlink()
    with pytest.raises(LoadError) as err:
        list_tensors(tmp_path)
    assert [p.path for p in err.value.problems] == [str(paths[0]), str(paths[2])]
    assert "model.safetensors.index.json names this shard" in err.value.problems[0].message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard_is_named(fmt: str, state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    paths = write_sharded(state, tmp_path, fmt)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated") as err:
        list_tensors(tmp_path)
    assert only_problem_path(err) == str(paths[1])


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((9).to_bytes(8, "little") + b"not json!")
    with pytest.raises(LoadError, match="corrupt safetensors header") as err:
        list_tensors(tmp_path)
    assert only_problem_path(err) == str(tmp_path / "model.safetensors")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(LoadError) as err:
        list_tensors(tmp_path)
    problem = err.value.problems[0]
    assert only_problem_path(err) == str(path)
    assert "argparse.Namespace" in problem.message
    assert "will not execute pickled code" in str(problem.hint)
    assert "safetensors" in str(problem.hint)


def test_plain_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "step": 5}, path)
    with pytest.raises(LoadError, match="not tensors: `step \\(int\\)`"):
        load_bin(path)


def test_index_mapping_to_a_shard_that_lacks_the_tensor(
    state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    paths = write_sharded(state, tmp_path, "safetensors")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = next(n for n, f in index["weight_map"].items() if f == paths[0].name)
    index["weight_map"][moved] = paths[1].name
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        LoadError, match=f"maps `{moved}` to {paths[1].name}, which lacks it"
    ) as err:
        list_tensors(tmp_path)
    assert only_problem_path(err) == str(index_path)


def test_duplicate_tensor_across_shards(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    paths = write_sharded(state, tmp_path, "bin")
    second = torch.load(paths[1], weights_only=True)
    first_name = sorted(state)[0]  # lives in the first shard
    second[first_name] = state[first_name].clone()
    torch.save(second, paths[1])
    with pytest.raises(LoadError, match="also stored in") as err:
        list_tensors(tmp_path)
    assert only_problem_path(err) == str(paths[1])


def test_unknown_tensor_name(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no tensor `nope`"):
        read_tensors(FIXTURE, ["nope"])


def mislabel(path: Path, tensor: str, dtype: str = "I32") -> None:
    """Rewrite the safetensors header of `path` so that `tensor` claims `dtype` (data unchanged)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header[tensor]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(text) == length
    path.write_bytes(raw[:8] + text + raw[8 + length :])


QKV = "transformer.encoder.layers.1.self_attention.query_key_value.weight"


@pytest.mark.parametrize("dtype", ["I32", "U8", "BOOL", "I64"])
def test_a_legacy_checkpoint_with_integer_weights_is_refused(
    cli: Any, tmp_path: Path, dtype: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    mislabel(src / "model.safetensors", QKV, dtype)
    result = cli("convert", str(src), str(tmp_path / "dst"))
    assert result.code == 4, result.err
    assert f"{src / 'model.safetensors'}: weights stored as integers: `{QKV} (" in result.err
    assert "expected: a floating-point dtype" in result.err
    assert not (tmp_path / "dst").exists()


def test_a_native_checkpoint_with_integer_weights_is_refused_before_loading(
    cli: Any, tmp_path: Path
) -> None:
    from glmdeploy.loading.convert import convert_checkpoint

    native = tmp_path / "native"
    convert_checkpoint(FIXTURE, native, progress=False)
    (shard,) = native.glob("model-*.safetensors")
    mislabel(shard, "model.layers.0.mlp.down_proj.weight")
    result = cli(
        "generate", "model=local", f"model.source.path={native}", "gpus=cpu",
        f"hydra.run.dir={tmp_path}/run",
    )  # fmt: skip
    assert result.code == 4, result.err
    assert (
        f"{shard}: weights stored as integers: `model.layers.0.mlp.down_proj.weight (int32)`"
        in (result.err)
    )
    assert "Traceback" not in result.err


def test_integer_weights_of_a_quantised_checkpoint_are_expected(tmp_path: Path) -> None:
    from glmdeploy.loading.checkpoint import check_float_weights

    path = tmp_path / "model.safetensors"
    save_file({"q.weight": torch.zeros(4, dtype=torch.int8), "q.scale": torch.ones(1)}, path)
    infos = list_tensors(tmp_path)
    with pytest.raises(LoadError, match=r"weights stored as integers: `q\.weight"):
        check_float_weights(infos)
    check_float_weights(infos, quantized=True)
    save_file({"position_ids": torch.arange(4), "w.weight": torch.ones(2)}, path)
    check_float_weights(list_tensors(tmp_path))  # integer buffers are not weights
