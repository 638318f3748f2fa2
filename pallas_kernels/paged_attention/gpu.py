"""Decode paged attention as a Pallas Triton kernel: block-sparse online softmax over pages, split-K, then a combine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.errors import KernelInputError
from pallas_kernels.paged_attention.reference import (INT4_GROUP, KIVI_GROUP, MASKED, is_kivi, soft_cap, table_column,
                                                       visible, visible_pages)

_BLOCK_TOKENS = 32  # tokens per loop step: Triton's dot wants every dimension >= 16
_MAX_SPLITS = 8  # split-K programs per (sequence, KV head), so short batches still fill the GPU


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, *refs, scale, softcap, sinks, window, pages_per_block,
            n_splits, quantized, ring):
    """One (sequence, KV head, split): loop over this split's share of the pages the query can see.

    The visible pages are numbered 0..n_visible-1 ("logical" pages: the sink pages, then the window's
    pages), so masked-out middles of long sequences are never loaded. With KIVI's recent pages (`ring`: the
    row's flushed count and the float pages k/v_recent) the split's pages before flushed // page_size come from
    the pool and the rest from k/v_recent, in two loops: each page is loaded once, from where it lives.
    """
    k_scales_ref, v_scales_ref, *refs = refs if quantized else (None, None, *refs)
    flushed_ref, k_recent_ref, v_recent_ref, acc_ref, m_ref, l_ref = refs if ring else (None, None, None, *refs)
    page_size = k_ref.shape[1]
    head_dim = q_ref.shape[-1]
    pages_per_seq = tables_ref.shape[0]
    block_k = pages_per_block * page_size
    length = lengths_ref[0]

    n_sink, window_first, n_visible = visible_pages(length - 1, length - 1, page_size=page_size,
                                                    pages_per_seq=pages_per_seq, sinks=sinks, window=window)
    per_split = pl.cdiv(pl.cdiv(n_visible, n_splits), pages_per_block) * pages_per_block
    start = pl.program_id(2) * per_split
    stop = jnp.minimum(start + per_split, n_visible)

    q = q_ref[...]
    compute_dtype = q.dtype if quantized else k_ref.dtype

    def attend(carry, lo, hi, pool):
        """The online softmax over the logical pages lo..hi-1, read from pool = (k, v, k_scales, v_scales) refs."""
        def body(i, carry):
            logical = lo + i * pages_per_block + jnp.arange(pages_per_block)
            seen = jnp.minimum(logical, n_visible - 1)  # the tail of the last block re-reads a visible page, masked
            page = jnp.where(seen < n_sink, seen, seen - n_sink + window_first)  # position // page_size
            column = table_column(page, pages_per_seq, sinks, page_size)  # past the table: the window's ring
            pages = jnp.clip(tables_ref[column], 0, pool[0].shape[0] - 1)  # never outside the pool, whatever the table
            positions = (page[:, None] * page_size + jnp.arange(page_size)[None, :]).reshape(block_k)
            in_split = jnp.broadcast_to((logical < hi)[:, None], (pages_per_block, page_size)).reshape(block_k)
            keep = (visible(positions, length, sinks, window) & in_split)[None, :]
            return attend_pages(carry, q, *pool, pages, keep, scale=scale, softcap=softcap,
                                compute_dtype=compute_dtype)

        return jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(hi - lo, 0), pages_per_block), body, carry)

    group = q.shape[0]
    init = (jnp.zeros((group, head_dim), jnp.float32), jnp.full((group,), MASKED, jnp.float32),
            jnp.zeros((group,), jnp.float32))
    pool = (k_ref, v_ref, k_scales_ref, v_scales_ref)
    if ring:  # KIVI has no window, so logical pages are pages; a block is one page (pages_per_block 1)
        first_recent = jnp.clip(flushed_ref[0] // page_size, start, stop)
        carry = attend(init, start, first_recent, pool)
        acc, m, l = attend(carry, first_recent, stop, (k_recent_ref, v_recent_ref, None, None))
    else:
        acc, m, l = attend(init, start, stop, pool)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def attend_pages(carry, q, k_ref, v_ref, k_scales_ref, v_scales_ref, pages, keep, *, scale, softcap, compute_dtype,
                 used=None, sinks=None):
    """One online-softmax step of the rows q [R, Dh] over the pool pages `pages` (block_k tokens together):
    carry (acc [R, Dh], max [R], sum [R]) in float32; keep [R or 1, block_k] masks the logits; int8/fp8 scales
    (refs or None) apply to the logits and to p, int4 and KIVI pages are dequantized as they load. `used`
    [block_k], when given, zeroes V (and its scales) where no row looks, so stale or NaN places of a loaded page
    cannot reach the output through 0 * NaN. sinks: (q_sinks [R, Dh], is_sink [block_k]): the sink tokens meet
    q_sinks instead of q (StreamingLLM's rows of several queries)."""
    acc, m, l = carry
    block_k, head_dim = keep.shape[-1], q.shape[-1]
    per_token = k_scales_ref is not None and k_ref.dtype != jnp.uint8  # int4, KIVI: _load_tokens applies scales
    k = _load_tokens(k_ref, k_scales_ref, pages, block_k, head_dim, keys=True).astype(compute_dtype)
    logits = plgpu.dot(q, k, trans_b=True)  # [R, block_k] float32
    if sinks is not None:
        logits = jnp.where(sinks[1][None, :], plgpu.dot(sinks[0], k, trans_b=True), logits)
    if per_token:
        logits *= k_scales_ref[pages].reshape(1, block_k)
    logits = jnp.where(keep, soft_cap(logits * scale, softcap), MASKED)
    m_next = jnp.maximum(m, logits.max(axis=-1))
    alpha = jnp.exp(m - m_next)
    p = jnp.where(keep, jnp.exp(logits - m_next[:, None]), 0.0)
    l_next = alpha * l + p.sum(axis=-1)
    v = _load_tokens(v_ref, v_scales_ref, pages, block_k, head_dim).astype(compute_dtype)
    if per_token:
        v_scales = v_scales_ref[pages].reshape(block_k)
        p *= (v_scales if used is None else jnp.where(used, v_scales, 0.0))[None, :]
    if used is not None:
        v = jnp.where(used[:, None], v, 0)
    return alpha[:, None] * acc + plgpu.dot(p.astype(compute_dtype), v), m_next, l_next


def _load_tokens(ref, scales_ref, pages, block_k, head_dim, *, keys=False):
    """The block_k tokens [block_k, Dh] of the pool pages `pages`: float, int8 and fp8 pages as stored (their
    per-token scales apply to the logits and to p); uint8 pages dequantized in float32 as reference.dequantize:
    int4 ([..., Dh / 2]: byte i holds channel i in its low nibble, channel Dh / 2 + i in its high one, 4-bit two's
    complement) times their scales [..., Dh / INT4_GROUP]; KIVI codes (reference.unpack_bits) times a scale plus a
    minimum, keys' (`keys`) per page and channel ([N, 2, Dh]: a page's tokens share them), values' per token and
    KIVI_GROUP channels ([N, S, 2, Dh / KIVI_GROUP])."""
    if ref.dtype != jnp.uint8:
        return ref[pages].reshape(block_k, head_dim)
    b = ref[pages].reshape(block_k, ref.shape[-1]).astype(jnp.int32)
    if not is_kivi(scales_ref):
        values = _channels([((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8], block_k, head_dim)
        return values * _grouped(scales_ref[pages], INT4_GROUP, block_k, head_dim)
    bits = 8 * ref.shape[-1] // head_dim
    codes = _channels([(b >> (j * bits)) & ((1 << bits) - 1) for j in range(8 // bits)], block_k, head_dim)
    if keys:
        per_page = (pages.shape[0], ref.shape[1], head_dim)
        scale, minimum = (jnp.broadcast_to(scales_ref[pages, i].astype(jnp.float32)[:, None, :], per_page)
                          .reshape(block_k, head_dim) for i in (0, 1))
    else:
        scale, minimum = (_grouped(scales_ref[pages, :, i].astype(jnp.float32), KIVI_GROUP, block_k, head_dim)
                          for i in (0, 1))
    return codes * scale + minimum


def _channels(pieces, block_k, head_dim):
    """Float32 tokens [block_k, Dh] from the pieces [block_k, n] that hold their channels j n .. (j + 1) n - 1
    (j = 0, 1, ...: a power of two of them). Triton stacks only two pieces at once: pieces j and j + half are
    stacked until one [block_k, n, 2, ...] is left, whose transpose puts j first, so that a reshape orders them."""
    while len(pieces) > 1:
        half = len(pieces) // 2
        pieces = [jnp.stack([pieces[j], pieces[j + half]], axis=-1) for j in range(half)]
    values = pieces[0]
    return values.transpose(0, *range(2, values.ndim), 1).reshape(block_k, head_dim).astype(jnp.float32)


def _grouped(scales, group, block_k, head_dim):
    """Per-token scales [..., Dh / group] (block_k tokens) spread over their groups of `group` channels."""
    groups = head_dim // group
    return jnp.broadcast_to(scales.reshape(block_k, groups, 1), (block_k, groups, group)).reshape(block_k, head_dim)


def kv_head_spec(x):
    """x [K, ...] for grids whose second axis is the KV head (this kernel's, paged_prefill's): that head's x whole."""
    return pl.BlockSpec((None, *x.shape[1:]), lambda *grid: (grid[1],) + (0,) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "sinks", "window", "interpret"))
def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales, v_scales, scale, softcap, sinks, window,
                    interpret, recent=None):
    """The Triton kernel over (sequence, KV head, split), then the partial (acc, max, sum) of splits combined."""
    batch, n_heads, head_dim = q.shape
    n_kv, n_pages, page_size, _ = k_pages.shape
    pages_per_seq = block_tables.shape[1]
    for name, size in (("page_size", page_size), ("head_dim", head_dim)):
        if size & (size - 1):
            raise KernelInputError(f"paged_attention: the gpu backend needs a power-of-two {name}, got {size}")
    group = n_heads // n_kv
    padded_group = max(16, pl.next_power_of_2(group))  # Triton's dot and loads want powers of two >= 16
    kivi = is_kivi(k_scales)
    if kivi and page_size < 16:
        raise KernelInputError(f"paged_attention: the gpu backend needs KIVI pages of >= 16 tokens, got {page_size}")
    pages_per_block = 1 if kivi else max(1, _BLOCK_TOKENS // page_size)  # KIVI: no block straddles `flushed`
    n_splits = min(_MAX_SPLITS, pl.cdiv(pages_per_seq, pages_per_block))
    quantized = k_scales is not None

    qg = jnp.pad(q.reshape(batch, n_kv, group, head_dim), ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))
    pool_spec = kv_head_spec(k_pages)  # int4: Dh / 2 bytes a vector, KIVI Dh x bits / 8
    in_specs = [
        pl.BlockSpec((1,), lambda b, h, s: (b,)),
        pl.BlockSpec((None, pages_per_seq), lambda b, h, s: (b, 0)),
        pl.BlockSpec((None, None, padded_group, head_dim), lambda b, h, s: (b, h, 0, 0)),
        pool_spec, pool_spec,
    ]
    args = [lengths, block_tables, qg, k_pages, v_pages]
    if quantized:  # int8/fp8 [K, N, S], int4 [K, N, S, Dh / 32], KIVI k [K, N, 2, Dh], v [K, N, S, 2, Dh / 32]
        in_specs += [kv_head_spec(k_scales), kv_head_spec(v_scales)]
        args += [k_scales, v_scales]
    if recent is not None:
        in_specs += [pl.BlockSpec((1,), lambda b, h, s: (b,)), kv_head_spec(recent.k), kv_head_spec(recent.v)]
        args += [recent.flushed, recent.k, recent.v]
    partial_shape = (batch, n_kv, n_splits, padded_group)
    kernel = functools.partial(_kernel, scale=scale, softcap=softcap, sinks=sinks, window=window,
                               pages_per_block=pages_per_block, n_splits=n_splits, quantized=quantized,
                               ring=recent is not None)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, n_kv, n_splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, padded_group, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, padded_group), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, padded_group), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxkv_paged_attention",
    )(*args)

    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # rescale every split to the common max
    total = (l * weight).sum(axis=2)
    out = (acc * weight[..., None]).sum(axis=2) / jnp.where(total > 0, total, 1.0)[..., None]  # length 0: zeros
    return out[:, :, :group].reshape(q.shape).astype(q.dtype)
