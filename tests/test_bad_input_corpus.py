"""An adversarial corpus of bad command lines and config files (beyond tests/test_bad_input.py).

Each case runs through the real CLI, `main(argv)`, under a deadline: it must exit 2 (config) with
glmdeploy's error format, name the path (in override syntax, or the flag or file), say something
specific, and never print a traceback or an "internal error". Brace-expansion cases are written as
the shell line a user types and turned into words by bash itself, so they test what bash really
makes of them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glmdeploy.problems import clip
from tests.conftest import FIXTURES

PIN = "0123456789abcdef0123456789abcdef01234567"
LONG = "k" * 5000
EXPLICIT = ["gpus=2x24gib", "placement=explicit"]
HUB = ["model=glm-4-9b-chat-hf", "gpus=4x24gib"]
LOCAL = ["model=local", f"model.source.path={FIXTURES / 'chatglm3-tiny'}", "gpus=2x24gib"]
DEADLINE_S = 20


def bash_words(line: str) -> list[str]:
    """The words bash makes of an (unquoted) shell line: brace expansion and all."""
    out = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail a case that runs longer than DEADLINE_S instead of hanging the suite."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer within {DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_reported(err: str, path: str, phrase: str, count: int | None = None) -> None:
    """glmdeploy's format, the path on a problem line (or in a usage error), the phrase nearby."""
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.startswith("error: "), err
    lines = err.splitlines()
    located = [i for i, line in enumerate(lines) if line.startswith(f"  {path}: ")]
    if not located and path in lines[0]:
        located = [0]
    assert located, f"no problem at {path!r} in:\n{err}"
    near = "\n".join(lines[located[0] : located[0] + 3])
    assert phrase in near, f"{phrase!r} not said about {path!r} in:\n{err}"
    if count is not None:
        assert f"({count} problem{'s' if count != 1 else ''})" in lines[0], err


