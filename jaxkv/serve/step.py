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

    pool, token, logprob = one(pool, meta, tokens, steps)
    if iters == 1:
        return token[None], logprob[None], pool
    live = (meta.attention.cu_q_lens[1:] > meta.attention.cu_q_lens[:-1]).astype(jnp.int32)

    def again(carry, _):
        pool, meta, token, steps = carry
        meta = meta.replace(positions=meta.positions + 1,
                            attention=dataclasses.replace(meta.attention, kv_lens=meta.attention.kv_lens + live))
        pool, token, logprob = one(pool, meta, token, steps + 1)
        return (pool, meta, token, steps + 1), (token, logprob)

    (pool, *_), (more, more_logprobs) = jax.lax.scan(again, (pool, meta, token, steps), length=iters - 1)
    return (jnp.concatenate([token[None], more]), jnp.concatenate([logprob[None], more_logprobs]), pool)
