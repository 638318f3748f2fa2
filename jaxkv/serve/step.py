"""The one jitted step of the runtime: a ragged batch of new tokens in, their K/V in the page pool, next tokens out."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxkv.cache.paged import PagedKV
from jaxkv.config import ModelConfig
from jaxkv.generate.sampling import sample
from jaxkv.model.decoder import forward
from jaxkv.parallel.rules import keep_cache_sharding


def ragged_step(params, pool, tokens, meta, seeds, steps, temperature, top_k, top_p, passes, *, cfg: ModelConfig,
                iters: int, mesh=None):
    """One step on the pool (donated): tokens [T] packed by `meta` (rows R) in, their K/V written, each row's next
    token sampled from its last token's logits. iters > 1 (decode rows only, T == R): that many tokens per row,
    each fed back. Returns (tokens [iters, R], their logprobs, pool)."""
    def one(pool, meta, tokens, steps):
        logits, kv = forward(cfg, params, tokens[None], PagedKV(pool, meta), logits_at=meta.logits_index[None],
                             passes=passes)
        logits = logits[0]
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds, steps)
        token = sample(logits, keys, temperature, top_k, top_p, greedy=False)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        return keep_cache_sharding(kv.pool, mesh), token, logprob

    if iters == 1:
        pool, token, logprob = one(pool, meta, tokens, steps)
        return token[None], logprob[None], pool
    live = (meta.attention.cu_q_lens[1:] > meta.attention.cu_q_lens[:-1]).astype(jnp.int32)

    def again(carry, i):  # the model traced once for all iterations: half the compile of unrolling the first
        pool, token = carry
        moved = meta.replace(positions=meta.positions + i,
                             attention=dataclasses.replace(meta.attention, kv_lens=meta.attention.kv_lens + live * i))
        pool, token, logprob = one(pool, moved, token, steps + i)
        return (pool, token), (token, logprob)

    (pool, _), (tokens, logprobs) = jax.lax.scan(again, (pool, tokens), jnp.arange(iters, dtype=jnp.int32))
    return tokens, logprobs, pool
