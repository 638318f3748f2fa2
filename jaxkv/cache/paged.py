"""The paged KV cache, split in two: persistent page pools and the per-step metadata that addresses them.

KV layers fall into page groups (`page_groups`): layers some reader attends to in full keep a full block
table (every position its page); layers all of whose readers attend within a window hold only a ring of the
pages that window needs, so a sliding-window layer's memory does not grow with the sequence (StreamingLLM's
sinks + window is one such ring for every layer). Each group has its own `PagePool`: for its KV layers only
(so CLA and LCKV allocate proportionally fewer), the K/V pages [layers, kv_heads, num_pages + 1, page_size,
head_dim] in the layout of `pallas_kernels.ragged_paged_attention`, their int8 scales, and StreamingLLM's sink
keys as written. Pools live across steps and are donated to each. Page `num_pages` is scratch: no sequence owns
it, block-table columns a sequence has not reserved point at it, so a write past a row's pages (a decode
iteration past its end) lands there harmlessly. `StepMetadata` is built on the host for one step: the packed
tokens' positions, each row's chunk and KV length, and its block table in every group. `PagedKV` pairs pools
and metadata and is what the model reads and writes.
"""

from __future__ import annotations

from typing import ClassVar

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from jaxkv.cache.eviction import add_attention_scores
from jaxkv.cache.kivi import Residual, ring_pages
from jaxkv.cache.quantize import (KIVI, KIVI_PAGE, KIVI_RECENT, KV_DTYPES, SCALED, quantize, quantize_kivi,
                                  storage_dtype, storage_shape)
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.rope import apply_rope, inverse_frequencies
from pallas_kernels.paged_attention.reference import KIVI_GROUP, table_column
from pallas_kernels.ragged_paged_attention import PoolLayer, RaggedMetadata, ragged_paged_attention

__all__ = ["KV_DTYPES", "PageGroup", "PagePool", "PagedKV", "StepMetadata", "page_groups", "streaming_pages"]


