"""Generated token ids to text, incrementally: pieces safe to send now, and stop strings cut.

Decoding token by token does not work for every tokenizer (byte-level BPE splits characters across
tokens; SentencePiece drops a leading space at the start of a decode). `TextAssembler` decodes a
short window of recent ids and releases only what is stable (no trailing replacement character),
the approach of text-generation-inference and vLLM, so it works with any tokenizer's `decode`.
Text that could be the start of a stop string is held back until it is known not to be one; a
stop string ends the text before it (as in OpenAI's API) and sets `stopped`. At the end, `finish`
releases the rest, so the pieces joined equal `decode(all ids)` up to the first stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
_INCOMPLETE = "\ufffd"  # what a decoder yields for a character whose bytes have not all arrived


class TextAssembler:
    """Accumulates one sequence's new token ids into text (see the module docstring)."""

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0  # window start: the ids before it have been turned into text
        self._read = 0  # window end of the last released text
        self._raw = ""  # every stable character decoded so far
        self._held = ""  # decoded, not released: it may begin a stop string
        self.text = ""  # released text
        self.stopped = False  # a stop string was found; nothing more is released

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the text that may be sent now ('' if none)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._raw += piece
        return self._release(piece, final=False)

    def finish(self) -> str:
        """The text not yet released (characters held for more bytes, a possible stop string)."""
        if self.stopped:
            return ""
        full = self._decode(self._ids)
        rest = full[len(self._raw) :] if full.startswith(self._raw) else ""
        self._raw += rest
        return self._release(rest, final=True)

    def _release(self, piece: str, *, final: bool) -> str:
        pending = self._held + piece
        cut = min((i for s in self._stop if (i := pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self._held, self.stopped = pending[:cut], "", True
        else:
            keep = 0 if final else _stop_prefix_length(pending, self._stop)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
