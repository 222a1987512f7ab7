"""Admission and counters of one server: how many requests it holds, and what it has done.

Admission runs on the event loop: a check and an increment with no `await` between them, so it
needs no lock. The capacity is `runtime.batch_size` sequences (what the plan's KV cache holds) plus
`runtime.max_queued_requests` waiting; one more gets 429 with `Retry-After`, and once shutdown
has begun every new request gets 503. The worker threads add tokens and busy time under a lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Literal

from glmdeploy.serving.backend import GenerationJob, GenerationOutcome
from glmdeploy.serving.protocol import ApiError

RETRY_AFTER_S = 1  # what a rejected client is told to wait


class ServerState:
    """What the server holds (admitted jobs) and what it has done (for /health and the record)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.active: set[GenerationJob] = set()  # admitted, not yet released
        self.draining = False
        self.started = time.monotonic()
        self.started_at = time.time()
        self.statuses: Counter[int] = Counter()  # responses by HTTP status
        self.served = 0  # completions answered in full
        self.disconnected = 0  # clients that left before the end
        self.aborted = 0  # stopped by shutdown
        self.peak_active = 0
        self.prompt_tokens = 0
        self._lock = threading.Lock()
        self._generated = 0
        self._running = 0
        self._busy_since = 0.0
        self._busy_s = 0.0

    def admit(self, job: GenerationJob) -> None:
        """Take `job` in, or raise ApiError 503 (shutting down) / 429 (full), with Retry-After."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.draining:
            raise ApiError(503, "The server is shutting down.", type="server_error",
                           code="service_unavailable", headers=retry)  # fmt: skip
        if len(self.active) >= self.capacity:
            message = (f"The server is at capacity ({self.capacity} requests: "
                       "runtime.batch_size generating, runtime.max_queued_requests waiting); "
                       "retry shortly.")  # fmt: skip
            raise ApiError(429, message, type="requests", code="rate_limit_exceeded", headers=retry)
        self.active.add(job)
        self.peak_active = max(self.peak_active, len(self.active))
        self.prompt_tokens += len(job.prompt_ids)

    def release(self, job: GenerationJob, ended: Literal["served", "failed", "left"]) -> None:
        """Stop `job` (if it still runs) and free its place; idempotent. `left`: the client went
        away, or the shutdown stopped it (its status code is counted separately)."""
        job.cancel.set()
        if job not in self.active:
            return
        self.active.discard(job)
        if ended == "served":
            self.served += 1
        elif ended == "left" and self.draining:
            self.aborted += 1
        elif ended == "left":
            self.disconnected += 1

    def drain(self) -> None:
        """Shutdown has begun: refuse new requests from now on."""
        self.draining = True

    def cancel_all(self) -> None:
        for job in list(self.active):
            job.cancel.set()

    def job_started(self) -> None:
        with self._lock:
            if self._running == 0:
                self._busy_since = time.monotonic()
            self._running += 1

    def job_finished(self, outcome: GenerationOutcome | None) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self._busy_s += time.monotonic() - self._busy_since
            if outcome is not None:
                self._generated += len(outcome.token_ids)

    def health(self) -> dict[str, Any]:
        status = "draining" if self.draining else "ok"
        return {"status": status, "active": len(self.active), "capacity": self.capacity}

    def summary(self) -> dict[str, Any]:
        """The counts for the run record."""
        with self._lock:
            generated, busy = self._generated, self._busy_s
        errors = {str(s): n for s, n in sorted(self.statuses.items()) if s >= 400}
        return {
            "requests": sum(self.statuses.values()),
            "served": self.served,
            "responses_by_status": {str(s): n for s, n in sorted(self.statuses.items())},
            "errors_by_status": errors,
            "disconnected": self.disconnected,
            "aborted_at_shutdown": self.aborted,
            "peak_active": self.peak_active,
            "capacity": self.capacity,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": generated,
            "generation_s": round(busy, 4),
            "tokens_per_s": round(generated / busy, 2) if busy > 0 else None,
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
