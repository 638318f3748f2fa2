"""The inference runtime: continuous batching over a paged KV cache, one ragged step per iteration.

Each `step()` packs into ONE device call the next token of every generating request (decode rows, chunks of
one token) and prompt chunks of waiting requests (earliest admitted first) up to `prefill_budget` tokens.
The call (`ragged_step`) writes their K/V into the page pool, attends through `ragged_paged_attention` and
samples each row's next token. Window layers keep only a ring of pages in a pool of their own
(`jaxkv.cache.paged.page_groups`), so their memory does not grow with the sequence. Shapes are bucketed (tokens,
and block-table width) and `warmup` compiles them all, so serving never compiles. When a step holds only decode
rows and nothing waits, it may run `decode_iters` iterations in one call, which keeps host round trips off the
critical path (`LLM.generate`). With speculative decoding (`jaxkv.serve.speculative`) such a step may instead feed
each decode row's proposed tokens, k + 1 per row, and emit those the target agrees with.

Requests are admitted when a free row and enough pages are available. When a decode row needs a page and
none is left, the latest admitted request is preempted: its pages go back and it waits at the head of the
queue, to be recomputed from its prompt and the tokens it already produced (a cached prefix makes that
cheap). A finished or aborted request frees its pages at once; its full prompt pages stay in the prefix
cache. Sampling depends only on the request's seed and the token's index, never on the batch.

One request cannot hurt another. `add` validates it completely (`requests.validate`), so nothing a client
sends can raise inside a step. If a device call still fails, the requests in it become suspects and are
retried alone: one that fails again, alone, ends with an error; the others go on. If the failed call consumed
the donated pool, a fresh one is made and every running request is recomputed. A request past its deadline
ends too.

With token eviction (`jaxkv.cache.eviction`: H2O, SnapKV) a sequence holds at most a budget of tokens per KV layer
after its prompt: once a step leaves it with more, one more device call (`compact`) keeps the best-scored ones in
its first slots and the allocator takes its pages past the budget back. It first moves off pages it shares (a
cached prefix), which stay in the prefix cache for others.

With a KIVI KV dtype (`jaxkv.cache.kivi`) a sequence's last tokens stay in float pages of its own until a step
flushes them into quantized pages; only flushed pages enter the prefix cache.
"""

from __future__ import annotations

import collections
import functools
import itertools
import time
from typing import NamedTuple

import jax
import numpy as np

from jaxkv.cache.eviction import Eviction, compact
from jaxkv.cache.kivi import Residual, flushed_after
from jaxkv.cache.pages import OutOfPages, PageAllocator, prefix_hashes
from jaxkv.cache.paged import PageGroup, PagePool, StepMetadata, page_groups, streaming_pages
from jaxkv.cache.quantize import KIVI
from jaxkv.errors import DeadlineExceeded, InvalidRequest, JaxkvError, QueueFull
from jaxkv.parallel.rules import cache_shardings
from jaxkv.serve.compiled import Executables, powers_of_two
from jaxkv.serve.draft import Draft
from jaxkv.serve.requests import Limits, Request, RequestOutput, validate
from jaxkv.serve.sequence import EngineSequence
from jaxkv.serve.speculative import Acceptance, Payoff, Speculating, Speculation, sampling_positions
from jaxkv.serve.step import ragged_step

__all__ = ["Engine", "EngineStepError", "Limits", "Request", "RequestOutput"]

MIN_TOKENS = 16  # the smallest token bucket of a step holding a prompt chunk
UNBOUNDED_CONTEXT = 2**31 - 1  # StreamingLLM: a request may run for ever


class EngineStepError(RuntimeError):
    """The engine failed while running a request (a server error, not bad input)."""


class _Shapes(NamedTuple):
    decode_rows: list[int]  # decode-only steps: T == R
    decode_widths: list[int]
    tokens: list[int]  # steps with a prompt chunk: T, with R = max_batch
    widths: list[int]


