"""Decode paged attention in pure JAX: gather each sequence's visible tokens, softmax. The ground truth for kernels,
and the page arithmetic they share (ring columns, visible positions and pages, query-block plans)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MASKED = -1e30  # finite, so a fully masked row or block stays NaN-free


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's logit soft-capping, cap * tanh(logits / cap), applied to the scaled logits; None: unchanged."""
    return logits if cap is None else jnp.tanh(logits / cap) * cap


def table_column(page: jax.Array, pages_per_seq: int, sinks: int, page_size: int) -> jax.Array:
    """The block-table column that holds a sequence's page `page` (= position // page_size).

    Pages inside the table map to themselves. Pages past it wrap around the columns after the
    sink pages (a ring), so a sequence with sinks and a window (StreamingLLM) runs forever on a
    table of cdiv(sinks, page_size) + cdiv(window, page_size) + 1 pages: a window page reuses the
    column of a page that fell out of the window.
    """
    sink_pages = min(-(-sinks // page_size), pages_per_seq - 1)
    ring = pages_per_seq - sink_pages
    return jnp.where(page < pages_per_seq, page, sink_pages + (page - sink_pages) % ring)


def visible(positions: jax.Array, lengths: jax.Array, sinks: int, window: int | None) -> jax.Array:
    """Whether each position is attended to: inside the sequence, and a sink or inside the window."""
    keep = (positions >= 0) & (positions < lengths)
    if window is not None:
        keep &= (positions < sinks) | (positions >= lengths - window)
    return keep


def candidate_positions(lengths: jax.Array, pages_per_seq: int, page_size: int, sinks: int,
                        window: int | None) -> jax.Array:
    """Per sequence, the positions that may be visible [B, C]: the whole table without a window,
    else the sinks then the window (a window position that is also a sink is pushed out of range)."""
    if window is None:
        return jnp.broadcast_to(jnp.arange(pages_per_seq * page_size), (lengths.shape[0], pages_per_seq * page_size))
    recent = lengths[:, None] - window + jnp.arange(window)[None, :]
    recent = jnp.where(recent < sinks, -1, recent)
    return jnp.concatenate([jnp.broadcast_to(jnp.arange(sinks), (lengths.shape[0], sinks)), recent], axis=1)


INT4_GROUP = 32  # channels per scale of int4 pages


def unpack_int4(packed: jax.Array) -> jax.Array:
    """int4 values int32 [..., 2n] from their bytes uint8 [..., n]: byte i holds channel i in its low nibble and
    channel n + i in its high one, each a 4-bit two's complement number."""
    b = packed.astype(jnp.int32)
    return jnp.concatenate([((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8], axis=-1)


KIVI_GROUP = 32  # channels per scale of KIVI values


class Recent(NamedTuple):
    """KIVI's full-precision residual: a row's positions from flushed[row] on are read from the float pages
    k, v [K, M, S, Dh] that its block-table columns name from flushed[row] // S on (not from the quantized pool)."""

    k: jax.Array
    v: jax.Array
    flushed: jax.Array  # int32 [B]: tokens of each row held in quantized pages, a multiple of the page size


def is_kivi(scales: jax.Array | None) -> bool:
    """KIVI pages carry bfloat16 (scale, minimum) pairs; the other quantized dtypes float32 scales."""
    return scales is not None and scales.dtype == jnp.bfloat16


def unpack_bits(packed: jax.Array, bits: int) -> jax.Array:
    """Unsigned codes int32 [..., n x 8 / bits] from bytes uint8 [..., n]: byte i holds channel i + j n at bits
    j bits .. (j + 1) bits - 1, j = 0 .. 8 / bits - 1 (2 bits: four channels a quarter of the vector apart)."""
    b = packed.astype(jnp.int32)
    return jnp.concatenate([(b >> (j * bits)) & ((1 << bits) - 1) for j in range(8 // bits)], axis=-1)


def dequantize(pages: jax.Array, scales: jax.Array | None, dtype, *, keys: bool = False) -> jax.Array:
    """Quantized pages times their scales: int8 and fp8 one per (token, head), int4 (uint8 bytes, two values each)
    one per (token, head, INT4_GROUP channels); float pages pass through cast to `dtype`. KIVI pages (uint8 codes,
    bfloat16 scales [..., 2, n]: scale then minimum, value = code x scale + minimum) hold keys per channel of a
    page (`keys`: pages [..., S, b], scales [..., 2, Dh]) and values per token in KIVI_GROUP channels (scales
    [..., S, 2, Dh / KIVI_GROUP])."""
    if scales is None:
        return pages.astype(dtype)
    if is_kivi(scales):
        scales = scales.astype(jnp.float32)
        head_dim = scales.shape[-1] if keys else scales.shape[-1] * KIVI_GROUP
        codes = unpack_bits(pages, 8 * pages.shape[-1] // head_dim).astype(jnp.float32)
        if keys:  # [..., S, Dh] against one (scale, minimum) per page and channel
            return (codes * scales[..., 0:1, :] + scales[..., 1:2, :]).astype(dtype)
        grouped = codes.reshape(*codes.shape[:-1], -1, KIVI_GROUP)
        return (grouped * scales[..., 0, :, None] + scales[..., 1, :, None]).reshape(codes.shape).astype(dtype)
    if pages.dtype == jnp.uint8:
        values = unpack_int4(pages).astype(jnp.float32)
        grouped = values.reshape(*values.shape[:-1], -1, INT4_GROUP) * scales[..., None]
        return grouped.reshape(values.shape).astype(dtype)
    return (pages.astype(jnp.float32) * scales[..., None]).astype(dtype)


def gather_tokens(pages, scales, block_tables, positions, sinks, window, *, keys=False, recent=None, flushed=None):
    """K or V [K, B, C, Dh] float32 at `positions` [B, C] (from `candidate_positions`) of each sequence,
    read through its block table: whole pages in table order without a window (a gather of page rows,
    which XLA's CPU backend does far faster than one of [S, Dh] blocks). recent [K, M, S, Dh] with flushed [B]:
    KIVI's float pages, which hold each row's positions from flushed on (keys: the pages are KIVI keys)."""
    n_kv, num_pages, page_size, stored = pages.shape
    if window is None:
        rows = jnp.take(pages.reshape(n_kv, num_pages, -1), block_tables, axis=1, mode="clip")
        row_scales = None if scales is None else jnp.take(scales, block_tables, axis=1, mode="clip")
        dense = dequantize(rows.reshape(*rows.shape[:3], page_size, stored), row_scales, jnp.float32, keys=keys)
        dense = dense.reshape(*dense.shape[:2], -1, dense.shape[-1])
        if recent is None:
            return dense
        ring = jnp.take(recent.reshape(n_kv, recent.shape[1], -1), block_tables, axis=1, mode="clip")
        ring = ring.reshape(dense.shape).astype(jnp.float32)
        return jnp.where((positions < flushed[:, None])[None, :, :, None], dense, ring)
    column = table_column(jnp.maximum(positions, 0) // page_size, block_tables.shape[1], sinks, page_size)
    page = jnp.take_along_axis(block_tables, column, axis=1)
    offset = jnp.maximum(positions, 0) % page_size
    return dequantize(pages[:, page, offset], None if scales is None else scales[:, page, offset], jnp.float32)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales, v_scales, scale, softcap, sinks,
                    window, recent: Recent | None = None):
    """q [B, H, Dh] over the pages block_tables [B, P] names in k/v_pages [K, N, S, Dh]; see the package docstring.
    Both products keep the gathered K/V as the row operand, in the layout it is gathered in: on CPU, where
    this path runs for real, that is several times faster than contracting both operands' minor axes."""
    n_kv, _, page_size, _ = k_pages.shape
    head_dim = q.shape[-1]
    batch, pages_per_seq = block_tables.shape
    positions = candidate_positions(lengths, pages_per_seq, page_size, sinks, window)
    ring = {} if recent is None else dict(flushed=recent.flushed)
    k = gather_tokens(k_pages, k_scales, block_tables, positions, sinks, window, keys=True,
                      recent=None if recent is None else recent.k, **ring)
    v = gather_tokens(v_pages, v_scales, block_tables, positions, sinks, window,
                      recent=None if recent is None else recent.v, **ring)
    qg = q.astype(jnp.float32).reshape(batch, n_kv, -1, head_dim).transpose(1, 0, 3, 2)  # [K, B, Dh, G]
    logits = soft_cap(jnp.matmul(k, qg) * scale, softcap)  # [K, B, C, G]
    keep = visible(positions, lengths[:, None], sinks, window)[None, :, :, None]
    logits = jnp.where(keep, logits, MASKED)
    probs = jax.nn.softmax(logits, axis=2) * keep  # length 0: all zeros
    out = jnp.matmul(probs.swapaxes(-1, -2), v)  # [K, B, G, Dh]
    return out.transpose(1, 0, 2, 3).reshape(q.shape).astype(q.dtype)


def visible_pages(first_pos, last_pos, *, page_size, pages_per_seq, sinks, window):
    """The pages queries at positions first_pos..last_pos can see, as (n_sink, window_first, n_visible).

    Logical page i < n_sink is page i (the sinks); logical page i >= n_sink is page i - n_sink + window_first
    (the window of the first query up to the last query's page; without a window the causal prefix, inside the
    table). Exactly the pages that hold a position some of the queries sees; none for no query at a position >= 0.
    """
    n_sink = pl.cdiv(jnp.clip(last_pos + 1, 0, sinks), page_size)
    if window is None:
        window_first = n_sink
        last_page = jnp.minimum(jnp.maximum(last_pos, 0) // page_size, pages_per_seq - 1)
    else:
        window_first = jnp.maximum(jnp.maximum(first_pos - window + 1, 0) // page_size, n_sink)
        last_page = jnp.maximum(last_pos, 0) // page_size if window else window_first - 1  # window 0: sinks only
    any_seen = last_pos >= jnp.maximum(first_pos, 0)  # some query, at a position >= 0
    return n_sink, window_first, jnp.where(any_seen, n_sink + jnp.maximum(last_page + 1 - window_first, 0), 0)


def block_plan(cu_q_lens, lengths, n_blocks: int, block_q: int):
    """[n_blocks, 4] int32 per query block: (sequence, first row in q, real queries, first query's position).

    Blocks are numbered sequence by sequence; those past the last real block have no queries."""
    batch = lengths.shape[0]
    q_lens = jnp.maximum(cu_q_lens[1:] - cu_q_lens[:-1], 0)
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(pl.cdiv(q_lens, block_q)).astype(jnp.int32)])
    block = jnp.arange(n_blocks, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_blocks, block, side="right") - 1, 0, batch - 1).astype(jnp.int32)
    real = block < cu_blocks[-1]
    offset = (block - cu_blocks[seq]) * block_q  # the block's first query inside its chunk
    return jnp.stack([seq,
                      jnp.where(real, cu_q_lens[seq] + offset, 0),
                      jnp.where(real, jnp.clip(q_lens[seq] - offset, 0, block_q), 0),
                      jnp.where(real, lengths[seq] - q_lens[seq] + offset, 0)], axis=1).astype(jnp.int32)
