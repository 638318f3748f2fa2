"""Ragged paged attention as a Pallas TPU kernel: prefill chunks and decode rows of one step in one call.

Grid (query block, KV head). The packed queries are cut into blocks of `block_q` that never straddle two rows
(`block_plan`, as the Triton prefill kernel does; scalar-prefetched into SMEM with the block tables); JAX gathers
each block's queries into a dense [block_q * group, Dh] tile first, so the kernel sees whole VMEM tiles and no program
writes another's rows, and gathers the outputs back. A program walks only the pages some of its queries can see
(`visible_pages`: the sink pages, then from its first query's window start, or page 0, to its last query's page)
through the decode kernel's double-buffered DMA loop (`attend_pages`), with a causal/window mask per query.
Quantized pages (KIVI's with its residual's ring pages too) are read as the decode kernel reads them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.errors import KernelInputError
from pallas_kernels.paged_attention.reference import block_plan, visible, visible_pages
from pallas_kernels.paged_attention.tpu import attend_pages, hbm_pools

_BLOCK_TOKENS = 128  # KV tokens per loop step, as in the decode kernel
_MAX_BLOCK_Q = 32  # queries per program at most: block_q * group rows of logits [rows, 128] stay small in VMEM


def _kernel(plan_ref, tables_ref, *refs, scale, softcap, sinks, window, pages_per_seq, block_q, n_pools,
            sink_queries):
    """One (query block, KV head): the block's rows (head g of the group, query i at row g * block_q + i)
    attend over the pages the block can see; rows past its real queries (and empty blocks) see nothing. With
    KIVI's residual (n_pools 6) a third scalar-prefetched array, the rows' flushed counts, precedes q;
    `sink_queries`: q_sinks' tile follows q's."""
    flushed_ref, (q_ref, *refs) = (refs[0], refs[1:]) if n_pools == 6 else (None, refs)
    q_sinks_ref, *refs = refs if sink_queries else (None, *refs)
    pools, o_ref, buffers, sems = refs[:n_pools], refs[n_pools], refs[n_pools + 1:-1], refs[-1]
    page_size = pools[0].shape[2]
    block = pl.program_id(0)
    row, n_queries, first_pos = plan_ref[4 * block], plan_ref[4 * block + 2], plan_ref[4 * block + 3]
    n_sink, window_first, n_visible = visible_pages(first_pos, first_pos + n_queries - 1, page_size=page_size,
                                                    pages_per_seq=pages_per_seq, sinks=sinks, window=window)
    query = jax.lax.broadcasted_iota(jnp.int32, (q_ref.shape[0], 1), 0) & (block_q - 1)  # block_q: a power of 2

    def keep(positions):
        return visible(positions, first_pos + query + 1, sinks, window) & (query < n_queries)

    acc, _, l = attend_pages(q_ref[...], pools, buffers, sems, tables_ref, seq=row, head=pl.program_id(1), start=0,
                             stop=n_visible, n_sink=n_sink, window_first=window_first, keep=keep, scale=scale,
                             softcap=softcap, sinks=sinks, pages_per_seq=pages_per_seq,
                             flushed=None if flushed_ref is None else flushed_ref[row],
                             q_sinks=None if q_sinks_ref is None else q_sinks_ref[...])
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)  # a query that sees nothing: zeros


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sinks", "window", "interpret", "max_q_len", "block_q",
                                             "block_tokens"))
def ragged_paged_attention(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, *, k_scales, v_scales, scale, softcap,
                           sinks, window, interpret, max_q_len=None, block_q=None, block_tokens=_BLOCK_TOKENS,
                           recent=None, q_sinks=None):
    """The TPU kernel over (query block, KV head) for q [T, H, Dh] packed by cu_q_lens [R + 1]; see the package.

    block_q (a power of two) defaults to max_q_len rounded up, between 8 (whole sublane tiles) and 32: a decode
    row still fills a block of its own. block_q and block_tokens are tuning knobs the tests shrink so tiny
    inputs run several blocks per row and double-buffered KV blocks. interpret=True runs the kernel on CPU in
    Pallas' TPU interpret mode (which reads uninitialized VMEM as NaN, so stray reads show). recent: KIVI's residual
    (`reference.Recent`), its flushed counts one per row. q_sinks: as q, the queries the sink tokens meet.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv, _, page_size, _ = k_pages.shape
    rows, pages_per_seq = block_tables.shape
    if page_size % 8:
        raise KernelInputError(f"ragged_paged_attention: the tpu backend needs a page_size multiple of 8 (TPU "
                               f"sublane tiles), got {page_size}")
    if block_q is not None and (block_q < 1 or block_q & (block_q - 1)):
        raise KernelInputError(f"ragged_paged_attention: block_q must be a power of two, got {block_q}")
    if n_tokens == 0 or rows == 0:
        return jnp.zeros_like(q)
    block_q = block_q or min(_MAX_BLOCK_Q, max(8, pl.next_power_of_2(max_q_len or n_tokens)))
    group = n_heads // n_kv
    n_blocks = min(n_tokens, pl.cdiv(n_tokens, block_q) + min(rows, n_tokens))  # >= sum_r cdiv(q_len_r, block_q)
    max_visible = (pages_per_seq if window is None
                   else pl.cdiv(sinks, page_size) + pl.cdiv(window + block_q - 1, page_size) + 1)
    pages_per_block = max(1, min(block_tokens // page_size, max_visible))

    cu_q_lens = jnp.clip(cu_q_lens, 0, n_tokens)  # keeps every block inside q, whatever cu_q_lens holds
    plan = block_plan(cu_q_lens, lengths, n_blocks, block_q)  # per block: row, first token, real queries, position
    first = jnp.where(plan[:, 2] > 0, plan[:, 1], n_tokens)  # real blocks in token order, then the empty ones
    tokens = jnp.minimum(first[:, None] + jnp.arange(block_q), n_tokens - 1)
    def tiles(q):  # [blocks, K, G * block_q, Dh]: row g * block_q + i is query i of the block, q head (KV head) * G + g
        q = q[tokens].reshape(n_blocks, block_q, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
        return q.reshape(n_blocks, n_kv, group * block_q, head_dim)

    qb = tiles(q)
    queries = [qb] if q_sinks is None else [qb, tiles(q_sinks)]

    pools = hbm_pools(k_pages, v_pages, k_scales, v_scales, recent, "ragged_paged_attention")
    buffers = [pltpu.VMEM((2, pages_per_block, *pool.shape[2:]), pool.dtype) for pool in pools]
    tile = pl.BlockSpec((None, None, group * block_q, head_dim), lambda j, h, *_: (j, h, 0, 0))
    kernel = functools.partial(_kernel, scale=scale, softcap=softcap, sinks=sinks, window=window,
                               pages_per_seq=pages_per_seq, block_q=block_q, n_pools=len(pools),
                               sink_queries=q_sinks is not None)
    # in SMEM: the flattened block plan and block tables (1-D: 2-D SMEM pads) [, the residual's flushed counts]
    prefetch = [plan.reshape(-1), block_tables.reshape(-1)] + ([recent.flushed] if recent is not None else [])
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(n_blocks, n_kv),
            in_specs=[tile] * len(queries) + [pl.BlockSpec(memory_space=pl.ANY)] * len(pools),
            out_specs=tile,
            scratch_shapes=[*buffers, pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=jax.ShapeDtypeStruct(qb.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxkv_ragged_paged_attention_tpu",
    )(*prefetch, *queries, *pools)

    out = out.reshape(n_blocks, n_kv, group, block_q, head_dim).transpose(0, 3, 1, 2, 4)
    out = out.reshape(n_blocks * block_q, n_heads, head_dim)
    token = jnp.arange(n_tokens)
    mine = jnp.clip(jnp.searchsorted(first, token, side="right") - 1, 0, n_blocks - 1)  # each token's block
    out = out[jnp.clip(mine * block_q + token - first[mine], 0, n_blocks * block_q - 1)]
    return jnp.where((token < cu_q_lens[-1])[:, None, None], out, 0)  # padding rows: zeros