class Engine(Speculating):
    """Serves many requests on one model; single-threaded: one thread calls add, abort and step."""

    def __init__(self, llm, *, max_batch: int = 8, page_size: int = 16, num_pages: int | None = None,
                 kv_dtype: str | None = None, prefill_chunk: int = 64, prefill_budget: int | None = None,
                 prefix_caching: bool = True, max_context: int | None = None, limits: Limits | None = None,
                 decode_iters: int = 1, executables: Executables | None = None, window_pages: bool = True,
                 eviction: Eviction | None = None, speculative: Speculation | None = None):
        """max_batch: requests running at once (rows of a step). max_context caps prompt + generated tokens per
        request (default: the model's max_seq_len). num_pages: the pages of the KV layers with full tables
        (default: max_batch full-length sequences); window layers (`page_groups`) get their rings' share of as
        many full-length sequences.
        prefill_chunk: the most prompt tokens of one request in a step; prefill_budget (default 4 chunks) of all:
        more fills free rows sooner, less keeps the running requests' inter-token latency low. `limits` bounds
        what one request may cost. decode_iters: tokens per row in a call that holds only decode rows (when
        nothing waits). `executables` may be shared between engines of one model. window_pages=False gives window
        layers full tables too (their prefixes can then be cached). eviction: a token budget per sequence, kept by
        H2O or SnapKV (`jaxkv.cache.eviction.eviction_policy`). Eviction and KIVI dtypes are not for sliding
        windows or StreamingLLM, and make decode_iters 1 (a decode step may evict or flush). speculative: decode
        rows propose tokens and verify them in steps of decode rows, where that pays (`jaxkv.serve.speculative`);
        not with eviction or KIVI yet, nor a draft model with StreamingLLM."""
        cfg = llm.config
        if max_context is not None and not 1 < max_context <= cfg.max_seq_len:
            raise JaxkvError(f"max_context must be in [2, {cfg.max_seq_len}], got {max_context}")
        max_context = max_context or cfg.max_seq_len
        if page_size < 1 or page_size & (page_size - 1) or prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise JaxkvError(f"page_size and prefill_chunk must be powers of two, got {page_size} and {prefill_chunk}")
        prefill_budget = 4 * prefill_chunk if prefill_budget is None else prefill_budget
        if prefill_budget < 1 or max_batch < 1 or decode_iters < 1:
            raise JaxkvError(f"prefill_budget, max_batch and decode_iters must be at least 1, got {prefill_budget}, "
                             f"{max_batch} and {decode_iters}")
        self.cfg, self.params, self.tokenizer = cfg, llm.params, llm.tokenizer
        self.eos_ids = frozenset(llm.tokenizer.eos_ids)
        self.max_batch, self.page_size, self.prefill_chunk = max_batch, page_size, prefill_chunk
        kv_dtype = kv_dtype or cfg.dtype
        self.residual = Residual(llm.kv_recent, page_size) if kv_dtype in KIVI else None
        self.prefill_budget = prefill_budget
        self.decode_iters = 1 if eviction or self.residual else decode_iters
        self.streaming = cfg.streaming_window is not None
        self.eviction = eviction
        what = "token eviction" if eviction else f"KV dtype {kv_dtype}" if self.residual else None
        if what and (self.streaming or any(cfg.window(layer) is not None for layer in range(cfg.n_layers))):
            raise JaxkvError(f"{what} needs every layer to attend to the whole sequence: not with StreamingLLM "
                             "or sliding-window layers")
        drafting = speculative is not None and speculative.method == "draft"
        other = what or ("StreamingLLM" if self.streaming and drafting else None)
        if speculative and other:
            raise JaxkvError(f"speculative {'draft models do' if drafting else 'decoding does'} not compose with "
                             f"{other} yet")
        self.speculative, self.payoff, self.acceptance = speculative, Payoff(), Acceptance()
        verify = 1 + speculative.k if speculative else 1  # the most tokens of a row a verification step feeds
        self.pages_per_seq = (streaming_pages(cfg, page_size, verify) if self.streaming
                              else -(-max_context // page_size))
        num_pages = num_pages or max_batch * self.pages_per_seq
        most_fed = max(prefill_chunk, decode_iters, verify)  # per row and step
        self.groups = page_groups(cfg, page_size, most_fed, self.pages_per_seq, verify)
        if (not window_pages or drafting) and not self.streaming:  # a draft's KV sits at its sequence's page ids
            self.groups = (PageGroup(tuple(range(cfg.n_kv_layers))),)
        self.group_layers = tuple(g.kv_layers for g in self.groups)
        group_pages = [num_pages if self.streaming else g.pool_pages(num_pages, self.pages_per_seq)
                       for g in self.groups]
        # a ring rewrites its pages: they are never shared, nor is a prefix whose window layers lost them
        self.prefix_caching = prefix_caching and all(g.ring is None for g in self.groups)
        self.mesh = llm.mesh
        inits = []
        for group, n in zip(self.groups, group_pages):
            init = functools.partial(PagePool.init, cfg, n, page_size, max_batch, kv_dtype, len(group.kv_layers),
                                     self.pages_per_seq * page_size if eviction else 0, llm.kv_recent)
            if llm.mesh is not None:  # built in place, each device allocating only its shard of the pool
                init = jax.jit(init, out_shardings=cache_shardings(jax.eval_shape(init), llm.mesh))
            inits.append(init)
        self._new_pool = lambda: ([PageAllocator(n, page_size) for n in group_pages], tuple(i() for i in inits))
        self.allocators, self.pools = self._new_pool()
        # what one page costs in each group: every array with a pages axis (values and scales), per page
        self._page_bytes = [sum(x.nbytes // x.shape[2] for x in (p.k_pages, p.v_pages, p.k_scales, p.v_scales)
                                if x is not None) for p in self.pools]
        # KIVI: a running sequence's ring of float pages (the pool's last is scratch)
        self._ring_bytes = 0 if not self.residual else \
            self.residual.ring * sum(x.nbytes // x.shape[2] for x in (self.pools[0].k_recent, self.pools[0].v_recent))
        self.max_context = UNBOUNDED_CONTEXT if self.streaming else max_context
        self.max_prompt = cfg.streaming_window + cfg.streaming_sinks if self.streaming else max_context - 1
        self.executables = executables or Executables(llm.mesh)
        self.draft, self._drafting_s = None, 0.0
        if drafting:
            if speculative.draft is None:
                raise JaxkvError("speculative draft needs its model loaded: jaxkv.load(..., speculative="
                                 "'draft:MODEL:K') loads it")
            self.draft = Draft(speculative.draft, llm, num_pages=group_pages[0], page_size=page_size,
                               max_batch=max_batch, max_context=max_context, prefill_chunk=prefill_chunk,
                               k=speculative.k, executables=self.executables)
        self.waiting: collections.deque[EngineSequence] = collections.deque()
        self.running: list[EngineSequence | None] = [None] * max_batch  # by row
        self._by_id: dict[str, EngineSequence] = {}
        self._undelivered: list[RequestOutput] = []
        self._admissions = itertools.count(1)
        self._totals = collections.Counter()
        self._recent: collections.deque[float] = collections.deque()  # when recent tokens came, for tokens/s
        self.limits = limits or Limits()
        self._suspects: set[EngineSequence] = set()  # were in a failed device call: run alone until one passes

    # --- requests -----------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise InvalidRequest (naming the field) unless this engine can serve `request`; queues nothing."""
        validate(request, vocab_size=self.cfg.vocab_size, max_prompt=self.max_prompt, max_context=self.max_context,
                 limits=self.limits, max_speculative=self.speculative.k if self.speculative else 0)
        if request.request_id in self._by_id:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use", "request_id")
        n, budget = len(request.prompt_ids), request.max_tokens
        peak = n + budget
        if self.eviction:
            peak = self.eviction.peak(n, budget)
        for group, allocator in zip(self.groups, self.allocators):
            need = group.ring if self.streaming else self._group_pages(group, peak)
            if need > allocator.num_pages:
                raise InvalidRequest(f"the request needs {need} KV pages; the pool has {allocator.num_pages}",
                                     "max_tokens", "context_length_exceeded")

    def add(self, request: Request) -> None:
        """Queue a request, or raise (and keep nothing): InvalidRequest if it can never be served, QueueFull if
        the queue is at its limit."""
        self.check(request)
        if self.limits.max_waiting is not None and len(self.waiting) >= self.limits.max_waiting:
            self._totals["queue_full"] += 1
            raise QueueFull(f"the server's queue is full ({len(self.waiting)} requests waiting); try again shortly")
        timeout = self.limits.request_timeout_s
        seq = EngineSequence(request, self.tokenizer.decode, time.monotonic() + timeout if timeout else float("inf"))
        self._by_id[request.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a waiting or running request; its pages are freed now, its last output says "abort"."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return
        self._end(seq)
        self._undelivered.append(seq.output([], [], "", "abort"))

    def has_work(self) -> bool:
        return bool(self.waiting or self._undelivered or any(self.running))

    # --- scheduling ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: end overdue requests, admit, then one device call for every running request (decode
        rows, prompt chunks within the budget). Returns the outputs it produced. A failing device call ends only
        the request that fails alone (its output carries the error); a bug outside device calls propagates
        after `_recover`."""
        outputs, self._undelivered = self._undelivered, []
        try:
            self._step(outputs)
        except Exception:
            self._undelivered = outputs + self._undelivered  # tokens already emitted must still reach clients
            self._recover()
            raise
        return outputs

    def _recover(self) -> None:
        """The pool may be gone (a failed call consumed it): start from a fresh one (the prefix cache goes too)
        and send every running request back to the queue, to be recomputed like a preempted one."""
        for seq in sorted((s for s in self.running if s is not None), key=lambda s: s.order, reverse=True):
            seq.row = None
            seq.restart()
            self.waiting.appendleft(seq)
        self.running = [None] * self.max_batch
        self.allocators, self.pools = self._new_pool()
        if self.draft is not None:
            self.draft.reset()

    def _step(self, outputs: list[RequestOutput]) -> None:
        self._expire(outputs)
        self._admit()
        rows = self._schedule()
        clean = [(s, n) for s, n in rows if s not in self._suspects]
        if clean:
            self._run(clean, outputs)
        for seq, n in rows:  # suspects (also those just made so) alone, while the pool survives
            if seq in self._suspects and seq.row is not None and self._run([(seq, n)], outputs):
                self._suspects.discard(seq)

    def _schedule(self) -> list[tuple[EngineSequence, int]]:
        """This step's rows, (request, tokens to feed): every decode row first (making room for its token, which
        may preempt the latest admitted), then prompt chunks in admission order within the budget; then the
        decode rows' proposals (`_speculate`)."""
        running = sorted((s for s in self.running if s is not None), key=lambda s: s.order)
        budget, rows = self.prefill_budget, []
        for seq in running:
            seq.candidate, seq.proposal = [], []
            if seq.decoding and seq.row is not None and self._make_room(seq, seq.held + 1):
                rows.append((seq, 1))
        for seq in running:
            if seq.row is not None and not seq.decoding and budget > 0:
                n = min(len(seq.tokens) - seq.computed, self.prefill_chunk, budget)
                rows.append((seq, n))
                budget -= n
        return self._speculate([(s, n) for s, n in rows if s.row is not None])  # (a preempted one: not)

    def _shape(self, rows: list[tuple[EngineSequence, int]], iters: int) -> tuple[int, int, int, int]:
        """(tokens T, rows R, table width W, longest chunk Q) of a step: decode-only steps in row buckets (T == R,
        Q 1); decode rows of which some verify proposals in the same row buckets, k + 1 tokens each (T = R (k + 1),
        Q k + 1: attention costs what they feed); others in token buckets with every row (Q prefill_chunk). W is
        the narrowest width bucket holding every position written."""
        shapes = self._shapes()
        if all(n == 1 for _, n in rows) or all(s.decoding for s, _ in rows):
            longest = 1 if all(n == 1 for _, n in rows) else 1 + self.speculative.k
            n_rows = self._row_bucket(len(rows))
            n_tokens, widths = n_rows * longest, shapes.decode_widths
        else:
            n_tokens, n_rows = min(t for t in shapes.tokens if t >= sum(n for _, n in rows)), self.max_batch
            longest, widths = self.prefill_chunk, shapes.widths
        need = max(-(-(s.held + n + iters - 1) // self.page_size) for s, n in rows)
        return n_tokens, n_rows, min(w for w in widths if w >= need or w == self.pages_per_seq), longest

    def _row_bucket(self, n: int) -> int:
        """The rows of a decode step of n rows."""
        return min(r for r in self._shapes().decode_rows if r >= n)

    def _shapes(self) -> _Shapes:
        """The bucket sizes steps compile for: few, since each is an executable that warm-up compiles.
        Decode-only steps: rows in powers of two from a quarter of max_batch (at least 4: below that a step
        costs the weight reads anyway), table widths at quarters of pages_per_seq (attention reads rows x width
        pages). Steps with a prompt chunk: tokens in powers of two from 16 up to max_batch + prefill_budget
        (always more than max_batch, so a decode step's shape never doubles as one), widths at halves.
        Streaming: the ring's width alone."""
        mb, per_seq = self.max_batch, self.pages_per_seq
        top = mb + self.prefill_budget
        rows = powers_of_two(min(mb, max(4, mb // 4)), mb)
        tokens = [t for t in powers_of_two(min(MIN_TOKENS, top), top) if t > mb]
        if self.streaming:
            return _Shapes(rows, [per_seq], tokens, [per_seq])
        quarters = sorted({max(1, per_seq * i // 4) for i in range(1, 5)})
        return _Shapes(rows, quarters, tokens, sorted({max(1, per_seq // 2), per_seq}))

    def _iterations(self, rows: list[tuple[EngineSequence, int]]) -> int:
        """decode_iters when the step is decode rows only, nothing waits, every row has pages for that many
        tokens (reserved now; past a request's end they are wasted, not wrong) and no suspect is among them."""
        iters = self.decode_iters
        if iters == 1 or self.waiting or any(n > 1 or s in self._suspects for s, n in rows):
            return 1
        if self.streaming:  # the ring holds every position
            return iters
        if any(s.computed + iters > self.pages_per_seq * self.page_size for s, _ in rows):
            return 1
        try:
            for seq, _ in rows:
                self._reserve(seq, min(seq.computed + iters, seq.n_prompt + seq.request.max_tokens))
        except OutOfPages:
            return 1
        return iters

    def _run(self, rows: list[tuple[EngineSequence, int]], outputs: list[RequestOutput]) -> bool:
        """One device call for `rows`; emits the tokens sampled for the rows whose tokens are all in the cache.
        False if the call failed."""
        iters = self._iterations(rows)
        n_tokens, n_rows, width, longest = self._shape(rows, iters)
        distributions = any(s.request.distributions for s, _ in rows)
        compiled, start = self.executables.count, time.perf_counter()
        result = self._device([s for s, _ in rows], outputs, iters, distributions,
                              lambda: self._arguments(rows, n_tokens, n_rows, width, longest, iters))
        if result is None:
            return False
        if self.executables.count == compiled and self._drafting_s is not None:  # (a draft's time: the verify's)
            self.payoff.record((n_tokens, n_rows, longest, iters), time.perf_counter() - start + self._drafting_s)
        self._drafting_s = 0.0
        tokens, logprobs, log_probs = result
        width = tokens.shape[1] // n_rows  # positions sampled per row
        kept_by_row: dict[int, list[int]] = {}  # the proposals each speculative row kept
        self._totals["steps"] += 1
        self._totals["step_rows"] += len(rows)
        self._totals["step_tokens"] += sum(n for _, n in rows)
        for r, (seq, n) in enumerate(rows):
            if seq.computed < seq.n_prompt:
                self._totals["prefilled"] += min(n, seq.n_prompt - seq.computed)
            seq.computed += n
            kept = []
            if seq.proposal:  # the proposals the step kept are in the cache; the rest are not, nor pages past them
                end = (r + 1) * width
                kept = seq.proposal[:self._accepted(seq, seq.proposal, tokens[0, end - n:end])]
                seq.computed -= len(seq.proposal) - len(kept)
                self._fit(seq, seq.held)
                self._totals["proposed"] += len(seq.proposal)
                self._totals["accepted"] += len(kept)
                self._totals["verified"] += 1
            elif seq.candidate:  # what the step sampled tells whether the proposal it did not feed was right
                self._accepted(seq, seq.candidate, tokens[:, (r + 1) * width - 1])
            kept_by_row[r] = kept
            seq.draft_computed = min(seq.draft_computed, seq.computed)  # a draft's KV of rejected proposals: gone
            if self.residual:
                seq.flushed = flushed_after(seq.flushed, seq.held, self.residual.recent, self.page_size)
            if self.prefix_caching and not seq.dropped:  # (one group then, of full tables)
                cached = (seq.tokens + kept)[:seq.flushed if self.residual else seq.computed]
                for page, key in zip(self._pages(seq)[0], prefix_hashes(cached, self.page_size)):
                    self.allocators[0].register(int(page), key)
        if self.eviction:  # (iters is 1): before the outputs, which report the bytes held
            self._cut([s for s, _ in rows if s.row is not None and self.eviction.due(
                computed=s.computed, held=s.held, prefill_end=s.prefill_end, cut_before=s.dropped > 0)])
        for r, (seq, n) in enumerate(rows):
            last = (r + 1) * width - 1  # the position sampled after the row's last token
            # a speculative row: the tokens sampled after its last token and each kept proposal
            for position in range(last - n + 1, last - n + 2 + len(kept_by_row[r])) if seq.proposal else ():
                if seq.row is None:  # ended (EOS, a stop string) before the rest
                    break
                outputs.append(self._emit(seq, int(tokens[0, position]), float(logprobs[0, position]),
                                          log_probs[0, position] if seq.request.distributions else None))
            for i in range(iters) if not seq.proposal else ():
                if i:  # the token emitted last was fed back in this call, unless its request ended
                    if seq.row is None:
                        break
                    seq.computed += 1
                if seq.computed < len(seq.tokens):  # mid-prompt
                    break
                outputs.append(self._emit(seq, int(tokens[i, last]), float(logprobs[i, last]),
                                          log_probs[i, last] if seq.request.distributions else None))
        return True

    def _cut(self, seqs: list[EngineSequence]) -> None:
        """Evict down to the budget in one device call (`compact`), then give back the pages past it. A sequence
        first takes private pages where it shares one (a cached prefix); one that cannot (no free page) is cut at
        a later step."""
        budget, keep_pages = self.eviction.budget, -(-self.eviction.budget // self.page_size)
        allocator, n_rows, width = self.allocators[0], self.max_batch, self.pages_per_seq
        src, dst = (np.full((n_rows, width), allocator.num_pages, np.int32) for _ in range(2))
        rows, held = np.full(n_rows, self.max_batch, np.int32), np.zeros(n_rows, np.int32)
        cut = []
        for seq in seqs:
            before = allocator.pages(seq.request.request_id)
            try:
                after = allocator.own(seq.request.request_id, keep_pages)
            except OutOfPages:
                continue
            r = len(cut)
            src[r, :len(before)], dst[r, :len(after)] = before, after
            rows[r], held[r] = seq.row, seq.held
            cut.append(seq)
        if not cut:
            return
        kivi = None if not self.residual else self.residual.rewrite(
            src, dst, rows, held[:len(cut)], [s.flushed for s in cut], budget)
        self.pools = self.executables.run(compact, (0,), self.pools, rows, held, src, dst, kivi, policy=self.eviction)
        for r, seq in enumerate(cut):
            allocator.truncate(seq.request.request_id, budget)
            self._totals["evicted"] += seq.held - budget
            seq.dropped += seq.held - budget
            if kivi:
                seq.flushed = int(kivi[1].flushed[r])

    def _arguments(self, rows, n_tokens: int, n_rows: int, width: int, longest: int, iters: int) -> tuple:
        """The host arrays of one step: packed tokens, their metadata, the sampling values and forced tokens of
        every sampled position (each row's last token, or with speculation its last 1 + k), and LCKV passes. Block
        tables: `width` columns in groups of full tables, the ring in the others."""
        tables = [np.full((n_rows, g.ring or width), a.num_pages, np.int32)  # unreserved: the scratch page
                  for g, a in zip(self.groups, self.allocators)]
        tokens = np.zeros(n_tokens, np.int32)
        at = 0
        for r, (seq, n) in enumerate(rows):
            for table, pages in zip(tables, self._pages(seq)):
                pages = pages[:table.shape[1]]
                table[r, :len(pages)] = pages
            tokens[at:at + n] = (seq.tokens + seq.proposal)[seq.computed:seq.computed + n]
            at += n
        verify = 1 + self.speculative.k if any(s.proposal for s, _ in rows) else 1
        meta = StepMetadata.pack(tables, [s.held for s, _ in rows], [n for _, n in rows], n_tokens=n_tokens,
                                 max_q_len=longest, sink_rows=[s.row for s, _ in rows],
                                 starts=[s.computed for s, _ in rows], score_weights=None if not self.eviction else
                                 np.concatenate([self.eviction.votes(s.computed, n, s.prefill_end) for s, n in rows]),
                                 residual=self.residual, flushed=[s.flushed for s, _ in rows], verify=verify)
        sampling = sampling_positions(rows, n_rows, verify, iters)
        passes = min(max(n for _, n in rows), self.cfg.upward_passes_no_grad + self.cfg.upward_passes_grad)
        return tokens, meta, *sampling, np.int32(passes)

    def _device(self, seqs: list[EngineSequence], outputs: list[RequestOutput], iters: int, distributions: bool,
                args) -> tuple | None:
        """The step for seqs (args() builds the host arrays), its results on the host; None if anything failed.
        Then seqs become suspects, to be retried alone; a suspect that fails again, alone, ends with the error."""
        try:
            tokens, logprobs, log_probs, self.pools = self.executables.run(
                ragged_step, (1,), self.params, self.pools, *args(), cfg=self.cfg, groups=self.group_layers,
                iters=iters, distributions=distributions, mesh=self.mesh)
            return np.asarray(tokens), np.asarray(logprobs), None if log_probs is None else np.asarray(log_probs)
        except Exception as e:  # noqa: BLE001 - whatever the device raised, other requests go on
            self._totals["step_failures"] += 1
            if not self._pool_intact():
                self._recover()
            if len(seqs) == 1 and seqs[0] in self._suspects:
                self._totals["failed"] += 1
                error = EngineStepError(f"the engine failed while running this request: {type(e).__name__}: {e}")
                outputs.append(self._fail(seqs[0], error))
            else:
                self._suspects.update(seqs)
            return None

    def _pool_intact(self) -> bool:
        """Whether the pool survived a failed call: not donated away, and not the result of a failed run."""
        try:
            leaves = jax.tree.leaves(self.pools)
            if any(leaf.is_deleted() for leaf in leaves):
                return False
            jax.block_until_ready(leaves)
            return True
        except Exception:  # noqa: BLE001 - an asynchronous failure surfaces here
            return False

    def _fail(self, seq: EngineSequence, error: Exception) -> RequestOutput:
        """End seq with an error (its pages are freed now); the output tells its client why."""
        self._end(seq)
        return seq.output([], [], "", "error", error)

    def _end(self, seq: EngineSequence) -> None:
        """Forget a finished, aborted or failed request and free its row and pages (or its place in the queue)."""
        self._by_id.pop(seq.request.request_id, None)
        self._suspects.discard(seq)
        if seq.row is not None:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _expire(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for seq in [s for s in self._by_id.values() if s.deadline < now]:
            self._totals["timed_out"] += 1
            outputs.append(self._fail(seq, DeadlineExceeded(
                f"the request ran past the server's limit of {self.limits.request_timeout_s:g} s and was ended "
                f"after {seq.generated} tokens")))

    def _admit(self) -> None:
        while self.waiting and None in self.running:
            seq = self.waiting[0]
            shared = []
            if self.prefix_caching:  # leave at least the last token to compute: its logits start generation
                shared = self.allocators[0].cached_prefix(prefix_hashes(seq.tokens[:-1], self.page_size))
            idle_shared = sum(self.allocators[0].refcount(p) == 0 for p in shared)
            length = self.pages_per_seq * self.page_size if self.streaming else len(seq.tokens) + 1
            if any(self._group_pages(g, length) - len(shared) > a.free_pages - idle_shared
                   for g, a in zip(self.groups, self.allocators)):
                return
            self.waiting.popleft()
            if shared:
                self.allocators[0].share(seq.request.request_id, shared, len(shared) * self.page_size)
            self._reserve(seq, length)
            seq.computed = seq.cached_tokens = seq.flushed = len(shared) * self.page_size
            seq.prefill_end = len(seq.tokens)
            if not seq.order:  # first admission (not a recompute after preemption)
                self._totals["prompt"] += seq.n_prompt
                self._totals["cached"] += seq.cached_tokens
            seq.row, seq.order = self.running.index(None), next(self._admissions)
            self.running[seq.row] = seq

    def _make_room(self, seq: EngineSequence, length: int) -> bool:
        """Pages for seq to hold `length` tokens, preempting the latest admitted requests if needed; False if seq
        itself was."""
        while not self.streaming:
            try:
                self._reserve(seq, length)
                return True
            except OutOfPages:
                victim = max((s for s in self.running if s is not None), key=lambda s: s.order)
                self._release(victim)
                victim.restart()
                self.waiting.appendleft(victim)
                self._totals["preempted"] += 1
                if victim is seq:
                    return False
        return True

    def _group_pages(self, group, length: int) -> int:
        """Pages a sequence of `length` tokens holds in a group: its whole length, or at most the ring."""
        pages = -(-length // self.page_size)
        return pages if group.ring is None else min(pages, group.ring)

    def _reserve(self, seq: EngineSequence, length: int) -> None:
        """Pages for seq to hold `length` tokens in every group (OutOfPages if a group has too few)."""
        for group, allocator in zip(self.groups, self.allocators):
            allocator.reserve(seq.request.request_id, self._group_tokens(group, length))

    def _fit(self, seq: EngineSequence, length: int) -> None:
        """seq now holds `length` tokens: every group gives back its pages past them (StreamingLLM's ring stays
        whole: it is reserved at admission)."""
        if self.streaming:
            return
        for group, allocator in zip(self.groups, self.allocators):
            allocator.truncate(seq.request.request_id, self._group_tokens(group, length))

    def _group_tokens(self, group, length: int) -> int:
        """Tokens a sequence of `length` tokens keeps in a group's pages: all, or what its ring holds."""
        return min(length, self._group_pages(group, length) * self.page_size)

    def _release(self, seq: EngineSequence) -> None:
        for allocator in self.allocators:
            if allocator.holds(seq.request.request_id):
                allocator.release(seq.request.request_id)
        self.running[seq.row], seq.row = None, None

    def _pages(self, seq: EngineSequence) -> list[list[int]]:
        """seq's pages in every group."""
        return [allocator.pages(seq.request.request_id) for allocator in self.allocators]

    def _emit(self, seq: EngineSequence, token: int, logprob: float, log_probs: np.ndarray | None) -> RequestOutput:
        """Append a sampled (or forced) token; finish the request on EOS, a stop string or its budget."""
        seq.tokens.append(token)
        self._totals["generated"] += 1
        self._recent.append(time.perf_counter())
        request = seq.request
        eos = token in self.eos_ids and not request.ignore_eos and request.forced_ids is None
        text = seq.text.add([] if eos else [token], final=eos or seq.generated >= request.max_tokens)
        reason = "stop" if eos or seq.text.stopped else "length" if seq.generated >= request.max_tokens else None
        held = self.kv_bytes_held(request.request_id)
        if reason:
            self._end(seq)
        out = seq.output([token], [logprob], text, reason)
        out.kv_bytes, out.distributions = held, None if log_probs is None else log_probs[None]
        return out

    def kv_bytes_held(self, request_id: str) -> int:
        """Bytes of KV pages (with their scales) that a request holds now, over every page group, and its ring of
        float pages (KIVI) while it runs."""
        holders = [(a, page_bytes) for a, page_bytes in zip(self.allocators, self._page_bytes) if a.holds(request_id)]
        return sum(len(a.pages(request_id)) * page_bytes for a, page_bytes in holders) + \
            (self._ring_bytes if holders else 0)

    # --- compilation --------------------------------------------------------------------------
    def warmup(self) -> None:
        """Compile every step shape now, writing nothing (idle rows), so that serving never compiles."""
        shapes, verify = self._shapes(), 1 + self.speculative.k if self.speculative else 1
        decode = [(r, r, w, 1) for r in shapes.decode_rows for w in shapes.decode_widths]
        chunks = [(t, self.max_batch, w, self.prefill_chunk) for t in shapes.tokens for w in shapes.widths]
        every = [(*shape, 1) for shape in decode + chunks]  # (tokens, rows, width, longest chunk, verify)
        if self.speculative:  # decode rows verifying proposals
            every += [(r * verify, r, w, verify, verify) for r, _, w, _ in decode]
        for n_tokens, n_rows, width, longest, verify in every:
            tables = [np.zeros((n_rows, g.ring or width), np.int32) for g in self.groups]
            meta = StepMetadata.pack(tables, [], [], n_tokens=n_tokens, max_q_len=longest,
                                     sink_rows=[], score_weights=np.zeros(0) if self.eviction else None,
                                     residual=self.residual, verify=verify)
            _, _, _, self.pools = self.executables.run(
                ragged_step, (1,), self.params, self.pools, np.zeros(n_tokens, np.int32), meta,
                *sampling_positions([], n_rows, verify, 1), np.int32(1), cfg=self.cfg, groups=self.group_layers,
                iters=1, distributions=False, mesh=self.mesh)
        if self.draft is not None:
            self.draft.warmup(shapes.decode_rows, shapes.tokens, shapes.decode_widths, self.allocators[0].num_pages)
        if self.eviction:  # held 0 everywhere: cuts nothing
            idle = np.zeros(self.max_batch, np.int32)
            tables = np.zeros((self.max_batch, self.pages_per_seq), np.int32)
            kivi = None if not self.residual else self.residual.rewrite(tables, tables, idle + self.max_batch, [],
                                                                         [], self.eviction.budget)
            self.pools = self.executables.run(compact, (0,), self.pools, idle + self.max_batch, idle, tables, tables,
                                              kivi, policy=self.eviction)

    # --- metrics ------------------------------------------------------------------------------
    def metrics(self) -> dict:
        stats = [allocator.stats() for allocator in self.allocators]
        now = time.perf_counter()
        while self._recent and now - self._recent[0] > 10.0:
            self._recent.popleft()
        span = now - self._recent[0] if len(self._recent) > 1 else 0.0
        steps = self._totals["steps"]
        return {
            "running": sum(s is not None for s in self.running), "waiting": len(self.waiting),
            "kv_pages_used": sum(s.used for s in stats), "kv_pages_free": sum(s.free for s in stats),
            "kv_pages_total": sum(s.total for s in stats), "kv_pages_cached": sum(s.cached for s in stats),
            "prefix_cache_hit_rate": self._totals["cached"] / self._totals["prompt"] if self._totals["prompt"] else 0.0,
            "prompt_tokens_total": self._totals["prompt"], "prefilled_tokens_total": self._totals["prefilled"],
            "cached_tokens_total": self._totals["cached"],
            "generation_tokens_total": self._totals["generated"], "preemptions_total": self._totals["preempted"],
            "step_failures_total": self._totals["step_failures"], "requests_failed_total": self._totals["failed"],
            "requests_timed_out_total": self._totals["timed_out"], "queue_full_total": self._totals["queue_full"],
            "kv_tokens_evicted_total": self._totals["evicted"],
            "speculative_proposed_total": self._totals["proposed"],
            "speculative_accepted_total": self._totals["accepted"],
            "speculative_verified_rows_total": self._totals["verified"],
            "speculative_acceptance_rate": self._totals["accepted"] / self._totals["proposed"]
            if self._totals["proposed"] else 0.0,
            # tokens a verifying row emits per step: its kept proposals and the token after them
            "speculative_tokens_per_verify": 1 + self._totals["accepted"] / self._totals["verified"]
            if self._totals["verified"] else 0.0,
            "steps_total": steps, "mean_rows_per_step": self._totals["step_rows"] / steps if steps else 0.0,
            "mean_tokens_per_step": self._totals["step_tokens"] / steps if steps else 0.0,
            "tokens_per_s": (len(self._recent) - 1) / span if span > 0 else 0.0,
            "compilations": self.executables.count,
        }
