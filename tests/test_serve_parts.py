"""The server's parts without HTTP: text assembly, sampling limits, request validation, the checks
`serve` makes before and after loading, and where `serve` sends each deployment."""

from __future__ import annotations

import importlib.util
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CliResult
from pydantic import ValidationError

from glmdeploy.config.serve_settings import Serve
from glmdeploy.config.settings import Runtime
from glmdeploy.loading.embedded_tokenizer import build_tokenizer
from glmdeploy.problems import ConfigError, HardwareError
from glmdeploy.serving import preflight
from glmdeploy.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)
from glmdeploy.serving.sampling import resolve_sampling
from glmdeploy.serving.text import TextAssembler

TOKENIZER = build_tokenizer(512)


def decode(ids: Any) -> str:
    assert TOKENIZER is not None
    return str(TOKENIZER.decode(list(ids), skip_special_tokens=True))


def assemble(ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    text = TextAssembler(decode, stop)
    pieces = [text.push(i) for i in ids]
    return [*pieces, text.finish()], text


def test_pieces_join_to_the_decoded_text_whatever_the_ids() -> None:
    rng = random.Random(0)
    for _ in range(50):  # random ids: byte tokens that split characters, specials, merges
        ids = [rng.randrange(512) for _ in range(rng.randrange(1, 40))]
        pieces, text = assemble(ids)
        assert "".join(pieces) == text.text == decode(ids)


def test_a_character_split_across_tokens_waits_for_its_last_byte() -> None:
    assert TOKENIZER is not None
    ids = TOKENIZER("a🙂")["input_ids"]
    pieces, _ = assemble(ids)
    assert "".join(pieces) == "a🙂" and "\ufffd" not in "".join(pieces)
    assert all(p in ("", "a", "🙂", "a🙂") for p in pieces)


def test_stop_strings_end_the_text_before_them_even_across_tokens() -> None:
    assert TOKENIZER is not None
    ids = TOKENIZER("The capital of France is Paris, and the capital of Germany")["input_ids"]
    pieces, text = assemble(ids, stop=("France is",))
    assert text.text == "The capital of " and text.stopped and "".join(pieces) == text.text
    stop = ", and the"
    for i in range(1, len(ids) + 1):  # what could begin the stop string is held back
        held = TextAssembler(decode, (stop,))
        sent = "".join(held.push(t) for t in ids[:i])
        assert not any(sent.endswith(stop[:k]) for k in range(1, len(stop)))
    assert assemble(ids, stop=(stop,))[1].text == "The capital of France is Paris"
    _, unstopped = assemble(ids, stop=("Berlin",))
    assert not unstopped.stopped and unstopped.text == decode(ids)


RUNTIME = Runtime(max_context_tokens=100, max_new_tokens=16, temperature=0.7, top_p=0.9,
                  max_tokens_per_request=50)  # fmt: skip


def completion(**body: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "p", **body})


def test_sampling_takes_the_request_then_the_runtime_defaults() -> None:
    got = resolve_sampling(completion(), 10, runtime=RUNTIME, context_tokens=100)
    assert (got.max_new_tokens, got.temperature, got.top_p, got.seed) == (16, 0.7, 0.9, None)
    asked = completion(max_tokens=40, temperature=0, seed=3, stop="x")
    got = resolve_sampling(asked, 10, runtime=RUNTIME, context_tokens=100)
    assert (got.max_new_tokens, got.greedy, got.seed, got.stop) == (40, True, 3, ("x",))
    near_the_end = resolve_sampling(completion(), 95, runtime=RUNTIME, context_tokens=100)
    assert near_the_end.max_new_tokens == 5  # the default is cut to what the context leaves


@pytest.mark.parametrize(
    ("prompt_tokens", "body", "param", "code"),
    [
        (100, {}, "prompt", "context_length_exceeded"),
        (0, {}, "prompt", "invalid_value"),  # an empty prompt: nothing to generate from
        (60, {"max_tokens": 41}, "max_tokens", "context_length_exceeded"),
        (10, {"max_tokens": 51}, "max_tokens", "invalid_value"),  # over max_tokens_per_request
    ],
)
def test_requests_that_do_not_fit_are_refused(
    prompt_tokens: int, body: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(ApiError) as err:
        resolve_sampling(completion(**body), prompt_tokens, runtime=RUNTIME, context_tokens=100)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code)
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99}
    )
    with pytest.raises(ApiError) as err:
        resolve_sampling(chat, 10, runtime=RUNTIME, context_tokens=100)
    assert err.value.param == "max_completion_tokens"


