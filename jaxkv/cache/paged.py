"""The paged KV cache, split in two: a persistent page pool and the per-step metadata that addresses it.

`PagePool` holds, for every KV-producing layer only (so CLA and LCKV allocate proportionally fewer), the
K/V pages [n_kv_layers, kv_heads, num_pages + 1, page_size, head_dim] in the layout of
`pallas_kernels.ragged_paged_attention`, their int8 scales, and StreamingLLM's sink keys as written. It lives
across steps and is donated to each. Page `num_pages` is scratch: no sequence owns it, block-table columns a
sequence has not reserved point at it, so a write past a row's pages (a decode iteration past its end) lands
there harmlessly. `StepMetadata` is built on the host for one step: the packed tokens' positions, each row's
chunk, KV length and block table. `PagedKV` pairs the two and is what the model reads and writes.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from jaxkv.config import DTYPES, ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.rope import apply_rope, inverse_frequencies
from pallas_kernels.paged_attention.reference import table_column
from pallas_kernels.ragged_paged_attention import PoolLayer, RaggedMetadata, ragged_paged_attention

KV_DTYPES = DTYPES + ("int8",)


@struct.dataclass
class PagePool:
    k_pages: jax.Array
    v_pages: jax.Array
    k_scales: jax.Array | None
    v_scales: jax.Array | None
    sink_keys: jax.Array | None  # float32 [n_kv_layers, max_seqs, sinks, kv_heads, head_dim], as first written
    sinks: int = struct.field(pytree_node=False, default=0)

    # logical axes (`jaxkv.parallel.rules`): KV heads may split over "model"; pages are one address space
    LOGICAL_AXES: ClassVar[dict[str, PartitionSpec]] = {
        "k_pages": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
        "v_pages": PartitionSpec("layers", "kv_heads", "pages", "page_offset", "head_dim"),
        "k_scales": PartitionSpec("layers", "kv_heads", "pages", "page_offset"),
        "v_scales": PartitionSpec("layers", "kv_heads", "pages", "page_offset"),
        "sink_keys": PartitionSpec("layers", "seqs", "sinks", "kv_heads", "head_dim"),
    }

    @classmethod
    def init(cls, cfg: ModelConfig, num_pages: int, page_size: int, max_seqs: int = 1,
             kv_dtype: str | None = None) -> PagePool:
        """num_pages pages for sequences (plus the scratch page); max_seqs sequences may keep sink keys."""
        kv_dtype = kv_dtype or cfg.dtype
        if kv_dtype not in KV_DTYPES:
            raise JaxkvError(f"KV dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        shape = (cfg.n_kv_layers, cfg.n_kv_heads, num_pages + 1, page_size, cfg.head_dim)
        scales = (jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape[:-1], jnp.float32)) \
            if kv_dtype == "int8" else (None, None)
        sinks = cfg.attention_sinks
        sink_keys = jnp.zeros((cfg.n_kv_layers, max_seqs, sinks, cfg.n_kv_heads, cfg.head_dim)) if sinks else None
        return cls(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype), *scales, sink_keys=sink_keys, sinks=sinks)

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

    def layer(self, kv_layer: int) -> PoolLayer:
        pick = (lambda a: None if a is None else a[kv_layer])
        return PoolLayer(self.k_pages[kv_layer], self.v_pages[kv_layer], pick(self.k_scales), pick(self.v_scales))

    def put(self, kv_layer: int, pages: jax.Array, offsets: jax.Array, **new: jax.Array) -> PagePool:
        """Store `new` (k= and/or v=, [N, kv_heads, head_dim]) at (pages, offsets) [N] of one KV layer, quantizing
        int8; entries whose page is out of range are dropped."""
        heads = jnp.arange(self.k_pages.shape[1])[:, None]
        at = (kv_layer, heads, pages[None], offsets[None])
        updates = {}
        for name, x in new.items():
            x = jnp.moveaxis(x, 1, 0)  # [K, N, Dh], indexed (kv layer, head, page, offset)
            if self.quantized:
                x, x_scale = quantize_int8(x)
                updates[f"{name}_scales"] = getattr(self, f"{name}_scales").at[at].set(x_scale, mode="drop")
            pool = getattr(self, f"{name}_pages")
            updates[f"{name}_pages"] = pool.at[at].set(x.astype(pool.dtype), mode="drop")
        return self.replace(**updates)


@struct.dataclass
class StepMetadata:
    """One step's packed tokens and rows, built on the host (`pack`; the engine). tokens: T; rows: R.

    attention: the rows' chunks, KV lengths (after this step) and block tables; positions int32 [T]: each
    token's position in its sequence; token_rows int32 [T]: its row (padding tokens: any, they are dropped);
    logits_index int32 [R]: each row's last token, whose logits are sampled; sink_rows int32 [R]: where each
    row's sink keys live in the pool."""

    attention: RaggedMetadata
    positions: jax.Array
    token_rows: jax.Array
    logits_index: jax.Array
    sink_rows: jax.Array

    @property
    def n_tokens(self) -> int:
        return self.positions.shape[0]

    @classmethod
    def pack(cls, block_tables, cached, n_new, *, n_tokens: int | None = None, max_q_len: int | None = None,
             sink_rows=None) -> StepMetadata:
        """Host metadata of rows whose n_new[r] tokens follow their cached[r] ones, packed in row order.
        block_tables [R, W] (rows past len(cached) are idle); n_tokens pads the packed tokens (default: exact);
        max_q_len defaults to the longest chunk; sink_rows (default 0..) index the pool's sink keys."""
        tables = np.asarray(block_tables, np.int32)
        n_rows = tables.shape[0]
        cached, n_new = np.asarray(cached, np.int32), np.asarray(n_new, np.int32)
        total = int(n_new.sum())
        n_tokens = total if n_tokens is None else n_tokens
        cu_q_lens = np.full(n_rows + 1, total, np.int32)
        cu_q_lens[:len(n_new) + 1] = np.concatenate([[0], np.cumsum(n_new)])
        kv_lens = np.zeros(n_rows, np.int32)
        kv_lens[:len(n_new)] = cached + n_new
        positions, token_rows = np.zeros(n_tokens, np.int32), np.zeros(n_tokens, np.int32)
        for r, (start, n) in enumerate(zip(cached, n_new)):
            positions[cu_q_lens[r]:cu_q_lens[r + 1]] = np.arange(start, start + n)
            token_rows[cu_q_lens[r]:cu_q_lens[r + 1]] = r
        logits_index = np.maximum(cu_q_lens[1:] - 1, 0)
        sinks = np.arange(n_rows, dtype=np.int32)
        if sink_rows is not None:  # idle rows keep their own index: they write nothing
            sinks[:len(sink_rows)] = sink_rows
        max_q_len = max(int(n_new.max(initial=1)), 1) if max_q_len is None else max_q_len
        return cls(RaggedMetadata(cu_q_lens, kv_lens, tables, max_q_len), positions, token_rows, logits_index,
                   sinks)


