"""Decode paged attention in pure JAX: gather each sequence's pages, mask, softmax. The ground truth for kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so a fully masked row or block stays NaN-free


def visible(positions: jax.Array, lengths: jax.Array, sinks: int, window: int | None) -> jax.Array:
    """Whether each position is attended to: inside the sequence, and a sink or inside the window."""
    keep = positions < lengths
    if window is not None:
        keep &= (positions < sinks) | (positions >= lengths - window)
    return keep


def dequantize(pages: jax.Array, scales: jax.Array | None, dtype) -> jax.Array:
    """int8 pages times their per-(token, head) scales; float pages pass through cast to `dtype`."""
    if scales is None:
        return pages.astype(dtype)
    return (pages.astype(jnp.float32) * scales[..., None]).astype(dtype)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales, v_scales, scale, sinks, window):
    """q [B, H, Dh] over the pages block_tables [B, P] names in k/v_pages [K, N, S, Dh]; see the package docstring."""
    n_kv, _, page_size, head_dim = k_pages.shape
    batch, pages_per_seq = block_tables.shape
    # [K, B, P, S, Dh] -> [B, K, P*S, Dh]: each sequence's tokens in order
    k = dequantize(k_pages, k_scales, jnp.float32)[:, block_tables].reshape(n_kv, batch, -1, head_dim)
    v = dequantize(v_pages, v_scales, jnp.float32)[:, block_tables].reshape(n_kv, batch, -1, head_dim)
    qg = q.astype(jnp.float32).reshape(batch, n_kv, -1, head_dim)
    logits = jnp.einsum("bkgd,kbsd->bkgs", qg, k) * scale
    keep = visible(jnp.arange(pages_per_seq * page_size)[None, :], lengths[:, None], sinks, window)
    logits = jnp.where(keep[:, None, None], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1) * keep[:, None, None]  # length 0: all zeros
    out = jnp.einsum("bkgs,kbsd->bkgd", probs, v)
    return out.reshape(q.shape).astype(q.dtype)
