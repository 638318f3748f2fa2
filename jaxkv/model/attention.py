"""Causal grouped-query attention of new queries over a dense KV cache (pure JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

_MASKED = -1e30  # finite, so a fully masked (padding) row stays NaN-free


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *,
                     strict: bool = False, window: int | None = None, sinks: int = 0,
                     softcap: float | None = None) -> jax.Array:
    """q [B, T, H, Dh] at positions [B, T] attends to cache k, v [B, S, K, Dh] at key positions <= its own.

    strict: keys strictly before the query (LCKV's masked diagonal for an upward source,
    whose KV of the current token is not known yet); a query that sees no key outputs zeros.
    window: only the last `window` positions up to the query are visible (sliding window), and
    the first `sinks` positions (StreamingLLM's attention sinks). softcap: Gemma 2's cap * tanh(logits / cap).
    Query heads are grouped onto KV heads (GQA/MQA); softmax runs in float32.
    """
    n_kv = k.shape[2]
    qg = rearrange(q, "b t (k g) d -> b k g t d", k=n_kv)
    scores = jnp.einsum("bkgtd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    key_pos = jnp.arange(k.shape[1])[None, None, :]
    q_pos = q_positions[:, :, None]
    visible = key_pos < q_pos if strict else key_pos <= q_pos  # [B, T, S]
    if window is not None:
        visible &= (key_pos > q_pos - window) | (key_pos < sinks)
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    if strict:  # the first token has nothing to attend to: LCKV's zero "dummy" output
        probs = probs * jnp.any(visible, axis=-1)[:, None, None, :, None]
    out = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), v)
    return rearrange(out, "b k g t d -> b t (k g) d")