@struct.dataclass
class PagePool:
    k_pages: jax.Array
    v_pages: jax.Array
    k_scales: jax.Array | None
    v_scales: jax.Array | None
    sink_keys: jax.Array | None  # float32 [n_kv_layers, max_seqs, sinks, kv_heads, head_dim], as first written
    sinks: int = struct.field(pytree_node=False, default=0)
    # token eviction (`jaxkv.cache.eviction`): float32 [n_kv_layers, kv_heads, max_seqs, slots], the attention
    # each held token of a sequence has received from scoring queries, per sequence row and slot
    scores: jax.Array | None = None
    # KIVI (`jaxkv.cache.kivi`): each sequence's ring of float pages [n_kv_layers, kv_heads, max_seqs x ring + 1,
    # page_size, head_dim] for its tokens not yet flushed (the last page is scratch)
    k_recent: jax.Array | None = None
    v_recent: jax.Array | None = None

    # logical axes (`jaxkv.parallel.rules`): KV heads may split over "model"; pages are one address space
    LOGICAL_AXES: ClassVar[dict[str, PartitionSpec]] = {
        "k_pages": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
        "v_pages": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
        "k_scales": PartitionSpec("layers", "kv_heads", "pages", "page_offset"),
        "v_scales": PartitionSpec("layers", "kv_heads", "pages", "page_offset"),
        "sink_keys": PartitionSpec("layers", "seqs", "sinks", "kv_heads", "head_dim"),
        "scores": PartitionSpec("layers", "kv_heads", "seqs", None),
        "k_recent": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
        "v_recent": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
    }

    @classmethod
    def init(cls, cfg: ModelConfig, num_pages: int, page_size: int, max_seqs: int = 1,
             kv_dtype: str | None = None, n_layers: int | None = None, score_slots: int = 0,
             recent: int = KIVI_RECENT) -> PagePool:
        """num_pages pages for sequences (plus the scratch page) of n_layers KV layers (default all of cfg's);
        max_seqs sequences may keep sink keys, and with score_slots the attention each of their first score_slots
        tokens received (token eviction). KIVI dtypes keep each sequence's `recent` last tokens in float."""
        kv_dtype = kv_dtype or cfg.dtype
        if kv_dtype not in KV_DTYPES:
            raise JaxkvError(f"KV dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        n_layers = cfg.n_kv_layers if n_layers is None else n_layers
        shape = (n_layers, cfg.n_kv_heads, num_pages + 1, page_size)
        sinks = cfg.attention_sinks
        sink_keys = jnp.zeros((n_layers, max_seqs, sinks, cfg.n_kv_heads, cfg.head_dim)) if sinks else None
        scores = jnp.zeros((n_layers, cfg.n_kv_heads, max_seqs, score_slots)) if score_slots else None
        if kv_dtype in KIVI:
            if page_size != KIVI_PAGE or recent % page_size or recent < 0:
                raise JaxkvError(f"KV dtype {kv_dtype} groups keys over pages of {KIVI_PAGE} tokens and keeps a "
                                 f"multiple of them recent: page_size {page_size}, recent {recent}")
            codes = shape + (cfg.head_dim * KIVI[kv_dtype] // 8,)
            ring = (n_layers, cfg.n_kv_heads, max_seqs * ring_pages(recent, page_size) + 1, page_size, cfg.head_dim)
            return cls(jnp.zeros(codes, jnp.uint8), jnp.zeros(codes, jnp.uint8),
                       jnp.zeros(shape[:3] + (2, cfg.head_dim), jnp.bfloat16),
                       jnp.zeros(shape + (2, cfg.head_dim // KIVI_GROUP), jnp.bfloat16), sink_keys=sink_keys,
                       sinks=sinks, scores=scores, k_recent=jnp.zeros(ring, cfg.dtype),
                       v_recent=jnp.zeros(ring, cfg.dtype))
        values, per_scale = storage_shape(kv_dtype, cfg.head_dim)
        scales = (None, None) if per_scale is None else \
            (jnp.zeros(shape + per_scale, jnp.float32), jnp.zeros(shape + per_scale, jnp.float32))
        dtype = storage_dtype(kv_dtype)
        return cls(jnp.zeros(shape + values, dtype), jnp.zeros(shape + values, dtype), *scales, sink_keys=sink_keys,
                   sinks=sinks, scores=scores)

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def num_pages(self) -> int:
        """Pages a sequence may own; page `num_pages` is the scratch page."""
        return self.k_pages.shape[2] - 1

    @property
    def quantized(self) -> bool:
        return self.k_scales is not None

    @property
    def kv_dtype(self) -> str:
        """The KV dtype name the pool was made with (int8, fp8, int4, kivi2, kivi4 or a float dtype)."""
        if self.k_recent is not None:
            bits = 8 * self.k_pages.shape[-1] // self.k_recent.shape[-1]
            return next(name for name, b in KIVI.items() if b == bits)
        return next((name for name, (dtype, *_) in SCALED.items() if self.k_pages.dtype == dtype),
                    str(self.k_pages.dtype))

    def layer(self, index: int) -> PoolLayer:
        """The pages of the pool's index-th layer."""
        pick = (lambda a: None if a is None else a[index])
        return PoolLayer(self.k_pages[index], self.v_pages[index], pick(self.k_scales), pick(self.v_scales),
                         pick(self.k_recent), pick(self.v_recent))

    def put(self, index: int, pages: jax.Array, offsets: jax.Array, **new: jax.Array) -> PagePool:
        """Store `new` (k= and/or v=, [N, kv_heads, head_dim]) at (pages, offsets) [N] of the pool's index-th
        layer, quantizing int8, fp8 and int4; entries whose page is out of range are dropped."""
        heads = jnp.arange(self.k_pages.shape[1])[:, None]
        at = (index, heads, pages[None], offsets[None])
        updates = {}
        for name, x in new.items():
            x = jnp.moveaxis(x, 1, 0)  # [K, N, Dh], indexed (kv layer, head, page, offset)
            if self.quantized:
                x, x_scale = quantize(x, self.kv_dtype)
                updates[f"{name}_scales"] = getattr(self, f"{name}_scales").at[at].set(x_scale, mode="drop")
            pool = getattr(self, f"{name}_pages")
            updates[f"{name}_pages"] = pool.at[at].set(x.astype(pool.dtype), mode="drop")
        return self.replace(**updates)

    def write_kivi(self, index: int, k: jax.Array, v: jax.Array, meta: RaggedMetadata, token_rows: jax.Array,
                   slots: jax.Array, flushes: jax.Array) -> PagePool:
        """KIVI: a step's packed k, v [T, kv_heads, head_dim] (rows `token_rows`, at `slots`) into the index-th
        layer. First the step's flushes (`jaxkv.cache.kivi.Residual.plan`): each page's tokens, from its ring page
        (those cached before the step) or the step's own, quantized into its quantized page; then every new token
        past its row's flushed ones into its ring page, through the table (`meta`: after the step)."""
        n_rows, page_size = meta.kv_lens.shape[0], self.page_size
        row, page, quantized, ring = (flushes[:, i] for i in range(4))
        q_lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
        slot = page[:, None] * page_size + jnp.arange(page_size)[None, :]  # [F, S]
        cached = jnp.take(meta.kv_lens - q_lens, row, mode="clip")[:, None]
        new = jnp.clip(jnp.take(meta.cu_q_lens[:n_rows], row, mode="clip")[:, None] + slot - cached, 0, k.shape[0] - 1)
        old = (slot < cached)[None, :, :, None]
        bits = 8 * self.k_pages.shape[-1] // k.shape[-1]
        real = jnp.arange(slots.shape[0]) < meta.cu_q_lens[-1]
        keep = real & (slots >= meta.flushed[token_rows])
        column = jnp.clip(slots // page_size, 0, meta.block_tables.shape[1] - 1)
        target = jnp.where(keep, meta.block_tables[token_rows, column], self.k_recent.shape[2])  # else dropped
        heads = jnp.arange(self.k_recent.shape[1])[:, None]
        updates = {}
        for name, x in (("k", k), ("v", v)):
            recent = getattr(self, f"{name}_recent")
            tokens = jnp.where(old, jnp.take(recent[index], ring, axis=1, mode="clip").astype(jnp.float32),
                               jnp.moveaxis(x[new], 2, 0).astype(jnp.float32))  # [K, F, S, Dh]
            codes, pairs = quantize_kivi(tokens, bits, keys=name == "k")
            updates[f"{name}_pages"] = getattr(self, f"{name}_pages").at[index, :, quantized].set(
                jnp.moveaxis(codes, 0, 1), mode="drop")
            updates[f"{name}_scales"] = getattr(self, f"{name}_scales").at[index, :, quantized].set(
                jnp.moveaxis(pairs, 0, 1), mode="drop")
            updates[f"{name}_recent"] = recent.at[index, heads, target[None], (slots % page_size)[None]].set(
                jnp.moveaxis(x, 1, 0).astype(recent.dtype), mode="drop")
        return self.replace(**updates)


@dataclasses.dataclass(frozen=True)
class PageGroup:
    """KV layers (indices into the model's KV layers) whose pages follow one policy. ring: the pages per sequence
    when they form a ring that keeps only the recent positions (window layers, StreamingLLM); None: a full block
    table, every position its own page."""

    kv_layers: tuple[int, ...]
    ring: int | None = None

    def pool_pages(self, num_pages: int, pages_per_seq: int) -> int:
        """The pages of this group's pool when full tables get num_pages: as many full-length sequences' worth."""
        return num_pages if self.ring is None else max(self.ring, -(-num_pages * self.ring // pages_per_seq))


def page_groups(cfg: ModelConfig, page_size: int, max_chunk: int, pages_per_seq: int,
                verify: int = 1) -> tuple[PageGroup, ...]:
    """The page groups of a model whose steps feed at most max_chunk tokens of a sequence, on tables of
    pages_per_seq columns; full tables first, then rings by size.

    A KV layer holds only a window's pages when every layer reading it attends within a window: the widest, w,
    decides its ring of cdiv(w + max_chunk - 1, page_size) + 1 pages (the window of a chunk's first query up to
    its last token, however they straddle pages). A ring as wide as the table gains nothing: a full table then.
    StreamingLLM: one ring for every layer (`streaming_pages`), wide enough for the longest chunk that may wrap it,
    `verify` tokens (speculative verification; a prompt ends before the ring wraps)."""
    if cfg.streaming_window is not None:
        return (PageGroup(tuple(range(cfg.n_kv_layers)), streaming_pages(cfg, page_size, verify)),)
    windows: dict[int, list] = {}
    for layer in range(cfg.n_layers):
        windows.setdefault(cfg.kv_index(layer), []).append(cfg.window(layer))
    rings: dict[int | None, list[int]] = {}
    for kv_layer in range(cfg.n_kv_layers):
        seen = windows[kv_layer]
        ring = None if None in seen else -(-(max(seen) + max_chunk - 1) // page_size) + 1
        rings.setdefault(None if ring is None or ring >= pages_per_seq else ring, []).append(kv_layer)
    return tuple(PageGroup(tuple(rings[r]), r) for r in sorted(rings, key=lambda r: (r is not None, r or 0)))


@struct.dataclass
class StepMetadata:
    """One step's packed tokens and rows, built on the host (`pack`; the engine). tokens: T; rows: R.

    attention: per page group, the rows' chunks, KV lengths (after this step) and the group's block tables (the
    chunks and lengths are the same in every group); positions int32 [T]: each token's position in its sequence
    (its RoPE); slots int32 [T]: its place in its row's pages, the same as its position unless tokens were evicted
    before it (`jaxkv.cache.eviction`: the KV lengths count slots); token_rows int32 [T]: its row (padding tokens:
    any, they are dropped); logits_index int32 [R x W]: each row's last W tokens (clamped to the row), whose logits
    are sampled (W > 1: speculative rows verify their proposals, `jaxkv.serve.speculative`); sink_rows
    int32 [R]: the row's sequence's place in the pool (its sink keys and eviction scores); score_weights float32
    [T] or None: how much each token's attention adds to the scores of the tokens it sees (pools that keep them);
    flushes int32 [F, 4] or None: the pages KIVI pools quantize in this step (`jaxkv.cache.kivi.Residual.plan`)."""

    attention: tuple[RaggedMetadata, ...]
    positions: jax.Array
    token_rows: jax.Array
    logits_index: jax.Array
    sink_rows: jax.Array
    slots: jax.Array
    score_weights: jax.Array | None = None
    flushes: jax.Array | None = None

    @property
    def n_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def rows(self) -> RaggedMetadata:
        """The rows' chunks and lengths (those of the first group; every group has the same)."""
        return self.attention[0]

    def advanced(self, i) -> StepMetadata:
        """The metadata of the same rows i tokens further on (decode iteration i of one call: one token a row)."""
        live = (self.rows.cu_q_lens[1:] > self.rows.cu_q_lens[:-1]).astype(jnp.int32)
        return self.replace(positions=self.positions + i, slots=self.slots + i, attention=tuple(
            dataclasses.replace(a, kv_lens=a.kv_lens + live * i) for a in self.attention))

    @classmethod
    def pack(cls, block_tables, cached, n_new, *, n_tokens: int | None = None, max_q_len: int | None = None,
             sink_rows=None, starts=None, score_weights=None, residual: Residual | None = None,
             flushed=None, verify: int = 1) -> StepMetadata:
        """Host metadata of rows whose n_new[r] tokens follow their cached[r] ones, packed in row order.
        block_tables: per page group, int32 [R, W_g] (rows past len(cached) are idle); n_tokens pads the packed
        tokens (default: exact); max_q_len defaults to the longest chunk; sink_rows (default 0..) index the pool's
        sink keys. starts: each row's first new position when it is not cached[r] (a row that evicted tokens
        holds fewer than its position); score_weights: per packed token (`StepMetadata`). residual (KIVI pools,
        one group of full tables): each row's tokens in quantized pages before the step are flushed[r]. verify: the
        tokens at the end of each row whose logits are sampled."""
        tables = [np.asarray(t, np.int32) for t in block_tables]
        n_rows = tables[0].shape[0]
        cached, n_new = np.asarray(cached, np.int32), np.asarray(n_new, np.int32)
        total = int(n_new.sum())
        n_tokens = total if n_tokens is None else n_tokens
        cu_q_lens = np.full(n_rows + 1, total, np.int32)
        cu_q_lens[:len(n_new) + 1] = np.concatenate([[0], np.cumsum(n_new)])
        kv_lens = np.zeros(n_rows, np.int32)
        kv_lens[:len(n_new)] = cached + n_new
        starts = cached if starts is None else np.asarray(starts, np.int32)
        positions, slots, token_rows = (np.zeros(n_tokens, np.int32) for _ in range(3))
        for r, (held, start, n) in enumerate(zip(cached, starts, n_new)):
            positions[cu_q_lens[r]:cu_q_lens[r + 1]] = np.arange(start, start + n)
            slots[cu_q_lens[r]:cu_q_lens[r + 1]] = np.arange(held, held + n)
            token_rows[cu_q_lens[r]:cu_q_lens[r + 1]] = r
        last = np.maximum(cu_q_lens[1:] - 1, 0)[:, None]
        logits_index = np.maximum(last - np.arange(verify)[::-1], np.minimum(cu_q_lens[:-1, None], last)).reshape(-1)
        sinks = np.arange(n_rows, dtype=np.int32)
        if sink_rows is not None:  # idle rows keep their own index: they write nothing
            sinks[:len(sink_rows)] = sink_rows
        max_q_len = max(int(n_new.max(initial=1)), 1) if max_q_len is None else max_q_len
        weights = None
        if score_weights is not None:
            weights = np.zeros(n_tokens, np.float32)
            weights[:total] = np.asarray(score_weights, np.float32)[:total]
        if residual is None:
            return cls(tuple(RaggedMetadata(cu_q_lens, kv_lens, t, max_q_len) for t in tables), positions,
                       token_rows, logits_index, sinks, slots, weights)
        flushed = np.zeros(len(n_new), np.int32) if flushed is None else flushed
        table, flushed, flushes = residual.plan(tables[0], sinks, cached, n_new, flushed, n_tokens)
        return cls((RaggedMetadata(cu_q_lens, kv_lens, table, max_q_len, flushed),), positions, token_rows,
                   logits_index, sinks, slots, weights, flushes)


@struct.dataclass
class PagedKV:
    """The pools as one step sees them: what the model writes new K/V into and attends through. pools[g] holds
    the KV layers groups[g] lists (`page_groups`); a single pool of every KV layer is `PagedKV.whole`. sink_shift
    int32 [T] (`slide_sinks`, rows of several queries): how far each query's sinks lag its row's last query's."""

    pools: tuple[PagePool, ...]
    meta: StepMetadata
    groups: tuple[tuple[int, ...], ...] = struct.field(pytree_node=False)
    sink_shift: jax.Array | None = None

    @classmethod
    def whole(cls, pool: PagePool, meta: StepMetadata) -> PagedKV:
        """One pool for every KV layer, one block table per row."""
        return cls((pool,), meta, (tuple(range(pool.k_pages.shape[0])),))

    def _place(self, kv_layer: int) -> tuple[int, int]:
        """(group, index in its pool) of a KV layer."""
        return next((g, layers.index(kv_layer)) for g, layers in enumerate(self.groups) if kv_layer in layers)

    def positions(self, tokens: jax.Array) -> jax.Array:
        return self.meta.positions[None]

    def write(self, kv_layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, n_new=None) -> PagedKV:
        """k, v [1, T, kv_heads, head_dim] of the packed tokens into their rows' pages (padding tokens dropped);
        a token among the first `sinks` positions also keeps its key as written, for StreamingLLM."""
        group, index = self._place(kv_layer)
        meta, pool = jax.tree.map(jnp.asarray, self.meta), self.pools[group]  # (host arrays: a step built outside jit)
        positions, slots = positions[0], meta.slots
        real = jnp.arange(positions.shape[0]) < meta.rows.cu_q_lens[-1]
        table = meta.attention[group].block_tables
        column = table_column(slots // pool.page_size, table.shape[1], pool.sinks, pool.page_size)
        pages = jnp.where(real, table[meta.token_rows, column], pool.k_pages.shape[2])  # out of range: dropped
        if pool.sinks:
            sink = jnp.where(real & (positions < pool.sinks), positions, pool.sinks)  # others out of range: dropped
            pool = pool.replace(sink_keys=pool.sink_keys.at[index, meta.sink_rows[meta.token_rows], sink].set(
                k[0].astype(jnp.float32), mode="drop"))
        if pool.k_recent is not None:  # KIVI
            pool = pool.write_kivi(index, k[0], v[0], meta.attention[group], meta.token_rows, slots, meta.flushes)
        else:
            pool = pool.put(index, pages, slots % pool.page_size, k=k[0], v=v[0])
        return self.replace(pools=self.pools[:group] + (pool,) + self.pools[group + 1:])

    def attend(self, kv_layer: int, q: jax.Array, positions: jax.Array, *, strict: bool, window: int | None,
               sinks: int, softcap: float | None = None, backend: str = "auto", remat: bool = False,
               inv_freq=None) -> tuple[jax.Array, PagedKV]:
        """q [1, T, H, Dh] over every row's pages (`ragged_paged_attention`), and the cache: a pool that keeps
        scores (token eviction) adds the attention of this step's scoring queries to them. Float pages of another
        dtype than q (bfloat16 KV under float32 compute) take q in their dtype, as a model computing in it would.
        With a sink_shift the sinks meet q rotated on by it (inv_freq: the layer's RoPE)."""
        group, index = self._place(kv_layer)
        pool = self.pools[group]
        dtype = q.dtype if pool.quantized else pool.k_pages.dtype
        q_sinks = None if self.sink_shift is None else apply_rope(q, self.sink_shift[None], inv_freq)[0].astype(dtype)
        out = ragged_paged_attention(q[0].astype(dtype), pool.layer(index), self.meta.attention[group], sinks=sinks,
                                     window=window, softcap=softcap, strict=strict, backend=backend, q_sinks=q_sinks)
        if pool.scores is not None and self.meta.score_weights is not None:
            meta = jax.tree.map(jnp.asarray, self.meta)
            pool = pool.replace(scores=add_attention_scores(pool.scores, index, q[0], pool.layer(index),
                                                            meta.attention[group], meta.sink_rows,
                                                            meta.score_weights, softcap=softcap, strict=strict))
            return out[None].astype(q.dtype), self.replace(pools=self.pools[:group] + (pool,) + self.pools[group + 1:])
        return out[None].astype(q.dtype), self

    def new_votes(self) -> PagedKV:
        """The step's tokens have received no attention yet: their eviction scores start at zero, before any layer
        runs (a layer that writes after another read it, as LCKV's upward sources, must not wipe its votes)."""
        meta, pools = jax.tree.map(jnp.asarray, self.meta), list(self.pools)
        real = jnp.arange(meta.slots.shape[0]) < meta.rows.cu_q_lens[-1]
        for group, pool in enumerate(pools):
            if pool.scores is not None:
                where = jnp.where(real, meta.slots, pool.scores.shape[3])  # padding: out of range, dropped
                pools[group] = pool.replace(scores=pool.scores.at[:, :, meta.sink_rows[meta.token_rows], where].set(
                    0.0, mode="drop"))
        return self.replace(pools=tuple(pools))

    def without_votes(self):
        """(this cache with its queries' votes for eviction off, how to turn them back on): LCKV's passes that
        only refine the KV of upward sources must not vote."""
        weights = self.meta.score_weights
        return (self.replace(meta=self.meta.replace(score_weights=None)),
                lambda kv: kv.replace(meta=kv.meta.replace(score_weights=weights)))

    def advance(self, n_new=None) -> PagedKV:
        return self  # lengths live on the host, in the next step's metadata

    def slide_sinks(self, cfg: ModelConfig) -> PagedKV:
        """StreamingLLM's positions: once tokens between the sinks and the window are gone, the sinks must sit
        right before the window, so their keys (as written) are rotated on by the number evicted. Window keys
        keep their own rotation: a query's distance to them is the same either way. The keys are rotated for
        each row's last query; an earlier query of the row (speculative verification) had fewer evicted, so it
        meets them rotated back: its sink_shift, the difference."""
        meta, pools = jax.tree.map(jnp.asarray, self.meta), list(self.pools)
        shift = None
        if meta.rows.max_q_len > 1:
            kv_lens = meta.rows.kv_lens[meta.token_rows]
            evicted = jnp.maximum(kv_lens - cfg.streaming_window - cfg.streaming_sinks, 0)  # for the row's last
            shift = jnp.clip(kv_lens - 1 - meta.positions, 0, evicted)
        for group, (pool, layers) in enumerate(zip(pools, self.groups)):
            if not pool.sinks:
                continue
            sinks, attention = pool.sinks, meta.attention[group]
            n_rows = attention.kv_lens.shape[0]
            evicted = jnp.maximum(attention.kv_lens - cfg.streaming_window - sinks, 0)  # [R], after this step
            where = jnp.broadcast_to(jnp.arange(sinks, dtype=jnp.int32), (n_rows, sinks))
            column = table_column(where // pool.page_size, attention.block_tables.shape[1], sinks, pool.page_size)
            active = (attention.cu_q_lens[1:] > attention.cu_q_lens[:-1])[:, None]  # idle rows write nothing
            pages = jnp.where(active, jnp.take_along_axis(attention.block_tables, column, axis=1),
                              pool.k_pages.shape[2])
            for index, kv_layer in enumerate(layers):
                rotated = apply_rope(pool.sink_keys[index, meta.sink_rows], jnp.broadcast_to(
                    evicted[:, None], (n_rows, sinks)), inverse_frequencies(cfg, cfg.kv_layers[kv_layer]))
                pool = pool.put(index, pages.reshape(-1), (where % pool.page_size).reshape(-1),
                                k=rotated.reshape(n_rows * sinks, *rotated.shape[2:]))
            pools[group] = pool
        return self.replace(pools=tuple(pools), sink_shift=shift)


def streaming_pages(cfg: ModelConfig, page_size: int, chunk: int = 1) -> int:
    """Pages per sequence under StreamingLLM: the sink pages, then a ring that holds the window of a chunk's first
    query through its last token however they straddle pages (cdiv(window + chunk - 1, page_size) + 1)."""
    return -(-cfg.attention_sinks // page_size) + -(-(cfg.streaming_window + chunk - 1) // page_size) + 1
