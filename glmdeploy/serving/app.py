"""The OpenAI-compatible HTTP application: routes, request flow, streaming, errors, shutdown.

`/v1/chat/completions` and `/v1/completions` (streaming as server-sent events, or whole),
`/v1/models`, and `/health`. A request is validated (400), its model checked (404), its prompt
encoded and measured against the context (400), admitted or refused (429/503, `state.py`), then
generated on the backend's worker thread. A client that leaves, whether streaming or not, has its
generation stopped at the next token and its place freed. At shutdown (lifespan end) every job is
cancelled and the worker thread is awaited without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from glmdeploy.config.settings import Runtime
from glmdeploy.serving.backend import (
    BackendOverloaded,
    GenerationJob,
    GenerationOutcome,
    InferenceBackend,
)
from glmdeploy.serving.gate import CLIENT_GONE, ASGIApp, Gate, Message, Receive, Scope, Send
from glmdeploy.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_error,
)
from glmdeploy.serving.responses import DONE, Kind, Reply, sse
from glmdeploy.serving.sampling import resolve_sampling
from glmdeploy.serving.state import RETRY_AFTER_S, ServerState

log = logging.getLogger("glmdeploy.serve")
BYTES_PER_CONTEXT_TOKEN = 256  # JSON-escaped text of one token, generously (a long token, \uXXXX)
BODY_SLACK_BYTES = 2**20  # the rest of a request: field names, messages' roles, stop strings
Ended = Literal["served", "failed", "left"]
_Body = TypeVar("_Body", bound=BaseModel)


class Worker:
    """Runs jobs on the backend's threads (`backend.concurrency` of them), keeping the counts."""

    def __init__(self, backend: InferenceBackend, state: ServerState) -> None:
        self.backend, self.state = backend, state
        self.pool = ThreadPoolExecutor(backend.concurrency, thread_name_prefix="glmdeploy-generate")

    def submit(self, job: GenerationJob) -> asyncio.Future[GenerationOutcome]:
        return asyncio.get_running_loop().run_in_executor(self.pool, self._run, job)

    def _run(self, job: GenerationJob) -> GenerationOutcome:
        self.state.job_started()
        outcome = None
        try:
            outcome = self.backend.run(job)
            return outcome
        finally:
            self.state.job_finished(outcome)

    async def close(self) -> None:
        """Wait for the running job (already cancelled) without blocking the event loop."""
        stop = functools.partial(self.pool.shutdown, wait=True, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, stop)
        self.backend.close()