# (argv, path, phrase): each must exit 2
COMMAND_LINES: list[tuple[list[str], str, str]] = [
    # 14: deleting a key with a value that is not the one given
    (["validate", "~runtime.batch_size=3"], "runtime.batch_size", "is 1, not 3"),
    # 15: tokens with k/K suffixes
    (["validate", "runtime.max_context_tokens=128k"], "runtime.max_context_tokens", "131072"),
    (["validate", "runtime.max_new_tokens=2K"], "runtime.max_new_tokens", "2048"),
    (
        ["validate", "model.architecture.max_position_embeddings=32k"],
        "model.architecture.max_position_embeddings",
        "32768",
    ),
    (
        ["validate", "gpus.max_memory_gib=2:20"],
        "gpus.max_memory_gib",
        "'gpus.max_memory_gib={2: 20}'",
    ),
    # 18: hub ids that are paths, revisions that are not pins, Hydra settings that run code
    ([*HUB, "model.source.hub_id=a/.."], "model.source.hub_id", "no '..'"),
    ([*HUB, "model.source.hub_id=/tmp/x"], "model.source.hub_id", "model.source.kind=local"),
    ([*HUB, "model.source.hub_id=a/b--c"], "model.source.hub_id", "no '..' or '--'"),
    ([*HUB, "model.source.hub_id=a/b.git"], "model.source.hub_id", "not end in .git"),
    ([*HUB, "model.source.hub_id=a/b/c"], "model.source.hub_id", "owner/name"),
    (
        [*HUB, "+model.source.trust_remote_code=true", "model.source.revision=main"],
        "model.source.revision",
        "a 40-hex commit",
    ),
    (
        [*HUB, "+model.source.trust_remote_code=true", "model.source.revision=abc1234"],
        "model.source.revision",
        "a 40-hex commit",
    ),
    (
        ["plan", "+hydra.callbacks.x._target_=builtins.print"],
        "hydra.callbacks.x._target_",
        "not allowed",
    ),
    (["validate", "hydra.launcher._target_=os.system"], "hydra.launcher._target_", "not allowed"),
    (
        ["validate", "+hydra.job.env_set.LD_PRELOAD=/x.so"],
        "hydra.job.env_set.LD_PRELOAD",
        "not allowed",
    ),
    (["validate", "hydra/launcher=basic"], "hydra/launcher", "not allowed"),
    (["validate", "hydra.searchpath=[pkg://os]"], "hydra.searchpath", "not allowed"),
    (
        ["validate", "+hydra.job_logging.root.level=INFO"],
        "hydra.job_logging.root.level",
        "not allowed",
    ),
    (["validate", "+model.x._target_=os.system"], "model.x._target_", "_target_"),
    (["validate", "runtime.prompt={_target_: os.system}"], "runtime.prompt", "_target_"),
    # 19: non-finite and absurd numbers
    (["plan", "placement.reserve_gib=nan"], "placement.reserve_gib", "a finite number"),
    (["plan", "placement.reserve_gib=inf"], "placement.reserve_gib", "a finite number"),
    (["plan", "placement.reserve_gib=1e400"], "placement.reserve_gib", "a finite number"),
    (["plan", "placement.reserve_gib=-inf"], "placement.reserve_gib", "a finite number"),
    (["plan", "placement.reserve_gib=1e30"], "placement.reserve_gib", "<= "),
    (["plan", "gpus.max_memory_gib={0: nan}"], "gpus.max_memory_gib.0", "a finite number"),
    (
        ["plan", "gpus=2x24gib", "gpus.declared=[{name:a,memory_gib:nan}]"],
        "gpus.declared[0].memory_gib",
        "a finite number",
    ),
    (
        ["plan", "gpus=2x24gib", "gpus.declared=[{name:a,memory_gib:1e300}]"],
        "gpus.declared[0].memory_gib",
        "<= ",
    ),
    (
        [
            "plan",
            "gpus=2x24gib",
            "gpus.declared=[{name:a,memory_gib:24,compute_capability:[8,1e300]}]",
        ],
        "gpus.declared[0].compute_capability[1]",
        "<= 99",
    ),
    (
        ["plan", "placement=balanced_low_0", "placement.gpu0_free_fraction=nan"],
        "placement.gpu0_free_fraction",
        "a finite number",
    ),
    (
        ["plan", "placement.offload=cpu", "+placement.cpu_memory_gib=nan"],
        "placement.cpu_memory_gib",
        "a finite number",
    ),
    (
        ["plan", "+model.architecture.rms_norm_eps=nan"],
        "model.architecture.rms_norm_eps",
        "a finite number",
    ),
    (
        ["plan", "+model.architecture.rope_theta=inf"],
        "model.architecture.rope_theta",
        "a finite number",
    ),
    (
        ["plan", "model.architecture.num_hidden_layers=100000"],
        "model.architecture.num_hidden_layers",
        "<= ",
    ),
    (["plan", "model.architecture.vocab_size=512.0"], "model.architecture.vocab_size", "write 512"),
    (["plan", "model.architecture.hidden_size=1e9"], "model.architecture.hidden_size", "<= "),
    (
        ["plan", "runtime.max_context_tokens=99999999999999999999"],
        "runtime.max_context_tokens",
        "<= ",
    ),
    (["plan", "model.source.seed=99999999999999999999999"], "model.source.seed", "<= "),
    (["plan", "gpus=least_used", "gpus.count=100000"], "gpus.count", "<= "),
    (
        ["plan", "gpus=ids", "gpus.ids=[" + ",".join(map(str, range(10_000))) + "]"],
        "gpus.ids",
        "at most",
    ),
    (
        ["plan", *EXPLICIT, "placement.map=[{modules:model.layers.0-99999999999,device:0}]"],
        "placement.map[0].modules",
        "has 4 layers",
    ),
    (
        [
            "plan",
            *LOCAL,
            "placement=explicit",
            "placement.map=[{modules:model.layers.0-3000000,device:0}]",
        ],
        "placement.map[0].modules",
        "at most",
    ),
    # 21: over-long words and `???`
    (["validate", f"{LONG}=1"], clip(LONG, 40), "characters"),
    (["validate", f"runtime.{LONG}=1"], clip(f"runtime.{LONG}", 40), "characters"),
    (["validate", f"gpus={LONG}"], "gpus", "not an option name"),
    (["validate", f"~{LONG}"], clip(LONG, 40), "characters"),
    (["validate", "gpus=ids", "gpus.ids=[" + ",".join(["0"] * 5000) + "]"], "gpus.ids", "items"),
    (["validate", "model.source.kind=???"], "model.source.kind", "`???`"),
    (["validate", "gpus.mode=???"], "gpus.mode", "`???`"),
    (["validate", "placement.strategy=???"], "placement.strategy", "`???`"),
    (["validate", "precision.dtype=???"], "precision.dtype", "`???`"),
    (["validate", "runtime.max_context_tokens='???'"], "runtime.max_context_tokens", "`???`"),
    (["validate", "model.source=???"], "model.source", "`???`"),
    (["validate", "gpus=???"], "gpus", "choose an option"),
    (["plan", "runtime.batch_size=???"], "runtime.batch_size", "`???`"),
    # 22: Hydra's flags with bad values or in bad company
    (["validate", "--cfg", "nope"], "--cfg", "job, hydra, all"),
    (["show", "--cfg=nope"], "--cfg", "job, hydra, all"),
    (["validate", "--info", "nope"], "--info", "defaults-tree"),
    (["validate", "-m", "--cfg", "job"], "--cfg", "--multirun"),
    (["plan", "-m", "--cfg", "job", "precision=bf16,fp16"], "--cfg", "--multirun"),
    (["validate", "--cfg", "job", "-p", "nope"], "--package", "nope"),
    (["validate", "-p", "model"], "--package", "--cfg"),
    (["validate", "--experimental-rerun", "x.pickle"], "--experimental-rerun", "glmdeploy replay"),
    (["validate", "-sc", "install=bash"], "-sc", "not supported"),
    (["validate", "--config-name", "nope"], "--config-name", "no config 'nope.yaml'"),
    (["validate", "--config-dir", "/missing"], "--config-dir", "does not exist"),
    (["validate", "--cfg", "job", "runtime.batch_size=0"], "runtime.batch_size", ">= 1"),
    (["validate", "--cfg", "job", "gpus=nope"], "gpus", "unknown option 'nope'"),
    (["show", "--cfg", "job", "gpus=nope"], "gpus", "unknown option 'nope'"),
    (
        ["validate", "--info", "+hydra.callbacks.x._target_=builtins.print"],
        "hydra.callbacks.x._target_",
        "not allowed",
    ),
    # others found by trying
    (["validate", "=5"], "=5", "no key"),
    (["validate", "runtime=nan"], "runtime", "runtime='nan'"),
    (["validate", "gpus=true"], "gpus", "reads as a boolean"),
    (["validate", "engine=0"], "engine", "engine='0'"),
    (["validate", "runtime=null"], "runtime", "reads as null"),
    (["validate", "gpus=[0,1]"], "gpus", "a group takes one option"),
    (["validate", "gpus=[cpu,auto]"], "gpus", "a group takes one option"),
    (["validate", "gpus=../model/tiny-glm"], "gpus", "not an option name"),
    (["validate", "model=/etc/passwd"], "model", "not an option name"),
    (["validate", "gpus.max_memory_gib={null: 20}"], "gpus.max_memory_gib", "null"),
    (["validate", "gpus.max_memory_gib={-1: 20}"], "gpus.max_memory_gib.-1", "not a GPU id"),
    (["validate", "runtime.batch_size=true"], "runtime.batch_size", "boolean"),
    (["validate", "placement.reserve_gib=false"], "placement.reserve_gib", "boolean"),
    (["validate", "gpus=ids", "gpus.ids=[true]"], "gpus.ids[0]", "boolean"),
    (["validate", "runtime.batch_size=[[1]]"], "runtime.batch_size", "list"),
    (["validate", "model.name="], "model.name", "at least"),
    (["validate", "präzision=bf16"], "präzision", "cannot parse"),
    (["validate", "runtime.prompt=héllo"], "runtime.prompt", "non-ASCII"),
    (["validate", "model=local", f"model.source.path={LONG}"], "model.source.path", "too long"),
    (
        ["validate", "placement=plan_file", f"placement.plan_file={LONG}"],
        "placement.plan_file",
        "too long",
    ),
]


