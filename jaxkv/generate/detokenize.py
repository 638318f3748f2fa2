"""Incremental detokenization: emit only whole characters, and never a stop string.

A byte-level BPE token can end inside a UTF-8 character, which decodes to U+FFFD until the next
token completes it; such text is held back (or emitted as is when final). Text that could still
grow into a stop string is held back too, so a client never sees part of a stop string, and the
text ends right before the first stop string to be completed (if several complete at the same
character, the one that starts earliest).

The engine streams the deltas; LLM.generate joins them.
A client may send many long stop strings and ask for long outputs, so the work per token must not
grow with the text so far: each token decodes a short window of ids (the prefix-offset method of
vLLM and TGI) and feeds only the new characters to one KMP automaton per stop string.

The deltas add up to decoding all ids at once, for byte-level BPE and SentencePiece (Metaspace) decoders
alike. The exception is invalid UTF-8 in byte-fallback tokens: ByteFallback decodes a run of byte tokens
as a whole, so a bad byte turns its run into U+FFFD after the run's first characters were sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class _Kmp:
    """A Knuth-Morris-Pratt matcher for one stop string.

    `state` is the length of the longest prefix of the stop that ends the text fed so far: how much
    of the text could still grow into this stop. The prefix function is extended only as far as the
    state has reached, so a long stop that never matches costs nothing up front.
    """

    __slots__ = ("stop", "fail", "state")

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self.fail = [0]  # fail[q]: length of the longest proper prefix of stop[:q + 1] that also ends it

    def feed(self, char: str) -> bool:
        """Advance by one character (amortized O(1)); True when the stop string has just been completed."""
        stop, fail, q = self.stop, self.fail, self.state
        while q and stop[q] != char:
            q = fail[q - 1]
        if stop[q] == char:
            q += 1
            if q == len(fail) < len(stop):  # the first time this far: fail[q] is needed from now on
                k = fail[q - 1]
                while k and stop[q] != stop[k]:
                    k = fail[k - 1]
                fail.append(k + (stop[q] == stop[k]))
        self.state = q
        return q == len(stop)


class TextStream:
    """The text of one request's generated ids, handed out as deltas.

    `text` is everything decoded and committed so far (emitted or held back); once `stopped`, it is
    the whole text before the stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.matchers = [_Kmp(s) for s in dict.fromkeys(stop) if s]
        self.ids: list[int] = []
        # ids[prefix_offset:read_offset] are the ids of the last commit: decoding from prefix_offset and cutting
        # their text off gives the new text in context (a Metaspace decoder strips a leading space, but only
        # the first token's).
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.sent = 0  # characters of `text` already emitted
        self.stopped = False  # a stop string appeared: the text ends before it

    def add(self, ids: Sequence[int], final: bool = False) -> str:
        """Append ids; return the text that is now safe to emit (everything left when final)."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in ids)
        new = self._new_text(final)
        for n, char in enumerate(new):
            done = [len(m.stop) for m in self.matchers if m.feed(char)]
            if done:  # of the stops completed here, the longest starts earliest
                end = len(self.text) + n + 1 - max(done)
                self.text, self.stopped, final = (self.text + new[:n + 1])[:end], True, True
                break
        else:
            self.text += new
        held = 0 if final else max((m.state for m in self.matchers), default=0)
        delta = self.text[self.sent:len(self.text) - held]
        self.sent += len(delta)
        return delta

    def _new_text(self, final: bool) -> str:
        """The text that the ids since the last commit add, once it does not end in an incomplete character."""
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]
