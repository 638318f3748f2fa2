"""The one jitted step of the runtime: a ragged batch of new tokens in, their K/V in the page pool, next tokens out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxkv.cache.paged import PagedKV
from jaxkv.config import ModelConfig
from jaxkv.generate.sampling import sample
from jaxkv.model.decoder import forward
from jaxkv.parallel.rules import keep_cache_sharding


def ragged_step(params, pools, tokens, meta, seeds, steps, temperature, top_k, top_p, forced, passes, *,
                cfg: ModelConfig, groups: tuple[tuple[int, ...], ...], iters: int, distributions: bool = False,
                mesh=None):
    """One step on the pools (donated; pools[g] holds the KV layers groups[g]): tokens [T] packed by `meta` (rows
    R) in, their K/V written, a token sampled at each of the N = R x verify positions `meta.logits_index` names
    (each row's last tokens) with the sampling values seeds, steps, temperature, top_k, top_p [N], or taken from
    forced [iters, N] where that is not negative (scoring a given text). iters > 1 (decode rows only, T == R,
    verify 1): that many tokens per row, each fed back. Returns (tokens [iters, N], their logprobs, the
    log-probabilities [iters, N, V] if `distributions` else None, pools)."""
    def one(pools, meta, tokens, steps, forced):
        logits, kv = forward(cfg, params, tokens[None], PagedKV(pools, meta, groups).new_votes(),
                             logits_at=meta.logits_index[None], passes=passes)
        logits = logits[0]
        keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds, steps)
        token = jnp.where(forced >= 0, forced, sample(logits, keys, temperature, top_k, top_p, greedy=False))
        log_probs = jax.nn.log_softmax(logits)
        logprob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        pools = tuple(keep_cache_sharding(pool, mesh) for pool in kv.pools)
        return pools, token, logprob, log_probs if distributions else None

    if iters == 1:
        pools, token, logprob, log_probs = one(pools, meta, tokens, steps, forced[0])
        return token[None], logprob[None], None if log_probs is None else log_probs[None], pools

    def again(carry, xs):  # the model traced once for all iterations: half the compile of unrolling the first
        pools, token = carry
        i, forced_i = xs
        pools, token, logprob, log_probs = one(pools, meta.advanced(i), token, steps + i, forced_i)
        return (pools, token), (token, logprob, log_probs)

    (pools, _), (tokens, logprobs, log_probs) = jax.lax.scan(
        again, (pools, tokens), (jnp.arange(iters, dtype=jnp.int32), forced))
    return tokens, logprobs, log_probs, pools
