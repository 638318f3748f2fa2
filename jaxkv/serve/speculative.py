"""Speculative decoding: proposals for the next tokens of a sequence, verified by the target in one ragged step.

A decode row that speculates feeds its last token and k proposed ones as one chunk; the step samples a token at
each of them by the one sampling rule, and a proposal is kept when the token sampled at its position equals it
(`jaxkv.generate.sampling.sample`). The engine emits the kept prefix and the token after it, so every token is the
one plain decoding gives with the same seed: speculation changes how many steps a text takes, never the text.
The K/V written for the proposals past the first rejected one is never read: the sequence's length goes back.

Proposers: `ngram` (prompt lookup, Saxena 2023): the longest suffix of the sequence, of n down to 1 tokens,
found earlier in it, and the k tokens that followed its latest occurrence. It needs no model and shines when the
output copies its context (summaries with quotes, edits, code). `draft` (Leviathan et al. 2023): a smaller model
sharing the target's tokenizer proposes its k greedy tokens (`jaxkv.serve.draft`); `first-N` drafts with the
target's own first N layers (its final norm and head after them), which costs no extra weights.

Verifying costs more than a decode step (k + 1 tokens per row, and no run of several decode iterations in one
call), so it pays only when enough proposals are kept. `Payoff` decides per step from this engine's own step
times and each sequence's recent acceptance per source of proposals (`Acceptance`), and turns speculation off
where it would slow decoding down (plain continuation, large batches on a CPU).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxkv.cache.pages import OutOfPages
from jaxkv.errors import JaxkvError

if TYPE_CHECKING:  # (it holds an Acceptance: imported here at run time would be a cycle)
    from jaxkv.serve.sequence import EngineSequence

METHODS = ("ngram", "draft")
NGRAM_MAX = 3  # the longest suffix prompt lookup matches
DECAY = 0.9  # weight of a sequence's earlier proposals per step: about the last 10 steps count
PRIOR = 0.5  # acceptance assumed before an engine has seen any, worth one proposed token
EXPLORE = 64  # decisions between tries of the option the payoff passed over, so that its time stays current
SMOOTHING = 0.2  # weight of the latest call in a step time's running mean
BYSTANDER = 0.95  # the least share of its plain tokens/s a request that does not speculate keeps beside others


@dataclasses.dataclass(frozen=True)
class Speculation:
    """method: the proposer; k: tokens proposed per step (at most); adaptive: verify only when `Payoff` expects
    it to be faster than plain decoding (else every step that can, which tests use)."""

    method: str
    k: int
    adaptive: bool = True
    source: str | None = None  # draft: the model, as jaxkv.load takes it, or first-N
    draft: Any = None  # draft: the loaded model (a jaxkv.api.LLM; jaxkv.load loads `source`)

    def propose(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """Up to k tokens proposed to follow `tokens` (none when nothing matches), and their source: proposals of
        one source are kept about equally often (`Acceptance`). Prompt lookup: the length of the match."""
        return ngram_proposal(tokens, k)


def speculation(spec: str | Speculation | None) -> Speculation | None:
    """The policy of --speculative ngram:K or draft:MODEL:K, or one clear error line (the draft is loaded by
    `jaxkv.load`)."""
    if spec is None or isinstance(spec, Speculation):
        return spec
    method, _, rest = str(spec).partition(":")
    source, _, k = rest.rpartition(":") if method == "draft" else ("", "", rest)
    if method not in METHODS:
        raise JaxkvError(f"speculative must be ngram:K or draft:MODEL:K, got {spec!r}")
    if not k.isdigit() or int(k) < 1:
        raise JaxkvError(f"speculative {method} needs K, the tokens proposed per step, an integer >= 1: got {spec!r}")
    if method == "draft" and not source:
        raise JaxkvError(f"speculative draft needs a model: draft:MODEL:K (a model as --model takes, or first-N "
                         f"for the target's first N layers), got {spec!r}")
    return Speculation(method, int(k), source=source or None)


def ngram_proposal(tokens: list[int], k: int, n_max: int = NGRAM_MAX) -> tuple[list[int], int]:
    """Prompt lookup: for n from n_max down to 1, the latest earlier occurrence of the last n tokens, and up to k
    tokens that followed it; returns them and n (0: no match)."""
    seq = np.asarray(tokens)
    for n in range(min(n_max, len(seq) - 1), 0, -1):
        suffix = seq[-n:]
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(seq[:-1], n) == suffix, axis=1))
        if len(starts):
            start = starts[-1] + n
            return [int(t) for t in seq[start:start + k]], n
    return [], 0


def accepted(sampled, proposal: list[int]) -> int:
    """How many proposals a step kept: sampled[i], drawn after the row's i-th fed token, is proposal[i] exactly
    when that proposal was kept, and the first that was not ends the run."""
    n, most = 0, min(len(proposal), len(sampled))
    while n < most and int(sampled[n]) == proposal[n]:
        n += 1
    return n


class Acceptance:
    """How often proposals are kept, per source (prompt lookup: the length of the match; a 3-token match is kept
    far more often than a 1-token one): kept and rejected proposal tokens, decayed per update so that about the
    last 10 count. A plain step updates it too, from the tokens it sampled against the proposal it did not feed,
    so a sequence that starts to copy is noticed while speculation is off."""

    def __init__(self):
        self.kept: dict[int, float] = {}
        self.rejected: dict[int, float] = {}

    def update(self, source: int, proposal: list[int], sampled) -> int:
        """Count a step that sampled `sampled` after a proposal's position; returns the proposals it kept."""
        n = accepted(sampled, proposal)
        self.kept[source] = DECAY * self.kept.get(source, 0.0) + n
        self.rejected[source] = DECAY * self.rejected.get(source, 0.0) + (n < min(len(proposal), len(sampled)))
        return n

    def rate(self, source: int, prior: float = PRIOR) -> float:
        """The chance a proposal of this source is kept once the one before it was; `prior` counts as one token."""
        kept = self.kept.get(source, 0.0)
        return (kept + prior) / (kept + self.rejected.get(source, 0.0) + 1.0)

    def expected_tokens(self, source: int, k: int, prior: float = PRIOR) -> float:
        """Tokens a verifying step emits with k proposals of this source, each kept at `rate` once the one before
        it was: 1 + a + ... + a^k."""
        a = self.rate(source, prior)
        return sum(a ** i for i in range(k + 1))