@pytest.mark.parametrize(
    ("body", "param", "code", "words"),
    [
        ({"n": 2}, "n", "unsupported_value", "n must be 1"),
        ({"tools": []}, "tools", "unsupported_parameter", "not supported"),
        ({"bogus": 1}, "bogus", "unsupported_parameter", "not a parameter"),
        ({"temperature": "hot"}, "temperature", "invalid_value", "number"),
        ({"top_p": 0}, "top_p", "invalid_value", "greater than 0"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value", "at most 4"),
        ({"seed": -1}, "seed", "invalid_value", "greater than or equal"),
        ({"logprobs": True}, "logprobs", "unsupported_value", "not supported"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "invalid_value", ""),
        ({"messages": []}, "messages", "invalid_value", "at least 1"),
    ],
)
def test_bad_bodies_become_openai_errors(
    body: dict[str, Any], param: str, code: str, words: str
) -> None:
    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate({**ok, **body})
    error = validation_error(list(err.value.errors()))
    assert (error.status, error.param, error.code) == (400, param, code)
    assert words in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_text_parts_and_developer_messages_are_accepted() -> None:
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    body = {"model": "m", "messages": messages}
    request = ChatCompletionRequest.model_validate(body)
    assert [m.text() for m in request.messages] == ["Be brief.", "Hi there"]


def test_listen_binds_a_free_port_and_names_the_key_when_it_cannot() -> None:
    listener = preflight.listen(Serve(port=0))
    with listener.sock:
        assert listener.port > 0 and listener.url == f"http://127.0.0.1:{listener.port}/v1"
        assert listener.loopback
    with socket.socket() as busy, pytest.raises(ConfigError) as err:  # another server's port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        preflight.listen(Serve(port=busy.getsockname()[1]))
    assert err.value.problems[0].path == "serve.port"
    assert "another process" in str(err.value.problems[0].hint)
    with pytest.raises(ConfigError) as err:
        preflight.listen(Serve(host="203.0.113.1", port=0))  # TEST-NET: not this machine
    assert err.value.problems[0].path == "serve.host"
    assert preflight.Listener(socket.socket(), "::1", 8).url == "http://[::1]:8/v1"


def test_api_key_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert preflight.api_key(Serve()) is None
    monkeypatch.setenv("GLMDEPLOY_PART_KEY", "secret")
    assert preflight.api_key(Serve(api_key_env="GLMDEPLOY_PART_KEY")) == "secret"
    monkeypatch.setenv("GLMDEPLOY_PART_KEY", "")
    with pytest.raises(ConfigError, match="GLMDEPLOY_PART_KEY is not set"):
        preflight.api_key(Serve(api_key_env="GLMDEPLOY_PART_KEY"))


def test_missing_packages_are_named_with_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    preflight.require_packages()  # the test environment has them
    monkeypatch.setattr(preflight, "PACKAGES", ("fastapi", "no_such_package_glmdeploy"))
    with pytest.raises(HardwareError) as err:
        preflight.require_packages()
    assert err.value.exit_code == 3 and "glmdeploy[serve]" in str(err.value.problems[0].hint)


def test_serve_refuses_what_it_cannot_serve(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    sweep = cli("serve", "-m", "runtime.batch_size=1,2")
    assert sweep.code == 2 and "not a sweep" in sweep.err
    world = cli("serve", "parallel=tp2", "gpus=cpu", f"hydra.run.dir={tmp_path / 'tp'}")
    assert world.code == 2 and "torchrun world" in world.err
    usage = cli("serve", "--port")
    assert usage.code == 2 and "--port needs a value" in usage.err


def test_legacy_chatglm_checkpoints_are_refused_for_their_remote_code_tokenizer(
    cli: Callable[..., CliResult], chatglm3_tiny: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("GLMDEPLOY_CACHE", str(tmp_path / "cache"))
    result = cli("serve", "model=local", f"model.source.path={chatglm3_tiny}",
                 "model.source.layout=chatglm", "gpus=cpu", "--port", "0",
                 f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert result.code == 4, result.err
    assert "ChatGLMTokenizer" in result.err and "never runs remote code" in result.err
    assert "serving " not in result.out  # refused before listening


def test_engine_vllm_hands_over_to_the_vllm_module(
    cli: Callable[..., CliResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ("serve", "engine=vllm", "--host", "0.0.0.0", "--port", "8123", "--json")
    if importlib.util.find_spec("glmdeploy.engines") is None:  # issue 12 not merged here
        result = cli(*argv)
        assert result.code == 2 and "vLLM hand-over is not available" in result.err
        return
    import glmdeploy.engines.vllm.serve as vllm_serve  # type: ignore[import-not-found]

    calls: list[dict[str, Any]] = []

    def record(deployment: Any, **kwargs: Any) -> int:
        calls.append({"model": deployment.model.name, **kwargs})
        return 0

    monkeypatch.setattr(vllm_serve, "serve_with_vllm", record)
    assert cli(*argv).code == 0
    assert calls == [{"model": "tiny-glm", "host": "0.0.0.0", "port": 8123, "json_out": True}]
