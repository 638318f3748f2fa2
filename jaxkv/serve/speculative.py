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
from typing import Any

import numpy as np

from jaxkv.errors import JaxkvError

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