class Payoff:
    """Whether a step of decode rows should verify their proposals: when the tokens it expects per second beat
    plain decoding's, both timed on this engine (seconds per call, by step shape). Each option is tried before it
    is judged, and the one passed over is tried again every EXPLORE decisions so that its time stays current,
    unless it was expected at less than half the other's rate (a draft that must first catch up on a long sequence
    costs more than a try is worth).
    The choice never changes a token (`accepted`), only how fast they come."""

    def __init__(self):
        self.seconds: dict[tuple, float] = {}
        self._decisions = 0

    def record(self, shape: tuple, seconds: float) -> None:
        """A call of `shape` (tokens, rows, longest chunk, iterations) took `seconds` (compiling excluded)."""
        last = self.seconds.get(shape)
        self.seconds[shape] = seconds if last is None else (1 - SMOOTHING) * last + SMOOTHING * seconds

    def verify(self, n_rows: int, k: int, expected: list[float], iters: int, bystander: bool = False) -> bool:
        """Whether to verify: `expected` tokens per decode row (1 for a row without proposals) from a call of
        n_rows rows of k + 1 tokens, against `iters` tokens per row from a plain call. With a bystander (a request
        that does not speculate) among the rows, only if its own tokens/s stays within BYSTANDER of plain's."""
        verify = self.seconds.get((n_rows * (k + 1), n_rows, k + 1, 1))
        plain = self.seconds.get((n_rows, n_rows, 1, iters))
        if verify is None or plain is None:
            return verify is None  # time verification first, then plain decoding
        if bystander and 1 / verify < BYSTANDER * iters / plain:
            return False
        self._decisions += 1
        speculating, plainly = sum(expected) / verify, len(expected) * iters / plain  # tokens per second
        explore = self._decisions % EXPLORE == 0 and min(speculating, plainly) >= max(speculating, plainly) / 2
        return (speculating > plainly) != explore


