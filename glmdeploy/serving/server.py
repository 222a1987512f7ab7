"""Serve a loaded model over HTTP with uvicorn until SIGTERM/Ctrl-C, then report what was served.

Why glmdeploy's own small FastAPI + uvicorn application and not `transformers serve` (checked on
transformers 5.24): its model manager only loads models by name with one device (no supported way
to hand it a planned, verified, device-mapped model); it exposes unauthenticated `/load_model`
and `/reset` endpoints that load a second model or drop the planned one, breaking the memory
plan; it has no API key, no bound on queued requests (no 429/503), and answers bad requests with
FastAPI-style or plain-text 500 errors rather than OpenAI's error JSON. glmdeploy reuses what
transformers does well: `generate` with a streamer and stopping criteria, and the tokenizer's
chat template.

Shutdown: uvicorn stops listening, gives in-flight requests `serve.shutdown_timeout_s` to finish,
cancels the rest (their generation stops at the next token), and the lifespan end waits for the
worker thread. uvicorn 0.54 re-raises the captured signal after shutdown (the process would die
of SIGTERM, rc -15, before the run record is written); `_Server` restores the previous handlers
without re-raising, so `glmdeploy serve` returns normally and exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from glmdeploy.config.settings import Deployment
from glmdeploy.loading.loader import LoadedModel
from glmdeploy.process import default_collector
from glmdeploy.serving.app import build_app
from glmdeploy.serving.preflight import Listener, api_key, require_tokenizer
from glmdeploy.serving.state import ServerState
from glmdeploy.serving.transformers_backend import TransformersBackend

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve_model(
    loaded: LoadedModel,
    deployment: Deployment,
    listener: Listener,
    *,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Serve `loaded` on `listener` until stopped; returns the counts for the run record.

    Raises:
        LoadError: the model has no tokenizer usable without remote code.
        ConfigError: `serve.api_key_env` names a variable that is not set.
    """
    require_tokenizer(deployment, loaded.tokenizer)
    key = api_key(deployment.serve)
    runtime = deployment.runtime
    backend = TransformersBackend(loaded, model_id=deployment.model.name,
                                  context_tokens=runtime.max_context_tokens,
                                  max_batch=runtime.batch_size)  # fmt: skip
    state = ServerState(capacity=runtime.batch_size + runtime.max_queued_requests)
    app = build_app(backend, state, runtime, api_key=key)
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=round(deployment.serve.shutdown_timeout_s),
    )  # fmt: skip
    if not backend.has_chat_template:
        say("note: the tokenizer has no chat template: /v1/chat/completions answers 400")
    if not listener.loopback and key is None:
        say(f"warning: listening on {listener.host} without an API key: anyone who can reach "
            "this machine can use the model (serve.api_key_env)")  # fmt: skip
    say(f"  {state.capacity} requests at once ({runtime.batch_size} generating, "
        f"{runtime.max_queued_requests} queued), up to {runtime.max_context_tokens} tokens each"
        f"{'; API key required' if key else ''}; stop with Ctrl-C or SIGTERM")  # fmt: skip

    def ready() -> None:
        say(f"serving {deployment.model.name} on {listener.url}")

    server = _Server(config, on_ready=ready, on_signal=state.drain)
    default_collector()  # the model runs, for days, as in any process (glmdeploy.process)
    server.run(sockets=[listener.sock])
    state.cancel_all()  # after a forced exit (a second Ctrl-C) the lifespan end did not run
    backend.close()
    summary = {"url": listener.url, **state.summary(), **backend.report()}
    errors = ", ".join(f"{n}× {status}" for status, n in summary["errors_by_status"].items())
    say(f"stopped: {summary['served']} requests served, {summary['generated_tokens']} tokens "
        f"generated, errors: {errors or 'none'}; up {summary['uptime_s']:.0f} s")  # fmt: skip
    return summary


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it is ready and keeping the signal (see the module doc)."""

    def __init__(
        self, config: uvicorn.Config, *, on_ready: Callable[[], None], on_signal: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._on_ready, self._on_signal = on_ready, on_signal

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()  # refuse new requests (503) while the running ones finish
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's capture, without re-raising the signal after shutdown."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