@struct.dataclass
class PagedKV:
    """The pool as one step sees it: what the model writes new K/V into and attends through."""

    pool: PagePool
    meta: StepMetadata

    def positions(self, tokens: jax.Array) -> jax.Array:
        return self.meta.positions[None]

    def write(self, kv_layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, n_new=None) -> PagedKV:
        """k, v [1, T, kv_heads, head_dim] of the packed tokens into their rows' pages (padding tokens dropped);
        a token among the first `sinks` positions also keeps its key as written, for StreamingLLM."""
        meta, pool = jax.tree.map(jnp.asarray, self.meta), self.pool  # (host arrays, from a step built outside jit)
        positions = positions[0]
        real = jnp.arange(positions.shape[0]) < meta.attention.cu_q_lens[-1]
        table = meta.attention.block_tables
        column = table_column(positions // pool.page_size, table.shape[1], pool.sinks, pool.page_size)
        pages = jnp.where(real, table[meta.token_rows, column], pool.k_pages.shape[2])  # out of range: dropped
        if pool.sinks:
            sink = jnp.where(real & (positions < pool.sinks), positions, pool.sinks)  # others out of range: dropped
            pool = pool.replace(sink_keys=pool.sink_keys.at[kv_layer, meta.sink_rows[meta.token_rows], sink].set(
                k[0].astype(jnp.float32), mode="drop"))
        return self.replace(pool=pool.put(kv_layer, pages, positions % pool.page_size, k=k[0], v=v[0]))

    def attend(self, kv_layer: int, q: jax.Array, positions: jax.Array, *, strict: bool, window: int | None,
               sinks: int, softcap: float | None = None, backend: str = "auto", remat: bool = False) -> jax.Array:
        """q [1, T, H, Dh] over every row's pages (`ragged_paged_attention`)."""
        out = ragged_paged_attention(q[0], self.pool.layer(kv_layer), self.meta.attention, sinks=sinks,
                                     window=window, softcap=softcap, strict=strict, backend=backend)
        return out[None]

    def advance(self, n_new=None) -> PagedKV:
        return self  # lengths live on the host, in the next step's metadata

    def slide_sinks(self, cfg: ModelConfig) -> PagedKV:
        """StreamingLLM's positions: once tokens between the sinks and the window are gone, the sinks must sit
        right before the window, so their keys (as written) are rotated on by the number evicted. Window keys
        keep their own rotation: a query's distance to them is the same either way."""
        pool, meta = self.pool, jax.tree.map(jnp.asarray, self.meta)
        if not pool.sinks:
            return self
        sinks, attention = pool.sinks, meta.attention
        n_rows = attention.kv_lens.shape[0]
        evicted = jnp.maximum(attention.kv_lens - cfg.streaming_window - sinks, 0)  # [R], after this step
        where = jnp.broadcast_to(jnp.arange(sinks, dtype=jnp.int32), (n_rows, sinks))
        column = table_column(where // pool.page_size, attention.block_tables.shape[1], sinks, pool.page_size)
        active = (attention.cu_q_lens[1:] > attention.cu_q_lens[:-1])[:, None]  # idle rows write nothing
        pages = jnp.where(active, jnp.take_along_axis(attention.block_tables, column, axis=1), pool.k_pages.shape[2])
        for kv_layer, layer in enumerate(cfg.kv_layers):
            rotated = apply_rope(pool.sink_keys[kv_layer, meta.sink_rows], jnp.broadcast_to(
                evicted[:, None], (n_rows, sinks)), inverse_frequencies(cfg, layer))
            pool = pool.put(kv_layer, pages.reshape(-1), (where % pool.page_size).reshape(-1),
                            k=rotated.reshape(n_rows * sinks, *rotated.shape[2:]))
        return self.replace(pool=pool)


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax over the last axis: (int8 values, float32 scale) with x ~ values * scale."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / safe[..., None]), -127, 127).astype(jnp.int8), scale


def streaming_pages(cfg: ModelConfig, page_size: int) -> int:
    """Pages per sequence under StreamingLLM: the sink pages, then a ring that holds the window
    however it straddles pages (cdiv(window, page_size) + 1)."""
    return -(-cfg.attention_sinks // page_size) + -(-cfg.streaming_window // page_size) + 1
