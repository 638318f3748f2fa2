"""Prefill paged attention in pure JAX: every query row is a decode query. The ground truth for kernels.

Query i of sequence b sits at position pos = lengths[b] - q_len_b + i and sees exactly what a decode query of
a sequence of length pos + 1 sees, through the same block table row. So each row is handed, with its own
length and its sequence's table row, to the decode reference.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.paged_attention import reference as decode


def query_rows(cu_q_lens: jnp.ndarray, lengths: jnp.ndarray, n_rows: int):
    """Per packed query row [T]: its sequence, its position and whether it is a real query (not padding)."""
    rows = jnp.arange(n_rows)
    # the last sequence whose chunk starts at or before the row: skips empty chunks that start there too
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, rows, side="right") - 1, 0, lengths.shape[0] - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    position = lengths[seq] - q_len + rows - cu_q_lens[seq]
    return seq, position, rows < cu_q_lens[-1]


def paged_prefill_attention(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, *, k_scales, v_scales, scale,
                            softcap, sinks, window):
    """q [T, H, Dh] packed chunks over the pages block_tables [B, P] names; see the package docstring.

    Memory: gathers each row's candidate K/V, [K, T, P*S, Dh] without a window (sinks + window with one).
    """
    if q.shape[0] == 0 or block_tables.shape[0] == 0:
        return jnp.zeros_like(q)
    seq, position, real = query_rows(cu_q_lens, lengths, q.shape[0])
    seen = jnp.where(real, jnp.maximum(position + 1, 0), 0)  # padding rows, and rows before the start: nothing
    return decode.paged_attention(q, k_pages, v_pages, block_tables[seq], seen, k_scales=k_scales,
                                  v_scales=v_scales, scale=scale, softcap=softcap, sinks=sinks,
                                  window=window)
