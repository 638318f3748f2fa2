"""The paged KV cache: page pools only for KV-producing layers, block tables and lengths.

k_pages, v_pages: [n_kv_layers, kv_heads, num_pages, page_size, head_dim], one pool per KV
layer in the layout of `pallas_kernels.paged_attention`; a CLA or LCKV model allocates
proportionally fewer pools. A sequence's position p lives in page block_tables[b, p //
page_size] at offset p % page_size. int8 pages carry one float32 scale per (token, head):
symmetric absmax, quantized on write and dequantized by the reader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxkv.config import DTYPES, ModelConfig
from jaxkv.errors import JaxkvError
from pallas_kernels.paged_attention.reference import dequantize, table_slot

KV_DTYPES = DTYPES + ("int8",)


@struct.dataclass
class PagedKVCache:
    k_pages: jax.Array
    v_pages: jax.Array
    k_scales: jax.Array | None
    v_scales: jax.Array | None
    block_tables: jax.Array  # int32 [batch, pages_per_seq]
    lengths: jax.Array  # int32 [batch]
    sink_keys: jax.Array | None = None  # float32 [n_kv_layers, batch, sinks, kv_heads, head_dim], as written
    sinks: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, num_pages: int, page_size: int, pages_per_seq: int,
             kv_dtype: str | None = None) -> PagedKVCache:
        kv_dtype = kv_dtype or cfg.dtype
        if kv_dtype not in KV_DTYPES:
            raise JaxkvError(f"KV dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        sinks = cfg.attention_sinks
        if cfg.streaming_window is not None and pages_per_seq < streaming_pages(cfg, page_size):
            raise JaxkvError(f"StreamingLLM with {sinks} sinks and a window of {cfg.streaming_window} needs "
                             f"{streaming_pages(cfg, page_size)} pages per sequence, got {pages_per_seq}")
        shape = (cfg.n_kv_layers, cfg.n_kv_heads, num_pages, page_size, cfg.head_dim)
        scales = (jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape[:-1], jnp.float32)) \
            if kv_dtype == "int8" else (None, None)
        sink_keys = jnp.zeros((cfg.n_kv_layers, batch, sinks, cfg.n_kv_heads, cfg.head_dim)) if sinks else None
        return cls(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype), *scales,
                   block_tables=jnp.zeros((batch, pages_per_seq), jnp.int32), lengths=jnp.zeros((batch,), jnp.int32),
                   sink_keys=sink_keys, sinks=sinks)

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def quantized(self) -> bool:
        return self.k_scales is not None

    def write(self, slot: int, k: jax.Array, v: jax.Array, positions: jax.Array, n_new: jax.Array) -> PagedKVCache:
        """Scatter new k, v [B, T, kv_heads, head_dim] at `positions` [B, T] into KV layer `slot`'s
        pages. Tokens t >= n_new[b] (bucket padding) are dropped, never written. Jit with the
        cache donated: the pools are updated in place."""
        cache = self
        if self.sinks:  # keep the sinks' keys as written, to re-rotate them as the window slides
            sink = jnp.where(positions < self.sinks, positions, self.sinks)  # others: out of range, dropped
            sink = jnp.where(jnp.arange(positions.shape[1])[None, :] < n_new[:, None], sink, self.sinks)
            rows = jnp.arange(positions.shape[0])[:, None]
            cache = cache.replace(sink_keys=self.sink_keys.at[slot, rows, sink].set(k.astype(jnp.float32),
                                                                                       mode="drop"))
        return cache.put(slot, positions, n_new, k=k, v=v)

    def put(self, slot: int, positions: jax.Array, n_new: jax.Array, **new: jax.Array) -> PagedKVCache:
        """Store `new` (k= and/or v=, [B, T, kv_heads, head_dim]) in the pages at `positions`, quantizing
        int8; tokens t >= n_new[b] are dropped. `write` is the model's entry; this also re-stores sinks."""
        T = positions.shape[1]
        column = table_slot(positions // self.page_size, self.block_tables.shape[1], self.sinks, self.page_size)
        pages = jnp.take_along_axis(self.block_tables, column, axis=1)
        real = jnp.arange(T)[None, :] < n_new[:, None]
        pages = jnp.where(real, pages, self.k_pages.shape[2])  # out of range: dropped
        heads = jnp.arange(self.k_pages.shape[1])[:, None, None]
        at = (slot, heads, pages[None], (positions % self.page_size)[None])
        updates = {}
        for name, x in new.items():
            x = jnp.moveaxis(x, 2, 0)  # [K, B, T, D] so the scatter indexes (slot, head, page, offset)
            if self.quantized:
                x, x_scale = quantize_int8(x)
                updates[f"{name}_scales"] = getattr(self, f"{name}_scales").at[at].set(x_scale, mode="drop")
            pool = getattr(self, f"{name}_pages")
            updates[f"{name}_pages"] = pool.at[at].set(x.astype(pool.dtype), mode="drop")
        return self.replace(**updates)

    def read(self, slot: int) -> tuple[jax.Array, jax.Array]:
        """K, V [B, pages_per_seq * page_size, kv_heads, head_dim] of KV layer `slot` gathered
        through the block tables and dequantized: the pure-JAX path the model takes on CPU."""
        def gather(pages, scales):
            dense = dequantize(pages[slot], None if scales is None else scales[slot], jnp.float32 if
                               self.quantized else pages.dtype)[:, self.block_tables]  # [K, B, P, S, D]
            return jnp.moveaxis(dense.reshape(*dense.shape[:2], -1, dense.shape[-1]), 0, 2)
        return gather(self.k_pages, self.k_scales), gather(self.v_pages, self.v_scales)


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
