"""The inference backend over this process's planned, verified model: transformers' `generate`.

Concurrent requests are batched (`glmdeploy.serving.batcher`): up to `runtime.batch_size`
sequences, the number the plan's KV cache and workspace are sized for, run as one left-padded
`generate` call on one inference thread, never longer than the context per sequence. Each row
has its own limit, stop strings, streaming and cancellation (a streamer and a stopping
criterion that act per row). A batch of one is exactly `glmdeploy generate`'s call, so its greedy
tokens are the same by construction; for larger batches, padding and batch-shaped kernels may
change the last bits of the logits (measured identical on CPU in fp32; on GPUs in bf16 a
near-tie can resolve differently, as in any batching server). A per-request seed runs alone, on
a forked random state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from glmdeploy.inference.runner import peak_memory, reset_peak_memory, special_token_ids
from glmdeploy.loading.loader import LoadedModel, quiet_transformers
from glmdeploy.serving.backend import (
    BackendOverloaded,
    FinishReason,
    GenerationJob,
    GenerationOutcome,
    Sampling,
)
from glmdeploy.serving.batcher import Batcher
from glmdeploy.serving.text import TextAssembler


class TransformersBackend:
    """`InferenceBackend` for a `LoadedModel` that has a tokenizer (see `backend.py`)."""

    def __init__(
        self, loaded: LoadedModel, *, model_id: str, context_tokens: int, max_batch: int
    ) -> None:
        if loaded.tokenizer is None:
            raise ValueError("the server needs the model's tokenizer")
        self.loaded = loaded
        self.tokenizer: Any = loaded.tokenizer
        self.model_id = model_id
        self.context_tokens = context_tokens
        self.concurrency = max_batch
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self._token_ids = special_token_ids(loaded.model)
        eos = self._token_ids["eos_token_id"]
        self._eos = set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
        self._cuda = sorted({d for d in loaded.device_map.values() if isinstance(d, int)})
        reset_peak_memory(loaded)
        self._batcher = Batcher(self._generate, max_batch=max_batch, key=_batch_key,
                                fits=self._fits)  # fmt: skip

    def encode_text(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja's TemplateError: e.g. roles that must alternate
            raise ValueError(f"the chat template refused the messages: {exc}") from exc
        # The template writes the special tokens itself.
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def run(self, job: GenerationJob) -> GenerationOutcome:
        return self._batcher.run(job)

    def report(self) -> dict[str, Any]:
        memory = [dataclasses.asdict(m) for m in peak_memory(self.loaded)]
        return {"memory": memory, "batches": self._batcher.sizes()}

    def close(self) -> None:  # idempotent
        self._batcher.close()
        if self._cuda:
            torch.cuda.empty_cache()

    def _fits(self, jobs: Sequence[GenerationJob]) -> bool:
        """Left padding makes every row as long as the longest prompt plus the most new tokens."""
        longest = max(len(j.prompt_ids) for j in jobs)
        return longest + max(j.sampling.max_new_tokens for j in jobs) <= self.context_tokens

    def _generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationOutcome]:
        """One `generate` call for `jobs` (on the batcher's thread)."""
        started = time.perf_counter()
        rows = [_Row(job, TextAssembler(self._decode, job.sampling.stop)) for job in jobs]
        width = max(len(j.prompt_ids) for j in jobs)
        pad = int(self._token_ids["pad_token_id"])
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + list(j.prompt_ids) for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids)
                             for j in jobs])  # fmt: skip
        most = max(j.sampling.max_new_tokens for j in jobs)
        seed = jobs[0].sampling.seed if len(jobs) == 1 else None
        device = self.loaded.input_device
        try:
            with torch.inference_mode(), quiet_transformers(), self._seeded(seed):
                self.loaded.model.generate(
                    ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=self._config(jobs[0].sampling, most),
                    streamer=_Streamer(rows, self._eos),
                    stopping_criteria=StoppingCriteriaList([_Stop(rows)]),
                )
        except torch.OutOfMemoryError as exc:
            if self._cuda:
                torch.cuda.empty_cache()
            raise BackendOverloaded(f"the device ran out of memory: {exc}") from exc
        seconds = time.perf_counter() - started
        return [self._outcome(row, seconds) for row in rows]

    def _outcome(self, row: _Row, seconds: float) -> GenerationOutcome:
        tail = row.text.finish()
        if tail and row.job.on_text is not None:
            row.job.on_text(tail)
        reason: FinishReason = "stop"
        if not row.text.stopped and not (row.ids and row.ids[-1] in self._eos):
            if row.job.cancel.is_set():
                reason = "cancelled"
            elif len(row.ids) >= row.job.sampling.max_new_tokens:
                reason = "length"
        return GenerationOutcome(tuple(row.ids), row.text.text, reason, seconds)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _config(self, sampling: Sampling, max_new_tokens: int) -> Any:
        config: Any = GenerationConfig  # untyped upstream
        if sampling.greedy:  # what `glmdeploy generate` uses
            return config(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          **self._token_ids)  # fmt: skip
        return config(max_new_tokens=max_new_tokens, do_sample=True, num_beams=1,
                      temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                      **self._token_ids)  # fmt: skip

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=self._cuda):
            torch.manual_seed(seed)
            yield


def _batch_key(job: GenerationJob) -> Hashable:
    """Jobs with the same key may share a batch: all greedy ones; sampling ones with the same
    temperature and top_p; a seeded sampling job only with itself."""
    s = job.sampling
    if s.greedy:
        return ("greedy",)
    return ("sample", s.temperature, s.top_p) if s.seed is None else ("seeded", id(job))


@dataclass(eq=False)
class _Row:
    """One job's sequence in a batch: its new ids and text, and whether it has ended."""

    job: GenerationJob
    text: TextAssembler
    ids: list[int] = field(default_factory=list)
    done: bool = False


class _Streamer(BaseStreamer):
    """Feeds each row's new token to its text (rows that have ended get padding: ignored)."""

    def __init__(self, rows: list[_Row], eos: set[int]) -> None:
        self.rows, self.eos, self.prompt_seen = rows, eos, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if row.done:
                continue
            row.ids.append(int(token))
            piece = row.text.push(int(token))
            if piece and row.job.on_text is not None:
                row.job.on_text(piece)
            row.done = int(token) in self.eos

    def end(self) -> None:
        pass


class _Stop(StoppingCriteria):
    """Ends a row at its own limit, at a stop string, or when its job is cancelled."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        for row in self.rows:
            limit = len(row.ids) >= row.job.sampling.max_new_tokens
            row.done = row.done or limit or row.text.stopped or row.job.cancel.is_set()
        done = [row.done for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
