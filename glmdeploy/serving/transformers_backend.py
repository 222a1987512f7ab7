"""The inference backend over this process's planned, verified model: transformers' `generate`.

One job at a time on the server's single worker thread (`generate` is not re-entrant; a model
spread over several devices by a device map computes on one of them at a time anyway). Greedy
jobs use exactly the generation settings of `glmdeploy generate`, so a greedy request returns
the tokens `glmdeploy generate` prints for the same prompt. Streaming, stop strings and
cancellation hook into `generate` through a streamer and a stopping criterion; a per-request
seed is applied on a forked random state, leaving other requests' randomness alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
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
from glmdeploy.serving.text import TextAssembler


class TransformersBackend:
    """`InferenceBackend` for a `LoadedModel` that has a tokenizer (see `backend.py`)."""

    concurrency = 1

    def __init__(self, loaded: LoadedModel, *, model_id: str, context_tokens: int) -> None:
        if loaded.tokenizer is None:
            raise ValueError("the server needs the model's tokenizer")
        self.loaded = loaded
        self.tokenizer: Any = loaded.tokenizer
        self.model_id = model_id
        self.context_tokens = context_tokens
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self._token_ids = special_token_ids(loaded.model)
        eos = self._token_ids["eos_token_id"]
        self._eos = set(eos if isinstance(eos, list | tuple) else [] if eos is None else [eos])
        self._cuda = sorted({d for d in loaded.device_map.values() if isinstance(d, int)})
        reset_peak_memory(loaded)

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
        started = time.perf_counter()
        if job.cancel.is_set():  # the client left while the job was queued
            return GenerationOutcome((), "", "cancelled", 0.0)
        text = TextAssembler(self._decode, job.sampling.stop)
        ids = torch.tensor([job.prompt_ids], dtype=torch.long)
        device = self.loaded.input_device
        try:
            with torch.inference_mode(), quiet_transformers(), self._seeded(job.sampling.seed):
                out = self.loaded.model.generate(
                    ids.to(device),
                    attention_mask=torch.ones_like(ids).to(device),
                    generation_config=self._config(job.sampling),
                    streamer=_Streamer(text, job),
                    stopping_criteria=StoppingCriteriaList([_Stop(text, job)]),
                )
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise BackendOverloaded(f"the device ran out of memory: {exc}") from exc
        new = tuple(int(t) for t in out[0, len(job.prompt_ids) :].tolist())
        tail = text.finish()
        if tail and job.on_text is not None:
            job.on_text(tail)
        reason = self._finish_reason(new, text, job)
        return GenerationOutcome(new, text.text, reason, time.perf_counter() - started)

    def memory(self) -> list[dict[str, Any]]:
        import dataclasses

        return [dataclasses.asdict(m) for m in peak_memory(self.loaded)]

    def close(self) -> None:
        if self._cuda:
            torch.cuda.empty_cache()

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _config(self, sampling: Sampling) -> Any:
        config: Any = GenerationConfig  # untyped upstream
        if sampling.greedy:  # what `glmdeploy generate` uses
            return config(max_new_tokens=sampling.max_new_tokens, do_sample=False, num_beams=1,
                          **self._token_ids)  # fmt: skip
        return config(max_new_tokens=sampling.max_new_tokens, do_sample=True, num_beams=1,
                      temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                      **self._token_ids)  # fmt: skip

    def _finish_reason(
        self, new: tuple[int, ...], text: TextAssembler, job: GenerationJob
    ) -> FinishReason:
        if text.stopped or (new and new[-1] in self._eos):
            return "stop"
        if job.cancel.is_set():
            return "cancelled"
        return "length" if len(new) >= job.sampling.max_new_tokens else "stop"

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=self._cuda):
            torch.manual_seed(seed)
            yield


class _Streamer(BaseStreamer):
    """Feeds each new token to the job's text; sends released text to the job's callback."""

    def __init__(self, text: TextAssembler, job: GenerationJob) -> None:
        self.text, self.job, self.prompt_seen = text, job, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            piece = self.text.push(int(token))
            if piece and self.job.on_text is not None:
                self.job.on_text(piece)

    def end(self) -> None:
        pass


class _Stop(StoppingCriteria):
    """Stops generation at the next token once a stop string was seen or the job was cancelled."""

    def __init__(self, text: TextAssembler, job: GenerationJob) -> None:
        self.text, self.job = text, job

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        done = self.text.stopped or self.job.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
