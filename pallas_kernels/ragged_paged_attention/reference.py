"""Ragged paged attention in pure JAX: the ground truth for the kernels and the CPU path.

Cost is what the rows can see, never the whole table or a gather per query: every row's last query runs
as a decode query (one gather of the row's pages), then a loop over the rows with more than one query
(prefill chunks) gathers each such row's pages once and attends its whole chunk to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import reference as decode


def last_queries(cu_q_lens: jax.Array, n_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Each row's last query index [R] (clipped into q) and whether the row has a query at all."""
    return jnp.clip(cu_q_lens[1:] - 1, 0, max(n_tokens - 1, 0)), cu_q_lens[1:] > cu_q_lens[:-1]


def ragged_paged_attention(q, k_pages, v_pages, meta, *, k_scales, v_scales, scale, softcap, sinks, window,
                           recent: decode.Recent | None = None, q_sinks=None):
    """q [T, H, Dh] packed rows over their pages; see `pallas_kernels.ragged_paged_attention`."""
    n_tokens = q.shape[0]
    if n_tokens == 0 or meta.kv_lens.shape[0] == 0:
        return jnp.zeros_like(q)
    last, real = last_queries(meta.cu_q_lens, n_tokens)
    out = decode.paged_attention(q[last], k_pages, v_pages, meta.block_tables, jnp.where(real, meta.kv_lens, 0),
                                 k_scales=k_scales, v_scales=v_scales, scale=scale, softcap=softcap, sinks=sinks,
                                 window=window, recent=recent)
    out = jnp.zeros_like(q).at[jnp.where(real, last, n_tokens)].set(out, mode="drop")
    if meta.max_q_len == 1:
        return out
    width = meta.max_q_len
    q_lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
    chunked = q_lens > 1
    rows = jnp.nonzero(chunked, size=q_lens.shape[0], fill_value=0)[0]
    q = jnp.pad(q, ((0, width), (0, 0), (0, 0)))  # a chunk's slice never runs past the end (no clamping)
    q_sinks = None if q_sinks is None else jnp.pad(q_sinks, ((0, width), (0, 0), (0, 0)))

    def one_chunk(i, out):
        row = rows[i]
        start, n_q = meta.cu_q_lens[row], jnp.minimum(q_lens[row], width)
        positions = meta.kv_lens[row] - n_q + jnp.arange(width)
        chunk = _chunk_attention(jax.lax.dynamic_slice_in_dim(q, start, width), positions, n_q, k_pages, v_pages,
                                 k_scales, v_scales, meta.block_tables[row], scale=scale, softcap=softcap, sinks=sinks,
                                 window=window, recent=None if recent is None else recent._replace(
                                     flushed=recent.flushed[row][None]),
                                 q_sinks=None if q_sinks is None else jax.lax.dynamic_slice_in_dim(q_sinks, start,
                                                                                                   width))
        mine = (jnp.arange(width) < n_q)[:, None, None]
        return jax.lax.dynamic_update_slice_in_dim(
            out, jnp.where(mine, chunk, jax.lax.dynamic_slice_in_dim(out, start, width)), start, 0)

    out = jnp.pad(out, ((0, width), (0, 0), (0, 0)))
    return jax.lax.fori_loop(0, jnp.sum(chunked), one_chunk, out)[:n_tokens]


def _chunk_attention(q, positions, n_q, k_pages, v_pages, k_scales, v_scales, table, *, scale, softcap, sinks,
                     window, recent, q_sinks=None):
    """One row's chunk q [C, H, Dh] at `positions` [C] (the first n_q real) over its pages, read once; the sink
    keys meet q_sinks [C, H, Dh] when given."""
    n_kv, _, page_size, _ = k_pages.shape
    head_dim = q.shape[-1]
    width = q.shape[0]
    if window is None:  # every page of the row, in table order
        keys = jnp.arange(table.shape[0] * page_size)
    else:  # the sinks, then the window of the first query through the last one
        last = positions[0] - window + 1 + jnp.arange(window + width - 1)
        keys = jnp.concatenate([jnp.arange(sinks), jnp.where(last < sinks, -1, last)])
    ring = {} if recent is None else dict(flushed=recent.flushed)
    k = decode.gather_tokens(k_pages, k_scales, table[None], keys[None], sinks, window, keys=True,
                             recent=None if recent is None else recent.k, **ring)[:, 0]  # [K, C', Dh]
    v = decode.gather_tokens(v_pages, v_scales, table[None], keys[None], sinks, window,
                             recent=None if recent is None else recent.v, **ring)[:, 0]
    def grouped(q):  # [K, G, C, Dh]
        return q.astype(jnp.float32).reshape(width, n_kv, -1, head_dim).transpose(1, 2, 0, 3)

    logits = jnp.einsum("kgcd,ksd->kgcs", grouped(q), k)
    if q_sinks is not None and window is not None:  # the first `sinks` keys are the sinks
        logits = jnp.concatenate([jnp.einsum("kgcd,ksd->kgcs", grouped(q_sinks), k[:, :sinks]),
                                  logits[..., sinks:]], axis=-1)
    logits = decode.soft_cap(logits * scale, softcap)
    seen = (jnp.arange(width) < n_q)[:, None] & decode.visible(keys[None, :], positions[:, None] + 1, sinks, window)
    logits = jnp.where(seen, logits, decode.MASKED)
    probs = jax.nn.softmax(logits, axis=-1) * seen  # a query that sees nothing: zeros
    out = jnp.einsum("kgcs,ksd->ckgd", probs, v)
    return out.reshape(q.shape).astype(q.dtype)