@pytest.mark.parametrize(("argv", "path", "phrase"), COMMAND_LINES, ids=lambda v: str(v)[:70])
def test_bad_command_line(
    cli: Any,
    deadline: None,
    tmp_path: Path,
    monkeypatch: Any,
    argv: list[str],
    path: str,
    phrase: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a bad case might write lands here
    result = cli(*argv)
    assert result.code == 2, result.err
    assert_reported(result.err, path, phrase)
    assert list(tmp_path.iterdir()) == [], "a refused command must not write anything"


# 15: shell lines whose braces bash expands; (line, path, phrase): each must be one problem
BRACES: list[tuple[str, str, str]] = [
    ("-m precision={bf16,fp16}", "precision", "precision=bf16,fp16"),
    ("-m runtime={chat,batch}", "runtime", "runtime=chat,batch"),
    ("-m gpus=2x24gib,4x24gib precision={bf16,fp16}", "precision", "brace expansion"),
    ("gpus.max_memory_gib={2:20,3:22}", "gpus.max_memory_gib", "'gpus.max_memory_gib={2:20,3:22}'"),
    ("+runtime.x={a:1,b:2}", "runtime.x", "brace expansion"),
    (
        "gpus=2x24gib placement=explicit "
        "placement.map=[{modules:model.layers.0-1,device:0},{modules:model.layers.2-3,device:1}]",
        "placement.map",
        "brace expansion",
    ),
    (
        "gpus=2x24gib placement=explicit "
        "placement.map=[{modules:[model.embed_tokens,model.layers.0-1],device:0}]",
        "placement.map",
        "brace expansion",
    ),
    (
        "gpus=4x24gib gpus.declared=[{name:A,memory_gib:24},{name:B,memory_gib:24}]",
        "gpus.declared",
        "brace expansion",
    ),
]


@pytest.mark.parametrize(("line", "path", "phrase"), BRACES, ids=lambda v: str(v)[:60])
def test_brace_expansion_is_said_once(
    cli: Any, deadline: None, line: str, path: str, phrase: str
) -> None:
    words = bash_words(line)
    assert not any("{" in w for w in words if "=" in w), words  # bash did expand them
    result = cli("validate", *words)
    assert result.code == 2, result.err
    assert_reported(result.err, path, phrase, count=1)
    assert "quote" in result.err


def test_a_plain_key_given_again_outside_a_sweep_is_used_with_a_note(cli: Any) -> None:
    """Scripts append overrides (the last one wins, as in Hydra); a brace expansion looks alike."""
    result = cli("validate", "--json", *bash_words("precision={bf16,fp16}"))
    assert result.code == 0, result.err
    assert json.loads(result.out)["jobs"][0]["config"]["precision"]["dtype"] == "fp16"
    assert "note: precision given 2 times in a row: precision=fp16 is used" in result.err
    assert "-m precision=bf16,fp16" in result.err


# Config files in a user's --config-dir: {relative path: text}, argv after the dir, path, phrase
def _alias_bomb() -> str:
    lines = ["max_context_tokens: 4096", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def _huge() -> str:
    return "max_context_tokens: 4096\nextra:\n" + "".join(f"  k{i}: {i}\n" for i in range(300_000))


GLOBAL = "# @package _global_\n"
FILES: list[tuple[dict[str, str], list[str], str, str]] = [
    ({"runtime/bomb.yaml": _alias_bomb()}, ["runtime=bomb"], "runtime=bomb", "aliases"),
    ({"runtime/huge.yaml": _huge()}, ["runtime=huge"], "runtime=huge", "larger than"),
    ({"runtime/scalar.yaml": "42\n"}, ["runtime=scalar"], "runtime=scalar", "not a mapping"),
    ({"runtime/text.yaml": "just words\n"}, ["runtime=text"], "runtime=text", "not a mapping"),
    ({"runtime/bin.yaml": "\udcff\udcfemax"}, ["runtime=bin"], "runtime=bin", "UTF-8"),
    (
        {"runtime/dup.yaml": "max_context_tokens: 1\nmax_context_tokens: 2\n"},
        ["runtime=dup"],
        "runtime=dup",
        "duplicate key",
    ),
    (
        {"runtime/intkey.yaml": "max_context_tokens: 4096\n1: 2\n"},
        ["runtime=intkey"],
        "runtime.1",
        "unknown key",
    ),
    (
        {"runtime/anchor.yaml": "base: &b 4096\nmax_context_tokens: *b\n"},
        ["runtime=anchor"],
        "runtime.base",
        "unknown key",
    ),
    (
        {"runtime/notanumber.yaml": "max_context_tokens: .nan\n"},
        ["runtime=notanumber"],
        "runtime.max_context_tokens",
        "a finite number",
    ),
    (
        {"gpus/infinite.yaml": "mode: declared\ndeclared:\n  - {name: X, memory_gib: .inf}\n"},
        ["gpus=infinite"],
        "gpus.declared[0].memory_gib",
        "a finite number",
    ),
    (
        {"runtime/yes.yaml": "max_context_tokens: 4096\nbatch_size: true\n"},
        ["runtime=yes"],
        "runtime.batch_size",
        "boolean",
    ),
    (
        {"runtime/mand.yaml": "max_context_tokens: 4096\nmax_new_tokens: ???\n"},
        ["runtime=mand"],
        "runtime.max_new_tokens",
        "missing mandatory value",
    ),
    (
        {"model/kind.yaml": "name: x\nsource:\n  kind: ???\narchitecture: null\n"},
        ["model=kind"],
        "model.source.kind",
        "missing mandatory value",
    ),
    (
        {
            "prod.yaml": "defaults:\n  - config\n  - _self_\nhydra:\n"
            "  callbacks:\n    x:\n      _target_: os.makedirs\n      name: {marker}\n"
        },
        ["--config-name", "prod"],
        "hydra.callbacks",
        "not allowed",
    ),
    (
        {"profile/evil.yaml": GLOBAL + "hydra:\n  job:\n    env_set:\n      LD_PRELOAD: /x.so\n"},
        ["profile=evil"],
        "hydra.job.env_set",
        "not allowed",
    ),
    (
        {
            "hydra/launcher/evil.yaml": "_target_: os.system\n",
            "profile/evil.yaml": GLOBAL + "defaults:\n  - override /hydra/launcher: evil\n",
        },
        ["profile=evil"],
        "hydra.launcher",
        "not allowed",
    ),
    (
        {
            "runtime/evil.yaml": "x:\n  _target_: os.makedirs\n  name: {marker}\n",
            "profile/evil.yaml": GLOBAL + "defaults:\n  - /runtime@hydra.callbacks: evil\n",
        },
        ["profile=evil"],
        "hydra.callbacks",
        "not allowed",
    ),
    (
        {"runtime/listed.yaml": "defaults:\n  - chatt\nmax_context_tokens: 4096\n"},
        ["runtime=listed"],
        "runtime=listed",
        "did you mean 'chat'?",
    ),
    (
        {"runtime/py.yaml": "max_context_tokens: !!python/object/apply:os.system [echo]\n"},
        ["runtime=py"],
        "runtime=py",
        "not allowed",
    ),
    (
        {"prod.yaml": "defaults:\n  - config\n  - _self_\nruntime: [\n"},
        ["--config-name", "prod"],
        "prod",
        "YAML syntax error",
    ),
    (
        {"prod.yaml": "defaults:\n  - config\n  - _self_\nruntime: [\n"},
        ["--cfg", "job", "--config-name", "prod"],
        "prod",
        "YAML syntax error",
    ),
    (
        {"gpus/bad.yaml": "mode: [declared\n"},
        ["--cfg", "job", "gpus=bad"],
        "gpus=bad",
        "YAML syntax error",
    ),
    (
        {"prod.yaml": "defaults:\n  - config\n  - _self_\nruntime:\n  max_context_tokens: 0\n"},
        ["--cfg", "job", "--config-name", "prod"],
        "runtime.max_context_tokens",
        ">= 1",
    ),
    (
        {"prod.yaml": "defaults:\n  - config\n  - _self_\nruntime:\n  max_context_tokens: 0\n"},
        ["--info", "--config-name", "prod"],
        "runtime.max_context_tokens",
        ">= 1",
    ),
    (
        {"gpus/bad.yaml": "mode: [declared\n"},
        ["--cfg", "job", "--config-name", "nope"],
        "--config-name",
        "no config 'nope.yaml'",
    ),
]


@pytest.mark.parametrize(("files", "argv", "path", "phrase"), FILES, ids=lambda v: str(v)[:50])
def test_bad_config_file(
    cli: Any,
    deadline: None,
    tmp_path: Path,
    monkeypatch: Any,
    files: dict[str, str],
    argv: list[str],
    path: str,
    phrase: str,
) -> None:
    root, marker = tmp_path / "deploy", tmp_path / "marker"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        text = text.replace("{marker}", str(marker))
        (root / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    monkeypatch.chdir(tmp_path)
    hydra_flags = "--cfg" in argv or "--info" in argv
    composes = "YAML" in phrase or path == "--config-name"  # `show` composes, never validates
    commands = ("validate", "show") if hydra_flags and composes else ("validate",)
    for command in ("validate", "plan") if not hydra_flags else commands:
        result = cli(command, "--config-dir", str(root), *argv)
        assert result.code == 2, f"{command}: {result.err}"
        assert_reported(result.err, path, phrase)
    assert not marker.exists(), "a config file ran code"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"], "nothing may be written"


# A few through the installed entry point, as a user's shell runs them
ENTRY_POINT: list[tuple[list[str], str, str]] = [
    (["validate", "model.source.kind=???"], "model.source.kind", "`???`"),
    (["plan", "placement.reserve_gib=nan"], "placement.reserve_gib", "a finite number"),
    (["validate", "--cfg", "nope"], "--cfg", "job, hydra, all"),
    (["validate", "-m", *bash_words("precision={bf16,fp16}")], "precision", "brace expansion"),
    (
        ["plan", "+hydra.callbacks.x._target_=os.makedirs", "+hydra.callbacks.x.name=made"],
        "hydra.callbacks.x._target_",
        "not allowed",
    ),
]


def _entry_point() -> list[str]:
    exe = Path(sys.executable).parent / "glmdeploy"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "glmdeploy"]


@pytest.mark.parametrize(("argv", "path", "phrase"), ENTRY_POINT, ids=lambda v: str(v)[:60])
def test_bad_input_through_the_entry_point(
    tmp_path: Path, argv: list[str], path: str, phrase: str
) -> None:
    proc = subprocess.run(
        [*_entry_point(), *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert_reported(proc.stderr, path, phrase)
    assert list(tmp_path.iterdir()) == []


def test_json_output_of_a_refused_override(cli: Callable[..., Any]) -> None:
    result = cli("validate", "--json", "+hydra.callbacks.x._target_=builtins.print")
    payload = json.loads(result.out)
    assert result.code == 2 and payload["ok"] is False
    assert payload["problems"][0]["path"] == "hydra.callbacks.x._target_"