class Speculating:
    """The engine's speculative steps, mixed into `jaxkv.serve.engine.Engine` (whose state they use: its
    speculation, draft, acceptance and payoff, pages and shapes): which decode rows propose, whether verifying
    pays, the draft model's call, and what each verification kept."""

    def _speculate(self, rows: list[tuple[EngineSequence, int]]) -> list[tuple[EngineSequence, int]]:
        """Rows with proposals fed, where the step holds decode rows only (a prompt's step is never made longer by
        them) and `Payoff` expects verifying them to beat plain decoding without slowing a request that does not
        speculate (num_speculative_tokens 0) beside them by more than 5%. Prompt lookup proposes for every decode
        row anyway (it costs nothing; the tokens sampled tell its `Acceptance` how the proposal would have fared);
        the draft model only for a step that verifies. A row that finds no pages for its proposals feeds none
        (speculation never preempts)."""
        if self.speculative is None:
            return rows
        if self.draft is None:
            for seq, _ in rows:
                if seq.decoding:
                    seq.candidate, seq.source = self._lookup(seq)
            lengths = [len(s.candidate) for s, _ in rows]
        else:
            lengths = [self._room(s) for s, _ in rows]
        if not all(s.decoding for s, _ in rows) or not any(lengths):
            return rows
        expected = [s.acceptance.expected_tokens(s.source, n, self.acceptance.rate(s.source))
                    for (s, _), n in zip(rows, lengths)]
        bystander = any(s.request.num_speculative_tokens == 0 for s, _ in rows)
        if self.speculative.adaptive and not self.payoff.verify(self._row_bucket(len(rows)), self.speculative.k,
                                                                expected, 1 if self.waiting else self.decode_iters,
                                                                bystander):
            return rows
        room = []
        for (seq, _), k in zip(rows, lengths):
            try:  # a draft writes K + 1 tokens past the last whatever the row's own k
                self._reserve(seq, seq.held + 1 + (self.speculative.k if self.draft else k))
            except OutOfPages:
                self._fit(seq, seq.held + 1)
                k = 0
            room.append(k)
        if self.draft is not None:
            self._draft([(seq, k) for (seq, _), k in zip(rows, room) if k])
        for (seq, _), k in zip(rows, room):
            seq.proposal = seq.candidate if k else []
        return [(seq, 1 + len(seq.proposal)) for seq, _ in rows]

    def _room(self, seq: EngineSequence) -> int:
        """How many tokens seq may propose: up to its request's K (default the engine's), none for a scored text
        or where its request has room for no more than the token the step samples anyway. A draft writes K + 1
        tokens: none where the context has no room for them."""
        request = seq.request
        k = self.speculative.k if request.num_speculative_tokens is None else request.num_speculative_tokens
        if request.forced_ids is not None or (self.draft is not None and seq.held + 1 + self.speculative.k >
                                              self.pages_per_seq * self.page_size):
            return 0
        return max(0, min(k, request.max_tokens - seq.generated - 1))

    def _lookup(self, seq: EngineSequence) -> tuple[list[int], int]:
        """Prompt lookup's proposal for seq and its source (the match's length)."""
        k = self._room(seq)
        return self.speculative.propose(seq.tokens, k) if k else ([], 0)

    def _draft(self, rows: list[tuple[EngineSequence, int]]) -> None:
        """The draft model's proposals (candidates) for rows (sequence, k), in block tables of the narrowest width
        that holds what it writes; timed for the payoff, with the step that verifies them."""
        if not rows:
            return
        shapes, allocator = self._shapes(), self.allocators[0]
        need = max(-(-(s.held + 1 + self.speculative.k) // self.page_size) for s, _ in rows)
        width = min(w for w in shapes.decode_widths if w >= need or w == self.pages_per_seq)
        tables = np.full((len(rows), width), allocator.num_pages, np.int32)
        for r, (seq, _) in enumerate(rows):
            pages = allocator.pages(seq.request.request_id)[:width]
            tables[r, :len(pages)] = pages
        compiled, start = self.executables.count, time.perf_counter()
        proposals = self.draft.propose(rows, tables, allocator.num_pages, shapes.tokens, self._row_bucket(len(rows)))
        self._drafting_s = time.perf_counter() - start if self.executables.count == compiled else None
        for (seq, _), proposal in zip(rows, proposals):
            seq.candidate = proposal

    def _accepted(self, seq: EngineSequence, proposal: list[int], sampled) -> int:
        """How many of seq's proposals the tokens sampled after them keep, counted in its acceptance and the
        engine's (every sequence's prior)."""
        self.acceptance.update(seq.source, proposal, sampled)
        return seq.acceptance.update(seq.source, proposal, sampled)


def sampling_positions(rows, n_rows: int, verify: int, iters: int):
    """(seeds, steps, temperature, top_k, top_p [N], forced [iters, N]) of a step's N = n_rows x verify sampled
    positions, each row's last `verify` tokens (`StepMetadata.logits_index`), for rows (sequence, tokens fed).
    A speculative row's position after its i-th fed token (from 0) draws its request's token number generated + i
    (the PRNG step plain decoding gives it). Other rows draw token number `generated` at their last position, or
    take it from forced_ids. Idle rows: greedy."""
    n = n_rows * verify
    seeds, steps, top_k = np.zeros(n, np.uint32), np.zeros(n, np.int32), np.zeros(n, np.int32)
    temperature, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
    forced = np.full((iters, n), -1, np.int32)
    for r, (seq, fed) in enumerate(rows):
        params, end = seq.request.sampling, (r + 1) * verify
        span = slice(r * verify, end)
        seeds[span], temperature[span], top_k[span], top_p[span] = (params.seed, params.temperature, params.top_k,
                                                                    params.top_p)
        steps[span] = seq.generated
        if seq.proposal:
            steps[end - fed:end] += np.arange(fed)
        given = seq.request.forced_ids or ()
        for i in range(iters):
            if seq.generated + i < len(given):
                forced[i, end - 1] = given[seq.generated + i]
    return seeds, steps, temperature, top_k, top_p, forced
