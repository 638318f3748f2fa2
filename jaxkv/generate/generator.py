"""Batched generation: a jitted prefill and a jitted multi-step decode over a donated dense cache.

Shapes are bucketed (batch and prompt length to powers of two, the cache to a power of
two above prompt bucket + new tokens), so a stream of varied prompts compiles once per
bucket. Executables are compiled ahead of time and kept on the Generator, which also lets
us report compile time apart from run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.cache.dense import KVCache
from jaxkv.cache.paged import KV_DTYPES, PagedKVCache, streaming_pages
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.generate.detokenize import TextStream
from jaxkv.generate.sampling import SamplingParams, sample
from jaxkv.model.decoder import forward
from jaxkv.parallel.rules import keep_cache_sharding, put, shard_params

MIN_PROMPT_BUCKET = 16


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at maximum."""
    size = 1 << (max(int(n), int(minimum), 1) - 1).bit_length()
    return min(size, maximum) if maximum else size


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last generate call; run times exclude compilation."""

    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        run = self.prefill_s + self.decode_s
        return self.new_tokens / run if run > 0 else 0.0


class Executables:
    """Functions compiled ahead of time, once per (function, argument shapes and dtypes, static values).

    Keeping them lets callers report compile time apart from run time and count compilations: a
    server warmed up over its buckets must not compile again. With a mesh, functions are traced,
    compiled and run with it in context (so the model's sharding constraints apply), and the
    arguments' shardings are part of the key.
    """

    def __init__(self, mesh: jax.sharding.Mesh | None = None):
        self._compiled: dict = {}
        self.compile_s = 0.0
        self.mesh = mesh

    @property
    def count(self) -> int:
        return len(self._compiled)

    def run(self, fn, donate: tuple[int, ...], *args, **static):
        """fn(*args, **static) through its executable; `donate` are the positions of donated args."""
        leaves, treedef = jax.tree.flatten(args)
        key = (fn, tuple(sorted(static.items())), treedef,
               tuple((np.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if key not in self._compiled:
                start = time.perf_counter()
                jitted = jax.jit(fn, static_argnames=tuple(static), donate_argnums=donate)
                self._compiled[key] = jitted.lower(*args, **static).compile()
                self.compile_s += time.perf_counter() - start
            return self._compiled[key](*args)


class Generator:
    """Generates from token ids with one model's parameters; owns its compiled executables."""

    def __init__(self, cfg: ModelConfig, params, eos_ids: Sequence[int] = (), decode_chunk: int = 8,
                 kv_dtype: str | None = None, page_size: int | None = None, mesh: jax.sharding.Mesh | None = None):
        """kv_dtype: the cache's dtype (default the compute dtype; "int8" needs pages).
        page_size: keep K/V in a paged cache of pages of this many tokens (None: dense).
        mesh: shard parameters, caches and batches over it (`jaxkv.parallel`)."""
        self.cfg = cfg
        self.params = params if mesh is None else shard_params(params, cfg, mesh)
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.decode_chunk = decode_chunk
        self.kv_dtype = kv_dtype or cfg.dtype
        if self.kv_dtype not in KV_DTYPES:
            raise JaxkvError(f"KV dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if page_size is not None and (page_size < 1 or page_size & (page_size - 1)):
            raise JaxkvError(f"page_size must be a power of two, got {page_size}")
        if self.kv_dtype == "int8" and page_size is None:
            raise JaxkvError("int8 KV lives in the paged cache: give a page_size (e.g. 16)")
        if cfg.streaming_window is not None and page_size is None:
            raise JaxkvError("StreamingLLM (streaming_window) evicts pages of the paged cache: give a page_size")
        self.page_size = page_size
        self.mesh = mesh
        self.executables = Executables(mesh)
        self.stats = GenerationStats()

    # --- device functions ---------------------------------------------------------------
    def _prefill(self, params, tokens, n_new, seed, temperature, top_k, top_p, *, greedy, cache_len):
        """Fresh cache and per-row PRNG keys, the prompt written in, and the first new token."""
        batch = tokens.shape[0]
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(batch))
        cache = keep_cache_sharding(self._new_cache(batch, cache_len), self.mesh)
        logits, cache = forward(self.cfg, params, tokens, cache, n_new)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
        return (sample(logits[:, 0], step_keys, temperature, top_k, top_p, greedy=greedy),
                keep_cache_sharding(cache, self.mesh), keys)

    def _new_cache(self, batch: int, cache_len: int):
        """An empty dense cache, or a paged one whose rows own consecutive pages (under StreamingLLM just
        enough for the sinks and the window, whatever the length)."""
        if self.page_size is None:
            return KVCache.init(self.cfg, batch, cache_len, self.kv_dtype)
        per_seq = -(-cache_len // self.page_size) if self.cfg.streaming_window is None else \
            streaming_pages(self.cfg, self.page_size)
        cache = PagedKVCache.init(self.cfg, batch, batch * per_seq, self.page_size, per_seq, self.kv_dtype)
        return cache.replace(block_tables=jnp.arange(batch * per_seq, dtype=jnp.int32).reshape(batch, per_seq))

    def _decode(self, params, cache, tokens, step, keys, temperature, top_k, top_p, *, greedy):
        def one_step(carry, i):
            cache, tok = carry
            logits, cache = forward(self.cfg, params, tok[:, None], cache)
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step + i)
            nxt = sample(logits[:, 0], step_keys, temperature, top_k, top_p, greedy=greedy)
            return (cache, nxt), nxt

        (cache, _), toks = jax.lax.scan(one_step, (cache, tokens), jnp.arange(self.decode_chunk))
        return toks.T, keep_cache_sharding(cache, self.mesh)

    def _run(self, fn, donate: tuple[int, ...], *args, **static):
        before = self.executables.compile_s
        out = self.executables.run(fn, donate, *args, **static)
        self.stats.compile_s += self.executables.compile_s - before
        return out

    # --- host loop ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingParams,
                 stop: Sequence[str] = (), decode=None) -> list[Completion]:
        """Generate for each prompt (token ids). `decode` (ids -> text) is needed for stop strings."""
        cfg = self.cfg
        if not prompts:
            raise JaxkvError("no prompts given")
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise JaxkvError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise JaxkvError("a prompt is empty (it tokenized to zero tokens)")
        if max(lengths) >= cfg.max_seq_len:
            raise JaxkvError(f"prompt of {max(lengths)} tokens does not fit the model's context of "
                             f"{cfg.max_seq_len} tokens (room is needed for at least one new token)")
        if stop and decode is None:
            raise JaxkvError("stop strings need a tokenizer to decode with")
        streaming = cfg.streaming_window is not None
        if streaming and max(lengths) > cfg.streaming_window + cfg.streaming_sinks:
            raise JaxkvError(f"prompt of {max(lengths)} tokens is longer than the StreamingLLM cache "
                             f"({cfg.streaming_sinks} sinks + a window of {cfg.streaming_window}); widen the window")
        # StreamingLLM goes on past the trained context: its cache holds the sinks and the window only.
        budgets = [int(max_new_tokens) if streaming else min(int(max_new_tokens), cfg.max_seq_len - n)
                   for n in lengths]

        n = len(prompts)
        batch = bucket(n)
        prompt_len = bucket(max(lengths), MIN_PROMPT_BUCKET, cfg.max_seq_len)
        cache_len = prompt_len if streaming else bucket(prompt_len + max(budgets), MIN_PROMPT_BUCKET, cfg.max_seq_len)
        tokens = np.zeros((batch, prompt_len), np.int32)
        n_new = np.ones((batch,), np.int32)  # padding rows hold one dummy token
        for row, ids in enumerate(prompts):
            tokens[row, :len(ids)] = ids
            n_new[row] = len(ids)
        temperature = np.full((batch,), sampling.temperature, np.float32)
        top_k = np.full((batch,), sampling.top_k, np.int32)
        top_p = np.full((batch,), sampling.top_p, np.float32)
        greedy = sampling.greedy
        self.stats = GenerationStats()

        start = time.perf_counter()
        tokens, n_new, temperature, top_k, top_p = put(tokens, self.mesh, "batch", "seq"), *(
            put(x, self.mesh, "batch") for x in (n_new, temperature, top_k, top_p))
        tok, cache, keys = self._run(self._prefill, (), self.params, tokens, n_new, np.uint32(sampling.seed),
                                     temperature, top_k, top_p, greedy=greedy, cache_len=cache_len)
        tok = np.asarray(tok)
        self.stats.prefill_s = time.perf_counter() - start - self.stats.compile_s

        outputs = [_Output(budget, stop, decode) for budget in budgets]
        for row, out in enumerate(outputs):
            out.add(int(tok[row]), self.eos_ids)
        step = 1
        start = time.perf_counter()
        compile_before = self.stats.compile_s
        while not all(out.finish_reason for out in outputs):
            toks, cache = self._run(self._decode, (1,), self.params, cache, tok, np.int32(step),
                                    keys, temperature, top_k, top_p, greedy=greedy)  # cache donated
            toks = np.asarray(toks)
            for row, out in enumerate(outputs):
                for t in toks[row]:
                    if out.finish_reason:
                        break
                    out.add(int(t), self.eos_ids)
            tok = toks[:, -1]
            step += self.decode_chunk
        self.stats.decode_s = time.perf_counter() - start - (self.stats.compile_s - compile_before)
        self.stats.new_tokens = sum(len(out.ids) for out in outputs)
        return [out.completion(length) for out, length in zip(outputs, lengths)]


class _Output:
    """One sequence's generated ids and why it stopped; a TextStream watches for the stop strings."""

    def __init__(self, budget: int, stop: Sequence[str], decode):
        self.budget, self.decode = budget, decode
        self.stream = TextStream(decode, stop) if stop else None
        self.ids: list[int] = []
        self.finish_reason: str | None = None

    def add(self, token: int, eos_ids) -> None:
        self.ids.append(token)
        full = len(self.ids) >= self.budget
        if token in eos_ids:
            self.finish_reason = "stop"
            return
        if self.stream is not None:
            self.stream.add([token], final=full)
            if self.stream.stopped:
                self.finish_reason = "stop"
                return
        if full:
            self.finish_reason = "length"

    def completion(self, prompt_tokens: int) -> Completion:
        if self.stream is not None and self.stream.stopped:
            text = self.stream.text
        else:
            text = self.decode(self.ids) if self.decode else ""
        return Completion(text, list(self.ids), prompt_tokens, self.finish_reason or "length")
