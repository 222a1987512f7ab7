"""`glmdeploy serve` end to end: a real server process on a free loopback port, the official
`openai` client (no retries), real HTTP. One server for the module; the last test stops it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

import glmdeploy

KEY_ENV, KEY = "GLMDEPLOY_TEST_SERVE_KEY", "sk-test-0123456789"
CONTEXT = 256  # runtime.max_context_tokens of the test server
CAPACITY = 16  # runtime.batch_size 4 + runtime.max_queued_requests 12
SETTINGS = [
    "gpus=cpu", f"runtime.max_context_tokens={CONTEXT}", "runtime.batch_size=4",
    "runtime.max_queued_requests=12", "serve.shutdown_timeout_s=5", f"serve.api_key_env={KEY_ENV}",
]  # fmt: skip


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """As the server runs (OMP_NUM_THREADS=1): the tiny model gains nothing from more threads,
    and on a busy 2-core machine two threads can be ten times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT/v1
    run_dir: Path
    lines: list[str]
    loaded: Any  # the same deployment loaded in this process, for `glmdeploy.generate`

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(self.url.removesuffix("/v1") + "/health", timeout=10).json())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("serve-cache")
    saved = os.environ.get("GLMDEPLOY_CACHE")
    os.environ["GLMDEPLOY_CACHE"] = str(root)  # the in-process model: the same checkpoint
    yield root
    if saved is None:
        os.environ.pop("GLMDEPLOY_CACHE", None)
    else:
        os.environ["GLMDEPLOY_CACHE"] = saved


