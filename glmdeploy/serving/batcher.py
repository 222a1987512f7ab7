"""Dynamic batching: the jobs waiting at the same moment run as one batch on one inference thread.

The server calls `Batcher.run` from up to `max_batch` threads at once; each call waits while the
inference thread runs batches. When the thread is free it takes the oldest waiting job and, in
arrival order, every other waiting job that may share its batch (`key`: the same sampling; a
seeded sampling job runs alone) while the batch still `fits` (prompt and new tokens within the
context the plan sized), up to `max_batch` jobs. A batch runs to its end (static batching): jobs
arriving meanwhile form the next batch. A job cancelled while it waits never starts.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmdeploy.serving.backend import GenerationJob, GenerationOutcome

RunBatch = Callable[[Sequence[GenerationJob]], list[GenerationOutcome]]
CANCELLED = GenerationOutcome((), "", "cancelled", 0.0)


@dataclass(eq=False)
class _Waiting:
    job: GenerationJob
    done: threading.Event = field(default_factory=threading.Event)
    outcome: GenerationOutcome = CANCELLED
    error: BaseException | None = None

    def finish(self, outcome: GenerationOutcome | None, error: BaseException | None) -> None:
        self.outcome, self.error = outcome or CANCELLED, error
        self.done.set()


class Batcher:
    """Runs `run_batch` on its own thread over batches of the jobs passed to `run`."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int,
        key: Callable[[GenerationJob], Hashable],
        fits: Callable[[Sequence[GenerationJob]], bool],
    ) -> None:
        self._run_batch, self._max, self._key, self._fits = run_batch, max_batch, key, fits
        self._waiting: list[_Waiting] = []
        self._changed = threading.Condition()
        self._closed = False
        self._sizes: Counter[int] = Counter()  # batch size -> batches run
        self._thread = threading.Thread(target=self._loop, name="glmdeploy-generate", daemon=True)
        self._thread.start()

    def run(self, job: GenerationJob) -> GenerationOutcome:
        """Wait for `job`'s batch to run; its outcome, or the batch's exception."""
        waiting = _Waiting(job)
        with self._changed:
            if self._closed:
                return CANCELLED
            self._waiting.append(waiting)
            self._changed.notify()
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.outcome

    def sizes(self) -> dict[str, Any]:
        """How many batches ran, their mean and largest size."""
        count = sum(self._sizes.values())
        jobs = sum(size * n for size, n in self._sizes.items())
        return {"count": count, "mean_size": round(jobs / count, 2) if count else None,
                "largest": max(self._sizes, default=0)}  # fmt: skip

    def close(self) -> None:
        """Stop after the running batch; jobs still waiting end `cancelled`."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if self._closed:
                    for waiting in self._waiting:
                        waiting.finish(None, None)
                    self._waiting.clear()
                    return
                batch = self._take()
            if not batch:
                continue
            self._sizes[len(batch)] += 1
            try:
                outcomes = self._run_batch([w.job for w in batch])
            except BaseException as exc:  # every job of the batch gets the error
                for waiting in batch:
                    waiting.finish(None, exc)
                continue
            for waiting, outcome in zip(batch, outcomes, strict=True):
                waiting.finish(outcome, None)

    def _take(self) -> list[_Waiting]:
        """The next batch, taken out of the waiting list (called with the lock held)."""
        for waiting in [w for w in self._waiting if w.job.cancel.is_set()]:
            self._waiting.remove(waiting)
            waiting.finish(None, None)
        if not self._waiting:
            return []
        first = self._waiting[0]
        batch = [first]
        for waiting in self._waiting[1:]:
            if len(batch) >= self._max:
                break
            jobs = [w.job for w in batch] + [waiting.job]
            if self._key(waiting.job) == self._key(first.job) and self._fits(jobs):
                batch.append(waiting)
        for waiting in batch:
            self._waiting.remove(waiting)
        return batch