def build_app(
    backend: InferenceBackend, state: ServerState, runtime: Runtime, *, api_key: str | None
) -> ASGIApp:
    """The ASGI application serving `backend` (wrapped in the API-key and status `Gate`)."""
    worker = Worker(backend, state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        state.drain()  # uvicorn has waited for (or cancelled) the requests: stop what remains
        state.cancel_all()
        await worker.close()

    app = FastAPI(title="glmdeploy", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    card = {"id": backend.model_id, "object": "model", "created": int(state.started_at),
            "owned_by": "glmdeploy"}  # fmt: skip

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, "invalid_request_error"), exc.status_code)

    @app.exception_handler(Exception)  # a bug (uvicorn logs it): OpenAI-shaped JSON, not text
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_internal_body(exc), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {**state.health(), "model": backend.model_id}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(backend, model_id)
        return card

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = _parse(ChatCompletionRequest, await _read_body(request, runtime))
        _check_model(backend, body.model)
        if not backend.has_chat_template:
            message = "this model has no chat template: use /v1/completions"
            raise ApiError(400, message, param="messages", code="no_chat_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]  # fmt: skip
        try:
            ids = backend.encode_chat(messages)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        return await respond(request, body, ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _parse(CompletionRequest, await _read_body(request, runtime))
        _check_model(backend, body.model)
        return await respond(request, body, backend.encode_text(body.text()), "completion")

    async def respond(
        request: Request, body: ChatCompletionRequest | CompletionRequest, ids: list[int],
        kind: Kind,
    ) -> Response:  # fmt: skip
        sampling = resolve_sampling(body, len(ids), runtime=runtime,
                                    context_tokens=backend.context_tokens)  # fmt: skip
        job = GenerationJob(tuple(ids), sampling)
        reply = Reply(kind, backend.model_id, len(ids))
        state.admit(job)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(worker, state, job, reply, usage)
        ended: Ended = "left"
        future = worker.submit(job)
        gone: asyncio.Future[None] = asyncio.ensure_future(_client_gone(request.receive))
        try:
            waiting: set[asyncio.Future[Any]] = {future, gone}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                return Response(status_code=CLIENT_GONE)
            ended = "failed"
            outcome = future.result()
            ended = "served"
            return JSONResponse(reply.whole(outcome))
        except BackendOverloaded as exc:
            raise _overloaded(exc) from exc
        except Exception as exc:  # a bug: answered, and the connection stays usable
            log.error("internal error while serving a request", exc_info=exc)
            message = _internal_body(exc)["error"]["message"]
            raise ApiError(500, message, type="server_error") from exc
        finally:
            gone.cancel()
            future.cancel()  # a job still queued never starts
            state.release(job, ended)

    return Gate(app, state, api_key)


def _stream(
    worker: Worker, state: ServerState, job: GenerationJob, reply: Reply, usage: bool
) -> Response:
    """Server-sent events: the role, the text as it is generated, the finish reason, [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def on_text(piece: str) -> None:  # on the worker thread
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    job.on_text = on_text
    future = worker.submit(job)
    future.add_done_callback(lambda _f: queue.put_nowait(None))
    ended: list[Ended] = ["left"]

    async def events() -> AsyncIterator[str]:
        opening = reply.opening()
        if opening is not None:
            yield sse(opening)
        finished = False
        while not finished and (text := await queue.get()) is not None:
            while not queue.empty():  # a backlog goes out as one event
                more = queue.get_nowait()
                if more is None:
                    finished = True
                    break
                text += more
            yield sse(reply.piece(text))
        try:
            outcome = await future
        except Exception as exc:  # the client's stream has begun: an error event ends it
            ended[0] = "failed"
            if isinstance(exc, BackendOverloaded):
                yield sse(_overloaded(exc).body())
            else:
                log.error("internal error while streaming a response", exc_info=exc)
                yield sse(_internal_body(exc))
            return
        yield sse(reply.closing(outcome))
        if usage:
            yield sse(reply.usage_chunk(outcome))
        yield DONE
        ended[0] = "served"

    def close() -> None:
        future.cancel()
        state.release(job, ended[0])

    return _Stream(events(), close)


class _Stream(StreamingResponse):
    """A stream that frees its job however it ends: finished, client gone, or shutdown."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    message: Message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()


def max_body_bytes(runtime: Runtime) -> int:
    """The largest request body read: max_context_tokens × BYTES_PER_CONTEXT_TOKEN + 1 MiB.

    A prompt beyond it cannot fit the context: it is refused (413) before it is read whole or
    tokenised."""
    return runtime.max_context_tokens * BYTES_PER_CONTEXT_TOKEN + BODY_SLACK_BYTES


async def _read_body(request: Request, runtime: Runtime) -> bytes:
    """The request body, read up to `max_body_bytes` (ApiError 413 beyond it)."""
    limit = max_body_bytes(runtime)
    message = (f"the request body exceeds {limit:,} bytes, more than a prompt of this model's "
               f"{runtime.max_context_tokens:,}-token context can take")  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, message, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, message, code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model: type[_Body], raw: bytes) -> _Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from exc


def _check_model(backend: InferenceBackend, name: str) -> None:
    if name != backend.model_id:
        message = f"The model `{name}` does not exist: this server serves `{backend.model_id}`."
        raise ApiError(404, message, param="model", code="model_not_found")


def _overloaded(exc: Exception) -> ApiError:
    return ApiError(503, str(exc), type="server_error", code="overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip


def _internal_body(exc: BaseException) -> dict[str, Any]:
    return error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
