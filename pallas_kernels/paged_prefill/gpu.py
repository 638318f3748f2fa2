"""Prefill paged attention as a Pallas Triton kernel: per query block, block-sparse online softmax over pages.

Grid (query block, KV head). The ragged chunks are cut into blocks of `block_q` queries that never straddle two
sequences; the grid has a static upper bound on their number (cdiv(T, block_q) + min(B, T), and at most T) and
the programs past the last real block write nothing. A program takes its block's queries for every q head of one
KV head's group together ([block_q * padded group, Dh] rows, so Triton's dot sees >= 16 rows) and loops only
over the pages some of its queries can see: the sink pages, then the pages from the window start of its first
query (page 0 without a window) up to the page of its last query. With q_sinks (StreamingLLM) the blocks that hold
sink pages take the sink tokens' logits from q_sinks. With KIVI's recent pages a sequence's pages
before flushed // page_size come from the quantized pool, the rest from the float recent pages, in two loops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.errors import KernelInputError
from pallas_kernels.paged_attention.gpu import attend_pages, kv_head_spec
from pallas_kernels.paged_attention.reference import (MASKED, block_plan, is_kivi, table_column, visible,
                                                       visible_pages)

_BLOCK_ROWS = 64  # query rows (queries x padded group) per program
_BLOCK_TOKENS = 64  # KV tokens per loop step: Triton's dot wants every dimension >= 16


def _kernel(info_ref, tables_ref, q_ref, k_ref, v_ref, *refs, scale, softcap, sinks, window, pages_per_seq,
            pages_per_block, group, block_rows, quantized, ring, sink_queries):
    """One (query block, KV head): the block's rows attend over the logical pages 0..n_visible-1 (the sink pages,
    then the window's or causal prefix's pages), so pages no query of the block can see are never loaded. `ring`:
    KIVI's flushed counts [B] and float pages k/v_recent follow the scales; `sink_queries`: q_sinks, last."""
    k_scales_ref, v_scales_ref, *refs = refs if quantized else (None, None, *refs)
    flushed_ref, k_recent_ref, v_recent_ref, *refs = refs if ring else (None, None, None, *refs)
    q_sinks_ref, o_ref = refs if sink_queries else (None, *refs)
    page_size = k_ref.shape[1]
    head_dim = q_ref.shape[-1]
    block_k = pages_per_block * page_size
    seq, first, n_queries, first_pos = info_ref[0], info_ref[1], info_ref[2], info_ref[3]
    last_pos = first_pos + n_queries - 1

    query = jnp.arange(block_rows) // group  # row r is query r // group of the block, head r % group
    real = query < n_queries
    q_pos = first_pos + query

    n_sink, window_first, n_visible = visible_pages(first_pos, last_pos, page_size=page_size,
                                                    pages_per_seq=pages_per_seq, sinks=sinks, window=window)

    # the union of the block's windows: the last `block_window` positions up to its last query
    block_window = None if window is None else (last_pos - first_pos + window if window else 0)

    q = q_ref[pl.ds(first * group, block_rows), :]
    compute_dtype = q.dtype if quantized else k_ref.dtype

    def attend(carry, lo, hi, pool):
        """The online softmax over the logical pages lo..hi-1 (lo a multiple of pages_per_block), read from
        pool = (k, v, k_scales, v_scales) refs; with q_sinks the blocks of sink pages first, apart."""
        def body(i, carry, with_sinks=False):
            logical = i * pages_per_block + jnp.arange(pages_per_block)
            page = jnp.where(logical < n_sink, logical, logical - n_sink + window_first)  # position // page_size
            column = table_column(page, pages_per_seq, sinks, page_size)  # past the table: the window's ring
            pages = jnp.clip(tables_ref[seq * pages_per_seq + column], 0, pool[0].shape[0] - 1)  # never outside
            positions = (page[:, None] * page_size + jnp.arange(page_size)[None, :]).reshape(block_k)
            in_range = jnp.broadcast_to((logical < hi)[:, None], (pages_per_block, page_size)).reshape(block_k)
            # tokens some query of the block sees; the rest of a loaded page (past the sequence, between the sinks
            # and the window) may hold anything, NaN included, so it is zeroed before it meets V
            used = in_range & visible(positions, last_pos + 1, sinks, block_window)
            keep = visible(positions[None, :], q_pos[:, None] + 1, sinks, window) & real[:, None] & used[None, :]
            q_sinks = (q_sinks_ref[pl.ds(first * group, block_rows), :], positions < sinks) if with_sinks else None
            return attend_pages(carry, q, *pool, pages, keep, scale=scale, softcap=softcap,
                                compute_dtype=compute_dtype, used=used, sinks=q_sinks)

        start, stop = lo // pages_per_block, pl.cdiv(hi, pages_per_block)
        if q_sinks_ref is not None:
            sink_stop = jnp.clip(pl.cdiv(n_sink, pages_per_block), start, stop)
            carry = jax.lax.fori_loop(start, sink_stop, functools.partial(body, with_sinks=True), carry)
            start = sink_stop
        return jax.lax.fori_loop(start, stop, body, carry)

    init = (jnp.zeros((block_rows, head_dim), jnp.float32), jnp.full((block_rows,), MASKED, jnp.float32),
            jnp.zeros((block_rows,), jnp.float32))
    pool = (k_ref, v_ref, k_scales_ref, v_scales_ref)
    if ring:  # KIVI has no window, so logical pages are pages; a block is one page (pages_per_block 1)
        first_recent = jnp.clip(flushed_ref[seq] // page_size, 0, n_visible)
        carry = attend(init, 0, first_recent, pool)
        acc, _, l = attend(carry, first_recent, n_visible, (k_recent_ref, v_recent_ref, None, None))
    else:
        acc, _, l = attend(init, 0, n_visible, pool)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # a query that sees nothing: zeros
    plgpu.store(o_ref.at[pl.ds(first * group, block_rows), :], out.astype(o_ref.dtype),
                mask=jnp.broadcast_to(real[:, None], out.shape))  # the rows past the chunk belong to others


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sinks", "window", "interpret", "block_q",
                                             "block_tokens"))
