"""A checkpoint's identity is its content: in-place weight edits reconvert, and replay sees them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from glmdeploy.loading import content_hash
from glmdeploy.loading.checkpoint import fingerprint
from glmdeploy.loading.content_hash import cached_digest, file_digests

FIXTURE = Path(__file__).parent / "fixtures" / "chatglm3-tiny"
HEAD = "transformer.output_layer.weight"
GENERATE = ["gpus=cpu", "precision=fp32", "runtime.max_new_tokens=8", "model=local"]


def edit_in_place(checkpoint: Path) -> None:
    """What a fine-tune does: new values, same names, shapes, dtypes and file size, same inode."""
    path = checkpoint / "model.safetensors"
    state = load_file(path)
    generator = torch.Generator().manual_seed(1)
    state[HEAD] = torch.randn(state[HEAD].shape, generator=generator, dtype=state[HEAD].dtype)
    old = path.read_bytes()
    new = save(state, metadata=safe_open(path, "pt").metadata())
    header = 8 + int.from_bytes(old[:8], "little")
    assert len(new) == len(old) and new[:header] == old[:header]  # the header is unchanged
    inode = path.stat().st_ino
    with path.open("r+b") as f:
        f.write(new)
    assert path.stat().st_ino == inode


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_in_place_weight_edit_reconverts_and_gives_the_new_tokens(
    cli: Any, cache: Path, tmp_path: Path
) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, src)
    runs = []
    for i in range(2):
        result = cli("generate", "--json", *GENERATE, f"model.source.path={src}",
                     f"hydra.run.dir={tmp_path}/run{i}")  # fmt: skip
        assert result.code == 0, result.err
        runs.append(json.loads(result.out)["results"])
        if i == 0:
            edit_in_place(src)
    before, after = (r["generate"]["new_ids"] for r in runs)
    assert before != after  # not the stale conversion of the old bytes
    assert runs[0]["load"]["checkpoint"] != runs[1]["load"]["checkpoint"]
    fresh = cli("generate", "--json", *GENERATE, f"model.source.path={src}",
                f"hydra.run.dir={tmp_path}/run2")  # fmt: skip
    assert json.loads(fresh.out)["results"]["generate"]["new_ids"] == after


def test_replay_names_the_weight_edit(cli: Any, cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, src)
    run = tmp_path / "run"
    first = cli("generate", *GENERATE, f"model.source.path={src}", f"hydra.run.dir={run}")
    assert first.code == 0, first.err
    edit_in_place(src)
    replay = cli("replay", str(run))
    assert replay.code == 6, replay.err
    assert "differs: checkpoint fingerprint" in replay.out
    assert "NOT reproduced: generated tokens differ" in replay.out


def test_fingerprint_follows_every_byte(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURE, a)
    shutil.copytree(FIXTURE, b)
    assert fingerprint(a) == fingerprint(b)
    edit_in_place(b)
    assert fingerprint(a) != fingerprint(b)
    config = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps(dict(config, layernorm_epsilon=1e-6)))
    assert fingerprint(a) != fingerprint(FIXTURE)


@pytest.fixture
def trusted_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache hashes of files written a moment ago (the racy-timestamp guard would skip them)."""
    monkeypatch.setattr(content_hash, "RACY_SECONDS", -1.0)


def test_a_cached_hash_is_trusted_only_while_the_file_is_unchanged(
    tmp_path: Path, trusted_now: None
) -> None:
    path, hashes = tmp_path / "w.safetensors", tmp_path / "hashes"
    path.write_bytes(b"a" * 1000)
    (first,) = file_digests([path], cache_dir=hashes)
    assert cached_digest(path, hashes) == first
    stat = path.stat()
    with path.open("r+b") as f:  # same size, same inode, old mtime put back
        f.write(b"b")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert cached_digest(path, hashes) is None  # ctime moved
    (second,) = file_digests([path], cache_dir=hashes)
    assert second != first and cached_digest(path, hashes) == second
    moved = tmp_path / "x"
    path.rename(moved)
    moved.write_bytes(b"b" + b"a" * 999)
    path.write_bytes(b"b" + b"a" * 999)  # same bytes, another inode: hashed again, same digest
    assert cached_digest(path, hashes) is None
    assert file_digests([path], cache_dir=hashes) == [second]


def test_a_file_written_just_now_is_not_cached(tmp_path: Path) -> None:
    path, hashes = tmp_path / "w", tmp_path / "hashes"
    path.write_bytes(b"a")
    file_digests([path], cache_dir=hashes)
    assert cached_digest(path, hashes) is None
    assert not hashes.exists()


@pytest.mark.parametrize("entry", ["", "{", "[]", '{"format": "glmdeploy.file-hash/1"}', "\x00"])
def test_corrupt_cache_entries_are_ignored_and_rewritten(
    tmp_path: Path, trusted_now: None, entry: str
) -> None:
    path, hashes = tmp_path / "w", tmp_path / "hashes"
    path.write_bytes(b"weights")
    (good,) = file_digests([path], cache_dir=hashes)
    (entry_file,) = hashes.iterdir()
    entry_file.write_text(entry)
    assert cached_digest(path, hashes) is None
    assert file_digests([path], cache_dir=hashes) == [good]
    assert cached_digest(path, hashes) == good


def test_a_cache_that_cannot_be_written_costs_nothing_but_time(
    tmp_path: Path, trusted_now: None
) -> None:
    path, blocker = tmp_path / "w", tmp_path / "not-a-dir"
    path.write_bytes(b"weights")
    blocker.write_text("x")
    assert file_digests([path], cache_dir=blocker) == file_digests([path], cache_dir=tmp_path / "h")


def test_concurrent_writers_leave_one_valid_entry(tmp_path: Path) -> None:
    path, hashes = tmp_path / "w", tmp_path / "hashes"
    path.write_bytes(os.urandom(4 * 2**20))
    os.utime(path, (1_000_000_000, 1_000_000_000))
    script = (
        "import sys; from pathlib import Path; from glmdeploy.loading import content_hash as c; "
        "c.RACY_SECONDS = -1.0; print(c.file_digests([Path(sys.argv[1])], "
        "cache_dir=Path(sys.argv[2]))[0])"
    )
    argv = [sys.executable, "-c", script, str(path), str(hashes)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    digests = {p.communicate()[0].strip() for p in procs}
    assert len(digests) == 1 and all(p.returncode == 0 for p in procs)
    assert [p.name for p in hashes.iterdir()] == [p.name for p in hashes.glob("*.json")]
    assert cached_digest(path, hashes) == digests.pop()


def test_plan_reads_no_weights_to_record_its_checkpoint(
    cli: Any, cache: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = cli("plan", "model=local", f"model.source.path={FIXTURE}", "gpus=cpu",
                 f"hydra.run.dir={run}")  # fmt: skip
    assert result.code == 0, result.err
    assert json.loads((run / "run.json").read_text())["checkpoint"]["fingerprint"] is None
    assert not (cache / "file-hashes").exists()  # nothing was hashed
    replay = cli("replay", str(run))
    assert replay.code == 0 and "environment and checkpoint match the record" in replay.out
