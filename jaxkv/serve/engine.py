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

One request cannot hurt another. `add` validates it completely (`requests.validate`), so nothing a client
sends can raise inside a step. If a device call still fails, the requests in it become suspects and are
retried alone: one that fails again, alone, ends with an error; the others go on. If the failed call consumed
the donated pools, fresh ones are made and every running request is recomputed (sampling depends only on
the seed and the token's index, so the text is unchanged). A request past its deadline ends too.
"""

from __future__ import annotations

import collections
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.pages import OutOfPages, PageAllocator, prefix_hashes
from jaxkv.cache.paged import PagedKVCache, streaming_pages
from jaxkv.errors import DeadlineExceeded, InvalidRequest, JaxkvError, QueueFull
from jaxkv.generate.detokenize import TextStream
from jaxkv.generate.generator import Executables, bucket
from jaxkv.generate.sampling import sample
from jaxkv.model.decoder import forward
from jaxkv.parallel.rules import cache_shardings, keep_cache_sharding
from jaxkv.serve.requests import Limits, Request, RequestOutput, validate

__all__ = ["Engine", "EngineStepError", "Limits", "Request", "RequestOutput"]

MIN_CHUNK = 16
UNBOUNDED_CONTEXT = 2**31 - 1  # StreamingLLM: a request may run for ever


class EngineStepError(RuntimeError):
    """The engine failed while running a request (a server error, not bad input)."""


class _Sequence:
    """A request inside the engine: its tokens (prompt, then generated) and how many are in the cache."""

    def __init__(self, request: Request, decode, deadline: float):
        self.request = request
        self.tokens = list(request.prompt_ids)
        self.n_prompt = len(self.tokens)
        self.computed = 0  # tokens whose K/V is in the cache
        self.prefilled = False  # all tokens computed and the next one sampled
        self.slot: int | None = None
        self.order = 0  # admission order: the latest admitted is preempted first
        self.cached_tokens = 0
        self.deadline = deadline  # time.monotonic() by which it must finish
        self.text = TextStream(decode, request.stop)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def output(self, token_ids, logprobs, text: str, reason: str | None, error=None) -> RequestOutput:
        return RequestOutput(self.request.request_id, text, list(token_ids),
                             logprobs if self.request.logprobs else None, reason is not None, reason,
                             self.n_prompt, self.generated, self.cached_tokens, error)


class Engine:
    """Serves many requests on one model; single-threaded: one thread calls add, abort and step."""

    def __init__(self, llm, *, max_batch: int = 8, page_size: int = 16, num_pages: int | None = None,
                 kv_dtype: str | None = None, prefill_chunk: int = 64, prefill_budget: int | None = None,
                 prefix_caching: bool = True, max_context: int | None = None, limits: Limits | None = None):
        """max_context caps prompt + generated tokens per request (default: the model's max_seq_len).
        num_pages defaults to max_batch full-length sequences. prefill_budget (default 4 chunks) caps the
        prompt tokens prefilled per step: more fills free slots sooner, less keeps the running requests'
        inter-token latency low. `limits` bounds what one request may cost (stop strings, queue, deadline)."""
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
        self.limits = limits or Limits()
        self._suspects: set[_Sequence] = set()  # were in a failed device call: decode alone until one passes

    # --- requests -----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request, or raise (and keep nothing): InvalidRequest if it can never be served, QueueFull if
        the queue is at its limit."""
        validate(request, vocab_size=self.cfg.vocab_size, max_prompt=self.max_prompt, max_context=self.max_context,
                 limits=self.limits)
        if request.request_id in self._by_id:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use", "request_id")
        n, budget = len(request.prompt_ids), request.max_tokens
        need = self.pages_per_seq if self.streaming else self.allocator.pages_for(n + budget)
        if need > self.allocator.num_pages:
            raise InvalidRequest(f"the request needs {need} KV pages; the pool has {self.allocator.num_pages}",
                                 "max_tokens", "context_length_exceeded")
        if self.limits.max_waiting is not None and len(self.waiting) >= self.limits.max_waiting:
            self._totals["queue_full"] += 1
            raise QueueFull(f"the server's queue is full ({len(self.waiting)} requests waiting); try again shortly")
        timeout = self.limits.request_timeout_s
        seq = _Sequence(request, self.tokenizer.decode, time.monotonic() + timeout if timeout else float("inf"))
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
        return bool(self.waiting or self._undelivered or any(self.slots))

    # --- scheduling ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: end overdue requests, admit, prefill chunks (up to the budget), one decode step.
        Returns the outputs it produced. A failing device call ends only the request that fails alone (its
        output carries the error); a bug outside device calls propagates after `_recover`."""
        outputs, self._undelivered = self._undelivered, []
        try:
            self._step(outputs)
        except Exception:
            self._undelivered = outputs + self._undelivered  # tokens already emitted must still reach clients
            self._recover()
            raise
        return outputs

    def _recover(self) -> None:
        """The pools may be gone (a failed call consumed the donated cache): start from fresh pools (the prefix
        cache goes too) and send every running request back to the queue, to be recomputed like a preempted
        one."""
        for seq in sorted((s for s in self.slots if s is not None), key=lambda s: s.order, reverse=True):
            seq.slot, seq.computed, seq.prefilled = None, 0, False
            self.waiting.appendleft(seq)
        self.slots = [None] * self.max_batch
        self.allocator, self.cache = self._new_pool()

    def _step(self, outputs: list[RequestOutput]) -> None:
        self._expire(outputs)
        self._admit()
        budget = self.prefill_budget
        for seq in sorted((s for s in self.slots if s is not None and not s.prefilled), key=lambda s: s.order):
            while budget > 0 and seq.slot is not None and not seq.prefilled:
                budget -= self._prefill(seq, budget, outputs)
        decoding = sorted((s for s in self.slots if s is not None and s.prefilled), key=lambda s: s.order)
        decoding = [s for s in decoding if s.slot is not None and self._make_room(s)]  # (preempted ones: not)
        clean = [s for s in decoding if s not in self._suspects]
        if clean:
            self._decode(clean, outputs)
        for seq in decoding:  # suspects (also those just made so) alone, while the pools survive
            if seq in self._suspects and seq.slot is not None and seq.prefilled and self._decode([seq], outputs):
                self._suspects.discard(seq)

    def _device(self, seqs: list[_Sequence], outputs: list[RequestOutput], fn, args) -> list[np.ndarray] | None:
        """fn(params, cache, *args()) for seqs (args() builds the host arrays), its results on the host; None if
        anything failed. Then seqs become suspects, to be retried alone; a suspect that fails again, alone, ends
        with the error."""
        try:
            *results, self.cache = self.executables.run(fn, (1,), self.params, self.cache, *args())
            return [np.asarray(r) for r in results]
        except Exception as e:  # noqa: BLE001 - whatever the device raised, other requests go on
            self._totals["step_failures"] += 1
            if not self._pools_intact():
                self._recover()
            if len(seqs) == 1 and seqs[0] in self._suspects:
                self._totals["failed"] += 1
                error = EngineStepError(f"the engine failed while running this request: {type(e).__name__}: {e}")
                outputs.append(self._fail(seqs[0], error))
            else:
                self._suspects.update(seqs)
            return None

    def _pools_intact(self) -> bool:
        """Whether the cache survived a failed call: not donated away, and not the result of a failed run."""
        try:
            leaves = jax.tree.leaves(self.cache)
            if any(leaf.is_deleted() for leaf in leaves):
                return False
            jax.block_until_ready(leaves)
            return True
        except Exception:  # noqa: BLE001 - an asynchronous failure surfaces here
            return False

    def _fail(self, seq: _Sequence, error: Exception) -> RequestOutput:
        """End seq with an error (its pages are freed now); the output tells its client why."""
        self._end(seq)
        return seq.output([], [], "", "error", error)

    def _end(self, seq: _Sequence) -> None:
        """Forget a finished, aborted or failed request and free its slot and pages (or its place in the queue)."""
        self._by_id.pop(seq.request.request_id, None)
        self._suspects.discard(seq)
        if seq.slot is not None:
            self._evict(seq)
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
        Returns the number of tokens prefilled (0 if the call failed)."""
        n = min(len(seq.tokens) - seq.computed, self.prefill_chunk, limit)
        tokens = np.zeros(bucket(n, MIN_CHUNK, self.prefill_chunk), np.int32)
        tokens[:n] = seq.tokens[seq.computed:seq.computed + n]
        result = self._device([seq], outputs, self._prefill_chunk, lambda: (
            np.asarray([seq.slot], np.int32), self._table_row(seq)[None], np.int32(seq.computed), tokens,
            np.int32(n), *self._sampling_args([seq])))
        if result is None:
            return 0
        token, logprob = result
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

    def _decode(self, seqs: list[_Sequence], outputs: list[RequestOutput]) -> bool:
        """One token for each of seqs, packed into the first rows of the batch; the other rows are idle and
        stand for distinct other slots (so that writing back their unchanged streaming state is harmless).
        False if the call failed."""
        rows_options, width_options = self._decode_shapes()
        rows = min(r for r in rows_options if r >= len(seqs))
        need = max(self.allocator.pages_for(s.computed + 1) for s in seqs)
        width = min(w for w in width_options if w >= need or w == self.pages_per_seq)

        def args():
            busy = {s.slot for s in seqs}
            slots = [s.slot for s in seqs] + [i for i in range(self.max_batch) if i not in busy][:rows - len(seqs)]
            tables = np.zeros((rows, width), np.int32)
            lengths, tokens, active = (np.zeros(rows, np.int32) for _ in range(3))
            for i, seq in enumerate(seqs):
                tables[i], lengths[i], tokens[i], active[i] = (self._table_row(seq)[:width], seq.computed,
                                                               seq.tokens[-1], 1)
            sampling = [np.pad(part, (0, rows - len(seqs))) for part in self._sampling_args(seqs)]  # idle: greedy
            return np.asarray(slots, np.int32), tables, lengths, tokens, active, *sampling

        result = self._device(seqs, outputs, self._decode_step, args)
        if result is None:
            return False
        next_tokens, logprobs = result
        for i, seq in enumerate(seqs):
            seq.computed += 1
            outputs.append(self._emit(seq, int(next_tokens[i]), float(logprobs[i])))
        return True

    def _emit(self, seq: _Sequence, token: int, logprob: float) -> RequestOutput:
        """Append a sampled token; finish the request on EOS, a stop string or its budget."""
        seq.tokens.append(token)
        self._totals["generated"] += 1
        self._recent.append(time.perf_counter())
        eos = token in self.eos_ids and not seq.request.ignore_eos
        text = seq.text.add([] if eos else [token], final=eos or seq.generated >= seq.request.max_tokens)
        reason = "stop" if eos or seq.text.stopped else "length" if seq.generated >= seq.request.max_tokens else None
        if reason:
            self._end(seq)
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
        sampling = self._sampling_args([_Sequence(Request([0], max_tokens=1), self.tokenizer.decode, 0.0)])
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
            "step_failures_total": self._totals["step_failures"], "requests_failed_total": self._totals["failed"],
            "requests_timed_out_total": self._totals["timed_out"], "queue_full_total": self._totals["queue_full"],
            "tokens_per_s": (len(self._recent) - 1) / span if span > 0 else 0.0,
            "compilations": self.executables.count,
        }


def _powers_of_two(low: int, high: int) -> list[int]:
    """low, 2 low, 4 low, ... below high, then high: the bucket sizes `bucket(n, low, high)` can return."""
    sizes = [low]
    while sizes[-1] * 2 < high:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [high]))
