"""Speculative decoding: proposals for the next tokens of a sequence, verified by the target in one ragged step.

A decode row that speculates feeds its last token and k proposed ones as one chunk; the step samples a token at
each of them (`jaxkv.generate.sampling.sample` with `draft`: a proposal is kept with the probability the target
gives it, else replaced by a draw from the rest), and the engine emits the kept prefix and the token after it.
The K/V written for the proposals past the first rejected one is never read: the sequence's length goes back.

Proposers: `ngram` (prompt lookup, Saxena 2023): the longest suffix of the sequence, of n down to 1 tokens,
found earlier in it, and the k tokens that followed its latest occurrence. It needs no model and shines when the
output copies its context (summaries with quotes, edits, code).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxkv.errors import JaxkvError

METHODS = ("ngram",)
NGRAM_MAX = 3  # the longest suffix prompt lookup matches


@dataclasses.dataclass(frozen=True)
class Speculation:
    """method: the proposer; k: tokens proposed per step (at most)."""

    method: str
    k: int

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens proposed to follow `tokens`; none when nothing matches."""
        return ngram_proposal(tokens, k)


def speculation(spec: str | None) -> Speculation | None:
    """The policy of --speculative ngram:K, or one clear error line (the engine checks that a step can feed a
    row K + 1 tokens)."""
    if spec is None:
        return None
    method, _, k = str(spec).partition(":")
    if method not in METHODS:
        raise JaxkvError(f"speculative must be one of {', '.join(f'{m}:K' for m in METHODS)}, got {spec!r}")
    if not k.isdigit() or int(k) < 1:
        raise JaxkvError(f"speculative {method} needs K, the tokens proposed per step, an integer >= 1: got {spec!r}")
    return Speculation(method, int(k))


def ngram_proposal(tokens: list[int], k: int, n_max: int = NGRAM_MAX) -> list[int]:
    """Prompt lookup: for n from n_max down to 1, the latest earlier occurrence of the last n tokens, and up to k
    tokens that followed it."""
    seq = np.asarray(tokens)
    for n in range(min(n_max, len(seq) - 1), 0, -1):
        suffix = seq[-n:]
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(seq[:-1], n) == suffix, axis=1))
        if len(starts):
            start = starts[-1] + n
            return [int(t) for t in seq[start:start + k]]
    return []


def accepted(sampled, proposal: list[int]) -> int:
    """How many proposals a step kept: sampled[i], drawn after the row's i-th fed token, is proposal[i] exactly
    when that proposal was kept (`jaxkv.generate.sampling.sample`), and the first that was not ends the run."""
    n = 0
    while n < len(proposal) and int(sampled[n]) == proposal[n]:
        n += 1
    return n


def sampling_positions(rows, n_rows: int, verify: int, iters: int):
    """(seeds, steps, temperature, top_k, top_p [N], forced [iters, N], draft [N]) of a step's N = n_rows x verify
    sampled positions, each row's last `verify` tokens (`StepMetadata.logits_index`), for rows (sequence, tokens
    fed). A speculative row's position after its i-th fed token draws its request's token number generated + i
    (the PRNG step) against draft: the proposal fed next. Other rows draw token number `generated` at their last
    position, or take it from forced_ids. Idle rows: greedy."""
    n = n_rows * verify
    seeds, steps, top_k = np.zeros(n, np.uint32), np.zeros(n, np.int32), np.zeros(n, np.int32)
    temperature, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
    forced, draft = np.full((iters, n), -1, np.int32), np.full(n, -1, np.int32)
    for r, (seq, fed) in enumerate(rows):
        params, end = seq.request.sampling, (r + 1) * verify
        span = slice(r * verify, end)
        seeds[span], temperature[span], top_k[span], top_p[span] = (params.seed, params.temperature, params.top_k,
                                                                    params.top_p)
        steps[span] = seq.generated
        if seq.proposal:
            steps[end - fed:end] += np.arange(fed)
            draft[end - fed:end - 1] = seq.proposal
        given = seq.request.forced_ids or ()
        for i in range(iters):
            if seq.generated + i < len(given):
                forced[i, end - 1] = given[seq.generated + i]
    return seeds, steps, temperature, top_k, top_p, forced, draft
