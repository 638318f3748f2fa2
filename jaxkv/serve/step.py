"""The one jitted step of the runtime: a ragged batch of new tokens in, their K/V in the page pool, next tokens out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.cache.paged import PagedKV
from jaxkv.config import ModelConfig
from jaxkv.generate.sampling import sample
from jaxkv.model.decoder import forward
from jaxkv.parallel.rules import keep_cache_sharding


def ragged_step(params, pools, tokens, meta, seeds, steps, temperature, top_k, top_p, passes, *, cfg: ModelConfig,
                groups: tuple[tuple[int, ...], ...], iters: int, mesh=None):
    """One step on the pools (donated; pools[g] holds the KV layers groups[g]): tokens [T] packed by `meta` (rows
    R) in, their K/V written, each row's next token sampled from its last token's logits. iters > 1 (decode rows
    only, T == R): that many tokens per row, each fed back. Returns (tokens [iters, R], their logprobs, pools)."""
    def one(pools, meta, tokens, steps):
        logits, kv = forward(cfg, params, tokens[None], PagedKV(pools, meta, groups),
                             logits_at=meta.logits_index[None], passes=passes)
        logits = logits[0]
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds, steps)
        token = sample(logits, keys, temperature, top_k, top_p, greedy=False)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        return tuple(keep_cache_sharding(pool, mesh) for pool in kv.pools), token, logprob

    if iters == 1:
        pools, token, logprob = one(pools, meta, tokens, steps)
        return token[None], logprob[None], pools

    def again(carry, i):  # the model traced once for all iterations: half the compile of unrolling the first
        pools, token = carry
        pools, token, logprob = one(pools, meta.advanced(i), token, steps + i)
        return (pools, token), (token, logprob)

    (pools, _), (tokens, logprobs) = jax.lax.scan(again, (pools, tokens), jnp.arange(iters, dtype=jnp.int32))
    return tokens, logprobs, pools
