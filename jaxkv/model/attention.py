"""Causal grouped-query attention of new queries over a dense KV cache (pure JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

_MASKED = -1e30  # finite, so a fully masked (padding) row stays NaN-free


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array) -> jax.Array:
    """q [B, T, H, Dh] at positions [B, T] attends to cache k, v [B, S, K, Dh] at key positions <= its own.

    Query heads are grouped onto KV heads (GQA/MQA); softmax runs in float32.
    """
    n_kv = k.shape[2]
    qg = rearrange(q, "b t (k g) d -> b k g t d", k=n_kv)
    scores = jnp.einsum("bkgtd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    key_pos = jnp.arange(k.shape[1])
    visible = key_pos[None, None, :] <= q_positions[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->bkgtd", probs, v)
    return rearrange(out, "b k g t d -> b t (k g) d")
