"""Decode paged attention as a Pallas TPU kernel: block-sparse online softmax over pages, split-K, then a combine.

The page pools stay in HBM. Each (sequence, KV head, split) program walks its share of the visible pages (the
sink pages, then the window's; never the middle) in blocks of pages_per_block pages, DMA-ing block i+1 into one
half of a double VMEM buffer while it computes on block i in the other (`attend_pages`, which the ragged
kernel shares). Pool page numbers come from the scalar-prefetched lengths and block tables (SMEM), through
the reference's ring `table_column`. Each split writes a partial (acc, max, sum) that JAX combines, as in gpu.py.
Quantized pages are copied as stored: int8/fp8 ones with per-token scales that multiply the logits and
probabilities, int4 ones (two values a byte, a scale per 32 channels) and KIVI ones (2 or 4-bit codes with
bfloat16 (scale, minimum) pairs) dequantized in VMEM. KIVI's residual (`reference.Recent`) adds the ring pages, where
a sequence's positions from its flushed count on live: each page is copied from the pools it is read from only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.errors import KernelInputError
from pallas_kernels.paged_attention.reference import (INT4_GROUP, KIVI_GROUP, MASKED, is_kivi, soft_cap, table_column,
                                                      unpack_bits, unpack_int4, visible, visible_pages)

_BLOCK_TOKENS = 128  # tokens per loop step: one MXU-wide block of keys, and DMAs big enough to hide latency
_MAX_SPLITS = 2  # split-K programs per (sequence, KV head): one long sequence still spans a megacore's 2 cores


def _kernel(lengths_ref, tables_ref, *refs, scale, softcap, sinks, window, pages_per_seq, pages_per_block,
            n_splits, n_pools):
    """One (sequence, KV head, split): `attend_pages` over this split's share of the visible pages.

    The visible pages are numbered 0..n_visible-1 ("logical" pages: the sink pages, then the window's
    pages), so masked-out middles of long sequences are never copied out of HBM. Programs share no state
    (unlike upstream's kernel, which prefetches across grid steps), so every grid axis can be parallel;
    the price is one exposed DMA, the first block's, per program. With KIVI's residual (n_pools 6, `hbm_pools`)
    a third scalar-prefetched array, the sequences' flushed counts, precedes q.
    """
    flushed_ref, (q_ref, *refs) = (refs[0], refs[1:]) if n_pools == 6 else (None, refs)
    pools, (acc_ref, m_ref, l_ref), buffers, sems = (refs[:n_pools], refs[n_pools:n_pools + 3],
                                                     refs[n_pools + 3:-1], refs[-1])
    page_size = pools[0].shape[2]
    b = pl.program_id(0)
    length = lengths_ref[b]

    n_sink, window_first, n_visible = visible_pages(length - 1, length - 1, page_size=page_size,
                                                    pages_per_seq=pages_per_seq, sinks=sinks, window=window)
    per_split = pl.cdiv(pl.cdiv(n_visible, n_splits), pages_per_block) * pages_per_block
    start = pl.program_id(2) * per_split
    acc_ref[...], m_ref[...], l_ref[...] = attend_pages(
        q_ref[...], pools, buffers, sems, tables_ref, seq=b, head=pl.program_id(1), start=start,
        stop=jnp.minimum(start + per_split, n_visible), n_sink=n_sink, window_first=window_first,
        keep=lambda positions: visible(positions, length, sinks, window), scale=scale, softcap=softcap, sinks=sinks,
        pages_per_seq=pages_per_seq, flushed=None if flushed_ref is None else flushed_ref[b])


def hbm_pools(k_pages, v_pages, k_scales, v_scales, recent, name):
    """The arrays `attend_pages` copies pages of (in this order): k, v pages [, their scales] [, KIVI's recent k, v
    pages (`reference.Recent`), whose flushed counts the kernels prefetch]."""
    if recent is not None and not is_kivi(k_scales):
        raise KernelInputError(f"{name}: recent pages come with KIVI pages only")
    return ([k_pages, v_pages] + ([k_scales, v_scales] if k_scales is not None else [])
            + ([recent.k, recent.v] if recent is not None else []))


def attend_pages(q, pools, buffers, sems, tables_ref, *, seq, head, start, stop, n_sink, window_first, keep, scale,
                 softcap, sinks, pages_per_seq, flushed=None, q_sinks=None):
    """Online softmax of the rows q [R, Dh] over logical pages start..stop-1 of sequence `seq`'s table, in blocks of
    the buffers' pages; returns float32 (acc [R, Dh], max [R, 1], sum [R, 1]). Shared by the decode and the ragged
    kernels: they differ only in which pages they walk and in keep(positions [1, block_k]) -> [R or 1, block_k].

    Logical page i is page i below n_sink (the sinks), page i - n_sink + window_first from there. pools (k, v
    [, k scales, v scales] [, ring k, v], in HBM: `hbm_pools`) are DMA-ed into one half of the double VMEM buffers
    while the other is computed on; sems holds one DMA semaphore per half (a block waits for all its copies before
    reading any).
    int4 pools (uint8 bytes [.., S, Dh / 2], scales [.., S, Dh / INT4_GROUP]) are copied packed and dequantized
    in VMEM (`_dequantized_int4`), as are KIVI ones (`_dequantized_kivi`). With KIVI's residual, flushed is the
    sequence's flushed count: a page before it is read from the quantized pools, one from it on from the ring pages
    the same table entry names (clipped into each array, as the reference gathers). q_sinks [R, Dh]: the rows the
    sink positions meet instead of q (StreamingLLM's rows of several queries; both products run on every block).
    """
    quantized = len(pools) >= 4
    kivi = quantized and is_kivi(pools[2])
    int4 = pools[0].dtype == jnp.uint8 and not kivi
    _, n_pages, page_size, _ = pools[0].shape
    head_dim = q.shape[-1]
    pages_per_block = buffers[0].shape[1]
    block_k = pages_per_block * page_size
    n_blocks = pl.cdiv(jnp.maximum(stop - start, 0), pages_per_block)

    def page_of(logical):
        """The sequence page (= position // page_size) of a logical page."""
        return jnp.where(logical < n_sink, logical, logical - n_sink + window_first)

    def in_pool(logical):
        """Whether KIVI logical pages are read from the quantized pools (before `flushed`), not the ring pages."""
        return page_of(logical) * page_size < flushed

    def copies(block):
        """The DMAs of a block's pages (and scales) into its buffer half, per page (whether the page is read from
        the quantized pools (None: no residual), their DMAs, the ring pages' DMAs). A last block's tail past `stop`
        re-reads logical page stop - 1, so every buffer row that is read holds visible pool data (masked below)."""
        half = block % 2
        out = []
        for j in range(pages_per_block):
            logical = jnp.minimum(start + block * pages_per_block + j, stop - 1)
            column = table_column(page_of(logical), pages_per_seq, sinks, page_size)
            entry = tables_ref[seq * pages_per_seq + column]
            pages = [jnp.clip(entry, 0, n_pages - 1)] * min(len(pools), 4)  # never outside the pool
            if flushed is not None:  # nor outside the ring pages
                pages += [jnp.clip(entry, 0, pools[4].shape[1] - 1)] * 2
            dmas = [pltpu.make_async_copy(pool.at[head, page], buffer.at[half, j], sems.at[half])
                    for pool, buffer, page in zip(pools, buffers, pages)]
            out.append((None, dmas, []) if flushed is None else (in_pool(logical), dmas[:4], dmas[4:]))
        return out

    def run(block, method):
        """Starts (method "start") or waits for a block's DMAs: those of a page's source only, under the same
        condition both times, so every wait has its copy (the other source's buffer rows are never selected)."""
        def each(dmas):
            for dma in dmas:
                getattr(dma, method)()

        for from_pool, dmas, ring_dmas in copies(block):
            if from_pool is None:
                each(dmas)
            else:
                jax.lax.cond(from_pool, lambda: each(dmas), lambda: each(ring_dmas))

    def merged(buffer, half, dtype):
        """A K/V buffer half [pages, S, Dh] as one block [pages * S, Dh]: via float32, where merging pages is
        a free reshape whenever page_size is a multiple of 8 (bf16 and int8 tiles are 16 and 32 rows)."""
        return buffer[half].astype(jnp.float32).reshape(block_k, head_dim).astype(dtype)

    compute_dtype = q.dtype if quantized else pools[0].dtype

    def block_values(which, half, from_pool):
        """Buffer half `half` of K (which 0) or V (1) as values [block_k, Dh] in compute_dtype, and the per-token
        scales [1, block_k] that the logits (K) or probabilities (V) take instead (int8, fp8; else None). KIVI
        rows where from_pool [block_k, 1] (None: all) is false are the ring pages' instead: a select, so
        whatever the unused source's buffer holds (NaN in interpret mode) never reaches the output."""
        if kivi:
            values = _dequantized_kivi(buffers[which][half], buffers[which + 2][half], compute_dtype, keys=which == 0)
            if from_pool is None:
                return values, None
            return jnp.where(from_pool, values, merged(buffers[which + 4], half, compute_dtype)), None
        if int4:
            return _dequantized_int4(buffers[which][half], buffers[which + 2][half], compute_dtype), None
        scales = buffers[which + 2][half].reshape(1, block_k) if quantized else None  # as a row
        return merged(buffers[which], half, compute_dtype), scales

    def body(i, carry):
        acc, m, l = carry

        @pl.when(i + 1 < n_blocks)
        def _prefetch():  # in flight while block i is computed
            run(i + 1, "start")

        run(i, "wait")
        half = i % 2
        tokens = jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        logical = start + i * pages_per_block + tokens // page_size
        positions = page_of(logical) * page_size + tokens % page_size
        seen = keep(positions) & (logical < stop)
        from_pool = None
        if flushed is not None:  # per row of K and V: the source `copies` copied the row's page from
            token_rows = jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            from_pool = in_pool(jnp.minimum(start + i * pages_per_block + token_rows // page_size, stop - 1))

        k, k_scales = block_values(0, half, from_pool)
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if q_sinks is not None:
            logits = jnp.where(positions < sinks, jax.lax.dot_general(
                q_sinks, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32), logits)
        if k_scales is not None:
            logits *= k_scales
        logits = jnp.where(seen, soft_cap(logits * scale, softcap), MASKED)
        m_next = jnp.maximum(m, logits.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m - m_next)
        p = jnp.where(seen, jnp.exp(logits - m_next), 0.0)
        l_next = alpha * l + p.sum(axis=-1, keepdims=True)
        v, v_scales = block_values(1, half, from_pool)
        if v_scales is not None:
            p *= v_scales
        acc_next = alpha * acc + jnp.dot(p.astype(compute_dtype), v, preferred_element_type=jnp.float32)
        return acc_next, m_next, l_next

    @pl.when(n_blocks > 0)
    def _first_fetch():
        run(0, "start")

    rows = q.shape[0]
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), MASKED, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
    return jax.lax.fori_loop(0, n_blocks, body, init)


def _dequantized_int4(packed, scales, dtype):
    """An int4 buffer half as values [pages * S, Dh] in dtype, as the reference's `dequantize` computes them: bytes
    packed uint8 [pages, S, Dh / 2] unpacked by `unpack_int4`, each channel times its group's scale from scales
    float32 [pages, S, Dh / INT4_GROUP]. Pages merge in 32 bits (free for page_size a multiple of 8)."""
    tokens = packed.shape[0] * packed.shape[1]
    values = unpack_int4(packed.astype(jnp.int32).reshape(tokens, packed.shape[2])).astype(jnp.float32)
    scales = scales.reshape(tokens, scales.shape[2])
    return (values * _per_channel(scales, values.shape[1], INT4_GROUP)).astype(dtype)


def _dequantized_kivi(packed, pairs, dtype, *, keys):
    """A KIVI buffer half as values [pages * S, Dh] in dtype, as the reference's `dequantize` computes them (code x
    scale + minimum, in float32): codes packed uint8 [pages, S, Dh * bits / 8] unpacked by `unpack_bits` as int4
    bytes are. Keys (`keys`) take their page's pairs [pages, 2, Dh] (scale row, minimum row) by a sublane
    broadcast; values their token's pairs [pages, S, 2, Dh / KIVI_GROUP], a group's reaching its channels as int4
    scales do. Pages merge and split in 32 bits only (free for page_size a multiple of 8)."""
    pages, page_size, n_bytes = packed.shape
    pairs = pairs.astype(jnp.float32)
    head_dim = pairs.shape[-1] if keys else pairs.shape[-1] * KIVI_GROUP
    codes = unpack_bits(packed.astype(jnp.int32).reshape(pages * page_size, n_bytes), 8 * n_bytes // head_dim)
    codes = codes.astype(jnp.float32)
    if keys:
        values = codes.reshape(pages, page_size, head_dim) * pairs[:, 0:1] + pairs[:, 1:2]
    else:
        pairs = pairs.reshape(pages * page_size, 2, pairs.shape[-1])
        values = (codes * _per_channel(pairs[:, 0], head_dim, KIVI_GROUP)
                  + _per_channel(pairs[:, 1], head_dim, KIVI_GROUP))
    return values.reshape(pages * page_size, head_dim).astype(dtype)


def _per_channel(groups, head_dim, group):
    """Per-token columns, one per `group` channels, groups [T, Dh / group], as [T, Dh] (or [T, 1] for one group):
    group g's column reaches its channels by a lane broadcast and a select, so no reshape splits the lanes."""
    channel = jax.lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
    per_channel = groups[:, :1]
    for g in range(1, groups.shape[1]):
        per_channel = jnp.where(channel >= g * group, groups[:, g:g + 1], per_channel)
    return per_channel


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sinks", "window", "interpret", "block_tokens",
                                             "max_splits"))
def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales, v_scales, scale, softcap, sinks, window,
                    interpret, block_tokens=_BLOCK_TOKENS, max_splits=_MAX_SPLITS, recent=None):
    """The TPU kernel over (sequence, KV head, split), then the partial (acc, max, sum) of splits combined.

    block_tokens and max_splits are tuning knobs: the tests shrink them so tiny inputs still run several
    double-buffered blocks and splits. interpret=True runs the kernel on CPU in Pallas' TPU interpret mode,
    which simulates the DMAs and semaphores (uninitialized VMEM reads as NaN there, so stray reads show).
    recent: KIVI's residual (`reference.Recent`), its flushed counts one per sequence.
    """
    batch, n_heads, head_dim = q.shape
    n_kv, _, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    if page_size % 8:
        raise KernelInputError(f"paged_attention: the tpu backend needs a page_size multiple of 8 (TPU sublane tiles), "
                         f"got {page_size}")
    group = n_heads // n_kv
    padded_group = -(-group // 8) * 8  # whole (8, 128) tiles for q and the accumulator
    max_visible = (pages_per_seq if window is None
                   else pl.cdiv(sinks, page_size) + pl.cdiv(window, page_size) + 1)
    pages_per_block = max(1, min(block_tokens // page_size, max_visible))
    n_splits = max(1, min(max_splits, pl.cdiv(max_visible, pages_per_block)))

    qg = jnp.pad(q.reshape(batch, n_kv, group, head_dim), ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))
    pools = hbm_pools(k_pages, v_pages, k_scales, v_scales, recent, "paged_attention")
    buffers = [pltpu.VMEM((2, pages_per_block, *pool.shape[2:]), pool.dtype) for pool in pools]

    def partial_spec(*tail):
        return pl.BlockSpec((None, None, None, *tail), lambda b, h, s, *_: (b, h, s, 0, 0))

    partial_shape = (batch, n_kv, n_splits, padded_group)
    # in SMEM: lengths, the flattened block tables [, the residual's flushed counts]
    prefetch = [lengths, block_tables.reshape(-1)] + ([recent.flushed] if recent is not None else [])
    kernel = functools.partial(_kernel, scale=scale, softcap=softcap, sinks=sinks, window=window,
                               pages_per_seq=pages_per_seq, pages_per_block=pages_per_block, n_splits=n_splits,
                               n_pools=len(pools))
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, n_kv, n_splits),
            in_specs=[pl.BlockSpec((None, None, padded_group, head_dim), lambda b, h, s, *_: (b, h, 0, 0)),
                      *[pl.BlockSpec(memory_space=pl.ANY)] * len(pools)],
            out_specs=[partial_spec(padded_group, head_dim), partial_spec(padded_group, 1),
                       partial_spec(padded_group, 1)],
            # one DMA semaphore per buffer half: a block waits for all its copies before reading any
            scratch_shapes=[*buffers, pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=[jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((*partial_shape, 1), jnp.float32),
                   jax.ShapeDtypeStruct((*partial_shape, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jaxkv_paged_attention_tpu",
    )(*prefetch, qg, *pools)

    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # rescale every split to the common max
    total = (l * weight).sum(axis=2)
    out = (acc * weight).sum(axis=2) / jnp.where(total > 0, total, 1.0)  # length 0: zeros
    return out[:, :, :group].reshape(q.shape).astype(q.dtype)
