"""The serving engine: continuous batching over the paged KV cache, with chunked prefill and prefix caching.

A fixed number of decode slots is served by executables compiled once (`warmup`). Each `step()` prefills
up to `prefill_budget` prompt tokens (earliest admitted requests first, in chunks whose lengths are
bucketed to powers of two) and then runs one decode step for every slot that is generating, so new
arrivals never starve running requests. Decode packs the generating slots into the first rows of a batch
bucketed to a power of two, with block tables cut to the widest sequence's pages (bucketed too): a step
costs what is in flight, not max_batch x max_context. Requests are admitted when a slot and enough pages
are free. When a decode step needs a page and none is left, the
latest admitted request is preempted: its pages go back and it waits at the head of the queue, to be
recomputed from its prompt and the tokens it already produced (a cached prefix makes that cheap). A
finished or aborted request frees its pages at once; its full prompt pages stay in the prefix cache.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.pages import OutOfPages, PageAllocator, prefix_hashes
from jaxkv.cache.paged import PagedKVCache, streaming_pages
from jaxkv.errors import JaxkvError
from jaxkv.generate.generator import Executables, bucket
from jaxkv.generate.sampling import SamplingParams, sample
from jaxkv.model.decoder import forward
from jaxkv.parallel.rules import cache_shardings, keep_cache_sharding
from jaxkv.serve.detokenize import TextStream

MIN_CHUNK = 16
UNBOUNDED_CONTEXT = 2**31 - 1  # StreamingLLM: a request may run for ever


@dataclasses.dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{uuid.uuid4().hex[:16]}")


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since this request's previous output (whole characters only)
    token_ids: list[int]  # new token ids
    logprobs: list[float] | None  # of each new token, when the request asked
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int  # so far
    cached_tokens: int  # prompt tokens taken from the prefix cache


class _Sequence:
    """A request inside the engine: its tokens (prompt, then generated) and how many are in the cache."""

    def __init__(self, request: Request, decode):
        self.request = request
        self.tokens = list(request.prompt_ids)
        self.n_prompt = len(self.tokens)
        self.computed = 0  # tokens whose K/V is in the cache
        self.prefilled = False  # all tokens computed and the next one sampled
        self.slot: int | None = None
        self.order = 0  # admission order: the latest admitted is preempted first
        self.cached_tokens = 0
        self.text = TextStream(decode, request.stop)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def output(self, token_ids, logprobs, text: str, reason: str | None) -> RequestOutput:
        return RequestOutput(self.request.request_id, text, list(token_ids),
                             logprobs if self.request.logprobs else None, reason is not None, reason,
                             self.n_prompt, self.generated, self.cached_tokens)


class Engine:
    """Serves many requests on one model; single-threaded: one thread calls add, abort and step."""

    def __init__(self, llm, *, max_batch: int = 8, page_size: int = 16, num_pages: int | None = None,
                 kv_dtype: str | None = None, prefill_chunk: int = 64, prefill_budget: int | None = None,
                 prefix_caching: bool = True, max_context: int | None = None):
        """max_context caps prompt + generated tokens per request (default: the model's max_seq_len).
        num_pages defaults to max_batch full-length sequences. prefill_budget (default 4 chunks) caps the
        prompt tokens prefilled per step: more fills free slots sooner, less keeps the running requests'
        inter-token latency low."""
        cfg = llm.config
        if max_context is not None and not 1 < max_context <= cfg.max_seq_len:
            raise JaxkvError(f"max_context must be in [2, {cfg.max_seq_len}], got {max_context}")
        max_context = max_context or cfg.max_seq_len
        if page_size < 1 or page_size & (page_size - 1) or prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise JaxkvError(f"page_size and prefill_chunk must be powers of two, got {page_size} and {prefill_chunk}")
        prefill_budget = 4 * prefill_chunk if prefill_budget is None else prefill_budget
        if prefill_budget < 1:
            raise JaxkvError(f"prefill_budget must be at least 1, got {prefill_budget}")
        self.cfg, self.params, self.tokenizer = cfg, llm.params, llm.tokenizer
        self.eos_ids = frozenset(llm.tokenizer.eos_ids)
        self.max_batch, self.page_size, self.prefill_chunk = max_batch, page_size, prefill_chunk
        self.prefill_budget = prefill_budget
        self.streaming = cfg.streaming_window is not None
        self.pages_per_seq = streaming_pages(cfg, page_size) if self.streaming else -(-max_context // page_size)
        num_pages = num_pages or max_batch * self.pages_per_seq
        self.prefix_caching = prefix_caching and not self.streaming  # the ring rewrites pages: never share them
        init = functools.partial(PagedKVCache.init, cfg, max_batch, num_pages, page_size, self.pages_per_seq, kv_dtype)
        if llm.mesh is not None:  # built in place, each device allocating only its shard of the pools
            init = jax.jit(init, out_shardings=cache_shardings(jax.eval_shape(init), llm.mesh))
        self._new_pool = lambda: (PageAllocator(num_pages, page_size), init())
        self.allocator, self.cache = self._new_pool()
        self.max_context = UNBOUNDED_CONTEXT if self.streaming else max_context
        self.max_prompt = cfg.streaming_window + cfg.streaming_sinks if self.streaming else max_context - 1
        self.executables = Executables(llm.mesh)
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.slots: list[_Sequence | None] = [None] * max_batch
        self._by_id: dict[str, _Sequence] = {}
        self._undelivered: list[RequestOutput] = []
        self._admissions = itertools.count(1)
        self._totals = collections.Counter()
        self._recent: collections.deque[float] = collections.deque()  # when recent tokens came, for tokens/s

    # --- requests -----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request, or raise JaxkvError (and keep nothing) if it can never be served."""
        n, budget = len(request.prompt_ids), request.max_tokens
        if request.request_id in self._by_id:
            raise JaxkvError(f"request id {request.request_id!r} is already in use")
        if n == 0:
            raise JaxkvError("the prompt is empty")
        if n > self.max_prompt:
            raise JaxkvError(f"the prompt has {n} tokens; this model takes at most {self.max_prompt}")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise JaxkvError(f"max_tokens must be a positive integer, got {budget!r}")
        if n + budget > self.max_context:
            raise JaxkvError(f"prompt ({n} tokens) + max_tokens ({budget}) exceeds the context of "
                             f"{self.max_context} tokens")
        if any(not 0 <= t < self.cfg.vocab_size for t in request.prompt_ids):
            raise JaxkvError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        need = self.pages_per_seq if self.streaming else self.allocator.pages_for(n + budget)
        if need > self.allocator.num_pages:
            raise JaxkvError(f"the request needs {need} KV pages; the pool has {self.allocator.num_pages}")
        seq = _Sequence(request, self.tokenizer.decode)
        self._by_id[request.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a waiting or running request; its pages are freed now, its last output says "abort"."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return
        if seq.slot is None:
            self.waiting.remove(seq)
        else:
            self._evict(seq)
        self._undelivered.append(seq.output([], [], "", "abort"))

    def has_work(self) -> bool:
        return bool(self.waiting or self._undelivered or any(self.slots))

    # --- scheduling ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: admit, prefill chunks (up to the budget), one decode step. Returns the outputs it produced.
        If a device call fails, the error propagates after `_recover` has made the engine usable again."""
        outputs, self._undelivered = self._undelivered, []
        try:
            self._step(outputs)
        except Exception:
            self._undelivered = outputs + self._undelivered  # tokens already emitted must still reach clients
            self._recover()
            raise
        return outputs

    def _recover(self) -> None:
        """A failed device call may have consumed the donated cache: start from fresh pools (the prefix cache
        goes too) and send every running request back to the queue, to be recomputed like a preempted one."""
        for seq in sorted((s for s in self.slots if s is not None), key=lambda s: s.order, reverse=True):
            seq.slot, seq.computed, seq.prefilled = None, 0, False
            self.waiting.appendleft(seq)
        self.slots = [None] * self.max_batch
        self.allocator, self.cache = self._new_pool()

    def _step(self, outputs: list[RequestOutput]) -> None:
        self._admit()
        budget = self.prefill_budget
        for seq in sorted((s for s in self.slots if s is not None and not s.prefilled), key=lambda s: s.order):
            while budget > 0 and not seq.prefilled:
                budget -= self._prefill(seq, budget, outputs)
        decoding = sorted((s for s in self.slots if s is not None and s.prefilled), key=lambda s: s.order)
        decoding = [s for s in decoding if s.slot is not None and self._make_room(s)]  # (preempted ones: not)
        if decoding:
            outputs += self._decode(decoding)

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            seq = self.waiting[0]
            shared = []
            if self.prefix_caching:  # leave at least the last token to compute: its logits start generation
                shared = self.allocator.cached_prefix(prefix_hashes(seq.tokens[:-1], self.page_size))
            idle_shared = sum(self.allocator.refcount(p) == 0 for p in shared)
            length = self.pages_per_seq * self.page_size if self.streaming else len(seq.tokens) + 1
            if self.allocator.pages_for(length) - len(shared) > self.allocator.free_pages - idle_shared:
                return
            self.waiting.popleft()
            sid = seq.request.request_id
            if shared:
                self.allocator.share(sid, shared, len(shared) * self.page_size)
            self.allocator.reserve(sid, length)
            seq.computed = seq.cached_tokens = len(shared) * self.page_size
            if not seq.order:  # first admission (not a recompute after preemption)
                self._totals["prompt"] += seq.n_prompt
                self._totals["cached"] += seq.cached_tokens
            seq.slot, seq.order = self.slots.index(None), next(self._admissions)
            self.slots[seq.slot] = seq

    def _make_room(self, seq: _Sequence) -> bool:
        """Pages for seq's next token, preempting the latest admitted requests if needed; False if seq itself was."""
        while not self.streaming:
            try:
                self.allocator.reserve(seq.request.request_id, seq.computed + 1)
                return True
            except OutOfPages:
                victim = max((s for s in self.slots if s is not None), key=lambda s: s.order)
                self._evict(victim)
                victim.computed, victim.prefilled = 0, False
                self.waiting.appendleft(victim)
                self._totals["preempted"] += 1
                if victim is seq:
                    return False
        return True

    def _evict(self, seq: _Sequence) -> None:
        self.allocator.release(seq.request.request_id)
        self.slots[seq.slot], seq.slot = None, None

    def _table_row(self, seq: _Sequence) -> np.ndarray:
        return self.allocator.block_table([seq.request.request_id], self.pages_per_seq)[0]

    def _sampling_args(self, seqs):
        params = [s.request.sampling for s in seqs]
        return (np.asarray([p.seed for p in params], np.uint32), np.asarray([s.generated for s in seqs], np.int32),
                np.asarray([p.temperature for p in params], np.float32), np.asarray([p.top_k for p in params], np.int32),
                np.asarray([p.top_p for p in params], np.float32))

    def _prefill(self, seq: _Sequence, limit: int, outputs: list[RequestOutput]) -> int:
        """One chunk of seq's uncomputed tokens, at most `limit`; the first token's output once all are in.
        Returns the number of tokens prefilled."""
        n = min(len(seq.tokens) - seq.computed, self.prefill_chunk, limit)
        tokens = np.zeros(bucket(n, MIN_CHUNK, self.prefill_chunk), np.int32)
        tokens[:n] = seq.tokens[seq.computed:seq.computed + n]
        token, logprob, self.cache = self.executables.run(
            self._prefill_chunk, (1,), self.params, self.cache, np.asarray([seq.slot], np.int32),
            self._table_row(seq)[None], np.int32(seq.computed), tokens, np.int32(n), *self._sampling_args([seq]))
        seq.computed += n
        self._totals["prefilled"] += n
        if self.prefix_caching:
            pages = self._table_row(seq)
            for page, key in zip(pages, prefix_hashes(seq.tokens[:seq.computed], self.page_size)):
                self.allocator.register(int(page), key)
        if seq.computed == len(seq.tokens):
            seq.prefilled = True
            outputs.append(self._emit(seq, int(token), float(logprob)))
        return n

    def _decode_shapes(self) -> tuple[list[int], list[int]]:
        """The batch sizes and block-table widths decode compiles for: powers of two up to max_batch (from an
        eighth of it, at least 4: below that a step costs the weight reads anyway) and up to pages_per_seq
        (from an eighth, and three quarters of it: attention reads rows x width pages, and the widest
        sequence in flight is usually past half the context; the ring's width alone if streaming)."""
        rows = _powers_of_two(min(self.max_batch, max(4, self.max_batch // 8)), self.max_batch)
        if self.streaming:
            return rows, [self.pages_per_seq]
        widths = _powers_of_two(max(1, self.pages_per_seq // 8), self.pages_per_seq)
        return rows, sorted(set(widths + [max(widths[0], 3 * self.pages_per_seq // 4)]))

    def _decode(self, seqs: list[_Sequence]) -> list[RequestOutput]:
        """One token for each of seqs, packed into the first rows of the batch; the other rows are idle and
        stand for distinct other slots (so that writing back their unchanged streaming state is harmless)."""
        rows_options, width_options = self._decode_shapes()
        rows = min(r for r in rows_options if r >= len(seqs))
        need = max(self.allocator.pages_for(s.computed + 1) for s in seqs)
        width = min(w for w in width_options if w >= need or w == self.pages_per_seq)
        busy = {s.slot for s in seqs}
        slots = [s.slot for s in seqs] + [i for i in range(self.max_batch) if i not in busy][:rows - len(seqs)]
        tables = np.zeros((rows, width), np.int32)
        lengths, tokens, active = (np.zeros(rows, np.int32) for _ in range(3))
        for i, seq in enumerate(seqs):
            tables[i], lengths[i], tokens[i], active[i] = self._table_row(seq)[:width], seq.computed, seq.tokens[-1], 1
        sampling = [np.pad(part, (0, rows - len(seqs))) for part in self._sampling_args(seqs)]  # idle rows: greedy
        next_tokens, logprobs, self.cache = self.executables.run(
            self._decode_step, (1,), self.params, self.cache, np.asarray(slots, np.int32), tables, lengths, tokens,
            active, *sampling)
        next_tokens, logprobs = np.asarray(next_tokens), np.asarray(logprobs)
        outputs = []
        for i, seq in enumerate(seqs):
            seq.computed += 1
            outputs.append(self._emit(seq, int(next_tokens[i]), float(logprobs[i])))
        return outputs

    def _emit(self, seq: _Sequence, token: int, logprob: float) -> RequestOutput:
        """Append a sampled token; finish the request on EOS, a stop string or its budget."""
        seq.tokens.append(token)
        self._totals["generated"] += 1
        self._recent.append(time.perf_counter())
        eos = token in self.eos_ids and not seq.request.ignore_eos
        text = seq.text.add([] if eos else [token], final=eos or seq.generated >= seq.request.max_tokens)
        reason = "stop" if eos or seq.text.stopped else "length" if seq.generated >= seq.request.max_tokens else None
        if reason:
            self._by_id.pop(seq.request.request_id, None)
            self._evict(seq)
        return seq.output([token], [logprob], text, reason)

    # --- device functions ---------------------------------------------------------------------
    def _sample(self, logits, seeds, steps, temperature, top_k, top_p):
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds, steps)
        token = sample(logits, keys, temperature, top_k, top_p, greedy=False)
        return token, jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]

    @staticmethod
    def _rows(cache, slots, tables, lengths):
        """The cache as the batch `slots` (distinct) sees it: the shared pools, the given tables and lengths."""
        return cache.replace(block_tables=tables, lengths=lengths,
                             sink_keys=None if cache.sink_keys is None else cache.sink_keys[:, slots])

    def _merge(self, cache, rows, slots):
        """Back from `_rows`: the pools and the slots' streaming state; the host keeps tables and lengths.
        On a mesh the pools keep the rules' sharding, so every step runs the same executable."""
        return keep_cache_sharding(rows.replace(
            block_tables=cache.block_tables, lengths=cache.lengths,
            sink_keys=None if cache.sink_keys is None else cache.sink_keys.at[:, slots].set(rows.sink_keys)),
            self.executables.mesh)

    def _prefill_chunk(self, params, cache, slots, table, start, tokens, n_new, seed, step, temperature, top_k,
                       top_p):
        """One chunk of one sequence (slots [1], table [1, P]), appended after `start` cached tokens."""
        logits, rows = forward(self.cfg, params, tokens[None], self._rows(cache, slots, table, start[None]),
                               n_new[None])
        token, logprob = self._sample(logits[:, 0], seed, step, temperature, top_k, top_p)  # each [1]
        return token[0], logprob[0], self._merge(cache, rows, slots)

    def _decode_step(self, params, cache, slots, tables, lengths, tokens, active, seeds, steps, temperature, top_k,
                     top_p):
        """One token for every active row; idle rows write nothing."""
        logits, rows = forward(self.cfg, params, tokens[:, None], self._rows(cache, slots, tables, lengths), active)
        token, logprob = self._sample(logits[:, 0], seeds, steps, temperature, top_k, top_p)
        return token, logprob, self._merge(cache, rows, slots)

    def warmup(self) -> None:
        """Compile every prefill chunk bucket and decode shape now, writing nothing (idle rows, empty chunks),
        so that serving never compiles."""
        sampling = self._sampling_args([_Sequence(Request([0], max_tokens=1), self.tokenizer.decode)])
        for size in _powers_of_two(MIN_CHUNK, self.prefill_chunk):
            _, _, self.cache = self.executables.run(
                self._prefill_chunk, (1,), self.params, self.cache, np.zeros(1, np.int32),
                np.zeros((1, self.pages_per_seq), np.int32), np.int32(0), np.zeros(size, np.int32), np.int32(0),
                *sampling)
        all_rows, widths = self._decode_shapes()
        for rows in all_rows:
            zeros = np.zeros(rows, np.int32)
            for width in widths:
                _, _, self.cache = self.executables.run(
                    self._decode_step, (1,), self.params, self.cache, np.arange(rows, dtype=np.int32),
                    np.zeros((rows, width), np.int32), zeros, zeros, zeros,
                    *[np.zeros(rows, a.dtype) for a in sampling])

    # --- metrics ------------------------------------------------------------------------------
    def metrics(self) -> dict:
        stats = self.allocator.stats()
        now = time.perf_counter()
        while self._recent and now - self._recent[0] > 10.0:
            self._recent.popleft()
        span = now - self._recent[0] if len(self._recent) > 1 else 0.0
        return {
            "running": sum(s is not None for s in self.slots), "waiting": len(self.waiting),
            "kv_pages_used": stats.used, "kv_pages_free": stats.free, "kv_pages_total": stats.total,
            "kv_pages_cached": stats.cached,
            "prefix_cache_hit_rate": self._totals["cached"] / self._totals["prompt"] if self._totals["prompt"] else 0.0,
            "prompt_tokens_total": self._totals["prompt"], "prefilled_tokens_total": self._totals["prefilled"],
            "generation_tokens_total": self._totals["generated"], "preemptions_total": self._totals["preempted"],
            "tokens_per_s": (len(self._recent) - 1) / span if span > 0 else 0.0,
            "compilations": self.executables.count,
        }


def _powers_of_two(low: int, high: int) -> list[int]:
    """low, 2 low, 4 low, ... below high, then high: the bucket sizes `bucket(n, low, high)` can return."""
    sizes = [low]
    while sizes[-1] * 2 < high:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [high]))
