"""Perplexity of a text through the serving runtime, so that whatever compresses the KV cache acts as it does
when serving, and what it costs in quality is measured where it is paid.

The text is cut into windows of `context` tokens. Each window is one engine request: its first `prefill` tokens
are the prompt (prefilled in chunks), the rest are fed one per step as decoding feeds sampled tokens
(`Request.forced_ids`), and each of them is scored by the log-probability the model gave it. With a reference
model (the same weights with float32 KV and nothing dropped), both engines run the same requests in lockstep and
every scored position also yields the top-1 agreement and KL(reference || model) of the two distributions.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from jaxkv.errors import JaxkvError
from jaxkv.serve.engine import Engine
from jaxkv.serve.requests import Limits, Request


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    tokens: int  # scored tokens
    windows: int
    context: int
    prefill: int
    kv_dtype: str
    kv_bytes_per_token: int  # the formula jaxkv plans with (scales included)
    kv_bytes_held: float  # pages a window's request held at its last token, in bytes (mean over windows)
    eviction: str | None  # e.g. "h2o budget 256 window 128"
    reference_ppl: float | None = None
    top1_agreement: float | None = None  # fraction of positions whose argmax equals the reference's
    mean_kl: float | None = None  # mean KL(reference || model) in nats

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_context(context: int) -> None:
    if context < 2:
        raise JaxkvError(f"context must be at least 2 tokens, got {context}")


def windows_of(ids: Sequence[int], context: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `context` tokens (a text shorter than one window is one window)."""
    check_context(context)
    if len(ids) < 2:
        raise JaxkvError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    out = [list(ids[i:i + context]) for i in range(0, len(ids) - context + 1, context)] or [list(ids)]
    return out[:max_windows] if max_windows else out


def _engine(llm, n_windows: int, length: int, batch: int) -> Engine:
    return Engine(llm, max_batch=max(1, min(batch, n_windows)), page_size=llm.page_size, kv_dtype=llm.kv_dtype,
                  max_context=min(llm.config.max_seq_len, length + 1), prefill_chunk=64, prefix_caching=False,
                  limits=Limits(max_waiting=None, request_timeout_s=None), executables=llm.executables,
                  eviction=llm.eviction)


@dataclasses.dataclass
class Recorded:
    """A reference run's log-probability distributions at every scored position, kept so that several
    configurations compare against one run of the reference instead of rerunning it beside each (`record`)."""

    ppl: float
    windows: tuple[int, int, int]  # (number of windows, context, prefill) it was recorded on
    distributions: dict[tuple[str, int], np.ndarray]  # (request id, scored index) -> log-probabilities