@pytest.fixture(scope="module")
def server(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    run_dir = tmp_path_factory.mktemp("serve-run")
    env = {**os.environ, "GLMDEPLOY_CACHE": str(cache), KEY_ENV: KEY, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "glmdeploy", "serve", *SETTINGS, "--port", "0",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)  # fmt: skip
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("serving "):
                ready.put(line.split(" on ", 1)[1].strip())

    threading.Thread(target=read, daemon=True).start()
    try:
        with one_torch_thread():  # meanwhile, the same deployment in this process
            loaded = glmdeploy.load([s for s in SETTINGS if not s.startswith("serve.")])
        url = ready.get(timeout=90)
        yield Server(process, url, run_dir, lines, loaded)
    except queue.Empty:
        pytest.fail("the server did not say it was ready:\n" + "\n".join(lines))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_ready_line_models_chat_and_completions_streaming_or_not(server: Server) -> None:
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny-glm"]
    messages = [{"role": "user", "content": "Hello! How are you?"}]
    chat = client.chat.completions.create(model="tiny-glm", messages=messages,  # type: ignore[arg-type]
                                          max_tokens=12, temperature=0)  # fmt: skip
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model="tiny-glm", messages=messages, max_tokens=12, temperature=0, stream=True,  # type: ignore[arg-type]
    ))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == chat.choices[0].message.content
    text = client.completions.create(model="tiny-glm", prompt="The capital of France is",
                                     max_tokens=8, temperature=0)  # fmt: skip
    pieces = list(client.completions.create(
        model="tiny-glm", prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text.choices[0].text
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 8


def test_16_concurrent_requests_equal_glmdeploy_generate(server: Server) -> None:
    prompts = [f"Request {i}: the capital of France is" for i in range(16)]
    client = server.client()

    def ask(prompt: str) -> Any:
        return client.completions.create(model="tiny-glm", prompt=prompt, max_tokens=8,
                                         temperature=0)  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    assert len(answers) == 16  # none lost, none refused: 16 is the capacity
    with one_torch_thread():
        results = [glmdeploy.generate(server.loaded, p, max_new_tokens=8) for p in prompts]
    for prompt, answer, expected in zip(prompts, answers, results, strict=True):
        assert expected.text is not None
        assert answer.choices[0].text == expected.text[0], prompt
        assert answer.usage.completion_tokens == len(expected.new_ids[0])


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server: Server) -> None:
    client = server.client()
    ok = {"model": "tiny-glm", "prompt": "Hi", "max_tokens": 2}
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"model": "nope"}, 404, "model_not_found"),
        ({"prompt": "x " * CONTEXT}, 400, "context_length_exceeded"),
        ({"prompt": ""}, 400, "invalid_value"),  # was a 500: generate got no token
        ({"prompt": "", "stream": True}, 400, "invalid_value"),
        ({"max_tokens": -1}, 400, "invalid_value"),
        ({"max_tokens": 0}, 400, "invalid_value"),
        ({"max_tokens": CONTEXT}, 400, "context_length_exceeded"),
        ({"temperature": -0.5}, 400, "invalid_value"),
        ({"top_p": 1.5}, 400, "invalid_value"),
        ({"n": 2}, 400, "unsupported_value"),
        ({"extra_body": {"tools": []}}, 400, "unsupported_parameter"),
        ({"stream": True, "temperature": 3}, 400, "invalid_value"),
        ({"prompt": "x" * (CONTEXT * 256 + 2**20)}, 413, "request_too_large"),  # not tokenised
    ]
    for change, status, code in cases:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(**{**ok, **change})
        assert (err.value.status_code, err.value.code) == (status, code), change
        assert err.value.body is not None and set(err.value.body) >= {"message", "type", "param"}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-glm", messages=[])
    assert err.value.param == "messages"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    raw = httpx.post(server.url + "/chat/completions", content=b'{"model": "tiny-glm", "mess',
                     headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(server.url + "/chat/completions", json={"model": "tiny-glm"},
                         headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    chunked = httpx.post(
        server.url + "/completions",
        content=iter([b"x" * 2**20] * 2),
        headers={"Authorization": f"Bearer {KEY}"},
    )  # no Content-Length: read
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert server.health()["status"] == "ok"
    assert client.completions.create(**ok).choices[0].finish_reason == "length"  # same client


def test_full_server_answers_429_and_disconnected_streams_free_their_slots(server: Server) -> None:
    client = server.client()
    long = {"model": "tiny-glm", "max_tokens": 200, "temperature": 0, "stream": True}
    streams = [client.completions.create(prompt=f"Stream {i}", **long) for i in range(CAPACITY)]
    assert server.health()["active"] == CAPACITY
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="tiny-glm", prompt="one too many", max_tokens=2)
    assert err.value.response.headers["retry-after"] == "1"
    next(iter(streams[0]))  # the first one is generating: read some, then leave mid-stream
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 10
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["active"] == 0
    started = time.monotonic()
    answer = client.completions.create(model="tiny-glm", prompt="after", max_tokens=4)
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert time.monotonic() - started < 10  # not behind 16 × 200 abandoned tokens


def test_sigterm_finishes_in_flight_requests_and_writes_the_record(server: Server) -> None:
    client = server.client()
    stream = client.chat.completions.create(
        model="tiny-glm", messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=40, temperature=0, stream=True,
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks)  # admitted and started
    server.process.send_signal(signal.SIGTERM)
    rest = list(chunks)  # finishes within serve.shutdown_timeout_s
    assert rest[-1].choices[0].finish_reason == "length"
    assert server.process.wait(timeout=30) == 0
    with pytest.raises(httpx.ConnectError):
        server.health()
    record = json.loads((server.run_dir / "run.json").read_text())
    assert record["command"] == "serve" and record["status"] == "ok"
    served = record["results"]["serve"]
    assert served["served"] >= 22 and served["generated_tokens"] > 16 * 8
    assert served["errors_by_status"]["429"] == 1 and served["errors_by_status"]["401"] == 1
    assert served["errors_by_status"]["400"] >= 10 and served["errors_by_status"]["404"] == 1
    assert served["disconnected"] >= CAPACITY - 1 and served["tokens_per_s"] > 0
    assert [m["device"] for m in served["memory"]] == ["cpu"] and served["uptime_s"] > 0
    assert 1 < served["batches"]["largest"] <= 4  # concurrent requests batched, runtime.batch_size
    assert KEY not in (server.run_dir / "run.json").read_text()  # the variable's name only
    assert any(line.startswith("stopped: ") for line in server.lines)
