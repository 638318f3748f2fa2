"""Incremental detokenization for streaming: emit only whole characters, and never a stop string.

A byte-level BPE token can end inside a UTF-8 character, which decodes to U+FFFD until the next
token completes it; such text is held back. Text that could still grow into a stop string is
held back too, so a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """The text of one request's generated ids, handed out as deltas."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.stopped = False  # a stop string appeared: the text ends before it

    def add(self, ids: Sequence[int], final: bool = False) -> str:
        """Append ids; return the text that is now safe to emit (everything left when final)."""
        self.ids.extend(int(i) for i in ids)
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, text, final = True, text[:min(hits)], True
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                text = text.rstrip("\ufffd")
            text = text[:len(text) - self._stop_prefix(text)]
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)
