"""What the HTTP server needs from whatever runs the model: the inference backend interface.

The server (`glmdeploy.serving.app`) validates a request, turns it into a `GenerationJob` (prompt
ids, sampling, a cancel flag, a text callback for streaming) and calls `InferenceBackend.run` on
one of up to `concurrency` threads; it never touches torch itself. Today's backend is
`glmdeploy.serving.transformers_backend.TransformersBackend`: the planned, verified model of this
process (one device, or a device map across GPUs/CPU/disk), driven by transformers' `generate`,
concurrent jobs batched on one inference thread.

Tensor/pipeline parallelism (a torchrun world, `glmdeploy.distributed`) fits behind the same
interface as a rank-0 backend: its `run` would broadcast each job (prompt ids and sampling) to the
other ranks, every rank would call `generate` together, and rank 0 would feed the text callback
and return the outcome; `cancel` is broadcast with each step's stop decision. What is missing for
that: a job loop on ranks > 0 in the distributed worker, and a `serve` path that starts the world
and binds HTTP on rank 0 only. Until then `glmdeploy serve` refuses world sizes above 1.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Sampling:
    """How one request samples: temperature 0 is greedy (top_p is then irrelevant)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text ends before the first of these (not included)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(eq=False)  # compared and hashed by identity: the server keeps a set of them
class GenerationJob:
    """One request's generation. `on_text` (streaming) is called from the backend's thread with
    each piece of new text; `cancel` is set by the server when the client has gone or the
    server is shutting down, and generation stops at the next token."""

    prompt_ids: tuple[int, ...]
    sampling: Sampling
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class GenerationOutcome:
    """What a job produced: new token ids, their text (stop strings cut), why it ended."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    seconds: float


class BackendOverloaded(RuntimeError):
    """The device ran out of memory for this job; the server answers 503 and keeps serving."""


class InferenceBackend(Protocol):
    """Runs generation jobs for the server.

    `run` blocks until the job ends and is called from at most `concurrency` threads at once;
    the server admits `runtime.batch_size` + `runtime.max_queued_requests` requests and queues
    those the backend cannot take yet.
    """

    model_id: str  # the name clients pass as `model`
    context_tokens: int  # prompt + new tokens per sequence: what the plan's KV cache holds
    concurrency: int  # jobs `run` may be running at once
    has_chat_template: bool

    def encode_text(self, text: str) -> list[int]:
        """A completion prompt as token ids (with the tokenizer's own special tokens)."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Chat messages through the model's chat template, with the assistant's turn opened.
        Raises ValueError with a message for the client when the template refuses them."""
        ...

    def run(self, job: GenerationJob) -> GenerationOutcome:
        """Generate for `job`. Raises BackendOverloaded when the device ran out of memory."""
        ...

    def report(self) -> dict[str, Any]:
        """For the run record: `memory` (peak per device since the start) and what else the
        backend measured (e.g. `batches`)."""
        ...

    def close(self) -> None:
        """Release what `run` holds; called once, after the last job."""
        ...