def paged_prefill_attention(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, *, k_scales, v_scales, scale,
                            softcap, sinks, window, interpret, block_q=None, block_tokens=_BLOCK_TOKENS,
                            recent=None, q_sinks=None):
    """The Triton kernel over (query block, KV head); block_q (queries per program) defaults to fill 64 rows.
    q_sinks: as q, the queries the sink tokens meet (`pallas_kernels.ragged_paged_attention`)."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv, n_pages, page_size, _ = k_pages.shape
    batch, pages_per_seq = block_tables.shape
    for name, size in (("page_size", page_size), ("head_dim", head_dim)):
        if size & (size - 1):
            raise KernelInputError(f"paged_prefill_attention: the gpu backend needs a power-of-two {name}, got {size}")
    if head_dim < 16:
        raise KernelInputError(f"paged_prefill_attention: the gpu backend needs head_dim >= 16, got {head_dim}")
    if n_tokens == 0 or batch == 0:
        return jnp.zeros_like(q)
    group = n_heads // n_kv
    padded_group = pl.next_power_of_2(group)
    block_q = max(1, _BLOCK_ROWS // padded_group) if block_q is None else block_q
    if block_q & (block_q - 1) or block_q * padded_group < 16:
        raise KernelInputError(f"paged_prefill_attention: block_q must be a power of two with block_q * {padded_group} "
                         f">= 16, got {block_q}")
    block_rows = block_q * padded_group
    kivi = is_kivi(k_scales)
    if kivi and page_size < 16:
        raise KernelInputError(f"paged_prefill_attention: the gpu backend needs KIVI pages of >= 16 tokens, got "
                               f"{page_size}")
    pages_per_block = 1 if kivi else max(1, block_tokens // page_size)  # KIVI: no block straddles `flushed`
    n_blocks = min(n_tokens, pl.cdiv(n_tokens, block_q) + min(batch, n_tokens))  # >= sum_b cdiv(q_len_b, block_q)
    quantized = k_scales is not None

    cu_q_lens = jnp.clip(cu_q_lens, 0, n_tokens)  # keeps every block inside q, whatever cu_q_lens holds
    plan = block_plan(cu_q_lens, lengths, n_blocks, block_q)
    # [K, (T + block_q) * padded group, Dh]: a block's rows are contiguous; block_q spare rows keep reads in bounds
    def rows(q):
        q = q.reshape(n_tokens, n_kv, group, head_dim).transpose(1, 0, 2, 3)
        q = jnp.pad(q, ((0, 0), (0, block_q), (0, padded_group - group), (0, 0)))
        return q.reshape(n_kv, (n_tokens + block_q) * padded_group, head_dim)

    qg = rows(q)

    rows_spec = pl.BlockSpec((None, qg.shape[1], head_dim), lambda j, h: (h, 0, 0))
    pool_spec = kv_head_spec(k_pages)  # int4: Dh / 2 bytes a vector, KIVI Dh x bits / 8
    in_specs = [
        pl.BlockSpec((None, 4), lambda j, h: (j, 0)),
        pl.BlockSpec((batch * pages_per_seq,), lambda j, h: (0,)),
        rows_spec, pool_spec, pool_spec,
    ]
    args = [plan, block_tables.reshape(-1), qg, k_pages, v_pages]
    if quantized:  # int8/fp8 [K, N, S], int4 [K, N, S, Dh / 32], KIVI k [K, N, 2, Dh], v [K, N, S, 2, Dh / 32]
        in_specs += [kv_head_spec(k_scales), kv_head_spec(v_scales)]
        args += [k_scales, v_scales]
    if recent is not None:
        in_specs += [pl.BlockSpec((batch,), lambda j, h: (0,)), kv_head_spec(recent.k), kv_head_spec(recent.v)]
        args += [recent.flushed, recent.k, recent.v]
    if q_sinks is not None:
        in_specs.append(rows_spec)
        args.append(rows(q_sinks))
    kernel = functools.partial(_kernel, scale=scale, softcap=softcap, sinks=sinks, window=window,
                               pages_per_seq=pages_per_seq, pages_per_block=pages_per_block, group=padded_group,
                               block_rows=block_rows, quantized=quantized, ring=recent is not None,
                               sink_queries=q_sinks is not None)
    out = pl.pallas_call(
        kernel,
        grid=(n_blocks, n_kv),
        in_specs=in_specs,
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxkv_paged_prefill_attention",
    )(*args)

    out = out.reshape(n_kv, n_tokens + block_q, padded_group, head_dim)[:, :n_tokens, :group]
    out = out.transpose(1, 0, 2, 3).reshape(q.shape)
    return jnp.where((jnp.arange(n_tokens) < cu_q_lens[-1])[:, None, None], out, 0)  # padding rows: zeros