def _windows(llm, ids: Sequence[int], context: int, prefill: int | None, max_windows: int | None):
    if not llm.config.streaming_window and context > llm.config.max_seq_len:
        raise JaxkvError(f"context {context} is longer than the model's {llm.config.max_seq_len} tokens")
    windows = windows_of(ids, context, max_windows)
    length = len(windows[0])
    cfg = llm.config
    streamed = cfg.streaming_window + cfg.streaming_sinks if cfg.streaming_window else length
    prefill = min(length // 2, streamed) if prefill is None else prefill
    if not 1 <= prefill < length:
        raise JaxkvError(f"prefill must be in [1, {length - 1}] for windows of {length} tokens, got {prefill}")
    if prefill > streamed:  # StreamingLLM's positions are right token by token: its prompts fit the window
        raise JaxkvError(f"with a streaming window of {cfg.streaming_window} and {cfg.streaming_sinks} sinks at most "
                         f"{streamed} tokens are prefilled (the rest are fed one by one), got prefill {prefill}")
    return windows, length, prefill


def record(reference, ids: Sequence[int], *, context: int = 1024, prefill: int | None = None, batch: int = 8,
           max_windows: int | None = None, progress: bool = True) -> Recorded:
    """Run `reference` (an LLM) over the windows `perplexity` would score and keep its distributions: pass the
    result as perplexity's `reference` for each configuration compared with it."""
    windows, length, prefill = _windows(reference, ids, context, prefill, max_windows)
    nll, _, distributions = _scored([reference], windows, length, prefill, batch, progress, keep=True)
    return Recorded(math.exp(nll[0] / (len(windows) * (length - prefill))), (len(windows), length, prefill),
                    distributions)


def perplexity(llm, ids: Sequence[int], *, context: int = 1024, prefill: int | None = None, batch: int = 8,
               reference=None, max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of token ids under `llm` (a jaxkv.LLM) through the engine; `prefill` (default half the window;
    StreamingLLM: at most its window and sinks) tokens of each window are the prompt, the rest are scored token by
    token. `reference`: an LLM with the same weights and uncompressed KV, run in lockstep, or a `Recorded` run of
    one, for top-1 agreement and KL."""
    windows, length, prefill = _windows(llm, ids, context, prefill, max_windows)
    n = len(windows) * (length - prefill)
    recorded = reference if isinstance(reference, Recorded) else None
    if recorded is not None and recorded.windows != (len(windows), length, prefill):
        raise JaxkvError(f"the recorded reference ran (windows, context, prefill) = {recorded.windows}, not "
                         f"{(len(windows), length, prefill)}")
    runs = [llm] + ([reference] if reference is not None and recorded is None else [])
    comparison = _Comparison(None if recorded is None else recorded.distributions)
    nll, held, _ = _scored(runs, windows, length, prefill, batch, progress,
                           compare=comparison if reference is not None else None)
    reference_ppl = recorded.ppl if recorded is not None else math.exp(nll[1] / n) if reference is not None else None
    return PerplexityResult(
        ppl=math.exp(nll[0] / n), tokens=n, windows=len(windows), context=length, prefill=prefill,
        kv_dtype=llm.kv_dtype, kv_bytes_per_token=llm.kv_bytes_per_token,
        kv_bytes_held=sum(held.values()) / len(held),
        eviction=None if llm.eviction is None else
        f"{llm.eviction.method} budget {llm.eviction.budget} window {llm.eviction.window}"
        + (f" sinks {llm.eviction.sinks}" if llm.eviction.sinks else ""),
        reference_ppl=reference_ppl, top1_agreement=comparison.agreement, mean_kl=comparison.mean_kl)


class _Comparison:
    """Top-1 agreement and KL(reference || model) over the positions both runs (0: the model, 1: the reference)
    have scored; a position waits here until the other run has it too."""

    def __init__(self, recorded: dict | None = None):
        self.pending = [{}, dict(recorded or {})]
        self.kl, self.agree, self.scored = 0.0, 0, 0

    def add(self, run: int, key: tuple[str, int], dist: np.ndarray) -> None:
        other = self.pending[1 - run].pop(key, None)
        if other is None:
            self.pending[run][key] = dist
            return
        model, ref = (dist, other) if run == 0 else (other, dist)
        self.kl += float(np.sum(np.exp(ref) * (ref - model)))
        self.agree += int(np.argmax(model) == np.argmax(ref))
        self.scored += 1

    @property
    def agreement(self) -> float | None:
        return self.agree / self.scored if self.scored else None

    @property
    def mean_kl(self) -> float | None:
        return self.kl / self.scored if self.scored else None


def _scored(runs, windows, length: int, prefill: int, batch: int, progress: bool, *, compare=None,
            keep: bool = False):
    """Every run's engine over the windows, stepped in lockstep: the runs' summed negative log-probabilities, and
    the first run's bytes held per request, and (with keep) its distributions by (request, scored index)."""
    engines = [_engine(m, len(windows), length, batch) for m in runs]
    for engine in engines:
        for i, window in enumerate(windows):
            engine.add(Request(window[:prefill], max_tokens=length - prefill, forced_ids=window[prefill:],
                               logprobs=True, distributions=compare is not None or keep, request_id=str(i)))
    nll = [0.0] * len(runs)
    held: dict[str, int] = {}
    kept: dict[tuple[str, int], np.ndarray] = {}
    counts = [collections.Counter() for _ in runs]  # distributions seen per request, per run
    with tqdm(total=len(windows) * (length - prefill), unit="tok", desc="perplexity", disable=not progress) as bar:
        while any(e.has_work() for e in engines):
            for r, engine in enumerate(engines):
                for out in engine.step() if engine.has_work() else ():
                    if out.error is not None:
                        raise out.error
                    nll[r] -= sum(out.logprobs)
                    if r == 0:
                        held[out.request_id] = out.kv_bytes
                        bar.update(len(out.token_ids))
                    for dist in () if out.distributions is None else out.distributions:
                        key = (out.request_id, counts[r][out.request_id])
                        counts[r][out.request_id] += 1
                        if keep:
                            kept[key] = dist
                        elif compare is not None:
                            compare.add(r, key, dist)
    return nll, held, kept
