"""OpenAI's response shapes: chat completions, text completions, their stream chunks, usage."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from glmdeploy.serving.backend import GenerationOutcome

Kind = Literal["chat", "completion"]
DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class Reply:
    """The fixed parts of one request's answer (id, time, model) and how to build each piece."""

    kind: Kind
    model: str
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def whole(self, outcome: GenerationOutcome) -> dict[str, Any]:
        """The non-streaming answer."""
        finish = _finish(outcome)
        if self.kind == "chat":
            message = {"role": "assistant", "content": outcome.text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": finish}
        return {**self._head(""), "choices": [choice], "usage": self.usage(len(outcome.token_ids))}

    def opening(self) -> dict[str, Any] | None:
        """The first chunk of a chat stream (the assistant's role); completions have none."""
        if self.kind != "chat":
            return None
        return self.chunk(delta={"role": "assistant", "content": ""})

    def piece(self, text: str) -> dict[str, Any]:
        return self.chunk(delta={"content": text}) if self.kind == "chat" else self.chunk(text=text)

    def closing(self, outcome: GenerationOutcome) -> dict[str, Any]:
        """The last chunk with choices: empty text, the finish reason."""
        if self.kind == "chat":
            return self.chunk(delta={}, finish=_finish(outcome))
        return self.chunk(text="", finish=_finish(outcome))

    def usage_chunk(self, outcome: GenerationOutcome) -> dict[str, Any]:
        """`stream_options.include_usage`: a chunk with no choices and the usage."""
        return {**self._head(".chunk"), "choices": [], "usage": self.usage(len(outcome.token_ids))}

    def chunk(
        self, *, delta: dict[str, Any] | None = None, text: str | None = None,
        finish: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head(".chunk"), "choices": [choice]}

    def _head(self, suffix: str) -> dict[str, Any]:
        kind = "chat.completion" + suffix if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def _finish(outcome: GenerationOutcome) -> str:
    # "cancelled" only reaches a client whose request the shutdown stopped: it ended early.
    return "stop" if outcome.finish_reason == "cancelled" else outcome.finish_reason
