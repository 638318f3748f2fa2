"""The dense KV cache: an explicit pytree, with storage only for the layers that produce KV."""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from jaxkv.cache.quantize import kv_vector_bytes
from jaxkv.config import ModelConfig
from jaxkv.model.attention import cached_attention
from jaxkv.parallel.logical import constrain


@struct.dataclass
class KVCache:
    """K/V of every KV-producing layer plus how many positions each sequence holds.

    k, v: [n_kv_layers, batch, max_len, kv_heads, head_dim]; lengths: int32 [batch].
    Readers of another layer's KV (CLA, LCKV) have no storage here: that is the saving.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    # logical axes (`jaxkv.parallel.rules`): rows follow the batch, positions may split over "seq"
    LOGICAL_AXES: ClassVar[dict[str, PartitionSpec]] = {
        "k": PartitionSpec("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim"),
        "v": PartitionSpec("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim"),
        "lengths": PartitionSpec("cache_batch"),
    }

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.n_kv_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, kv_layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, n_new: jax.Array) -> KVCache:
        """k, v [B, T, kv_heads, head_dim] at positions [B, T] into KV layer `kv_layer`; tokens
        t >= n_new[b] (bucket padding) and positions past the end are dropped, never clamped."""
        rows = jnp.arange(positions.shape[0])[:, None]
        real = jnp.arange(positions.shape[1])[None, :] < n_new[:, None]
        positions = jnp.where(real, positions, self.max_len)
        return self.replace(k=self.k.at[kv_layer, rows, positions].set(k.astype(self.k.dtype), mode="drop"),
                            v=self.v.at[kv_layer, rows, positions].set(v.astype(self.v.dtype), mode="drop"))

    def read(self, kv_layer: int) -> tuple[jax.Array, jax.Array]:
        """K, V [B, max_len, kv_heads, head_dim] of one KV layer, position-indexed."""
        return self.k[kv_layer], self.v[kv_layer]

    def positions(self, tokens: jax.Array) -> jax.Array:
        """Where new tokens [B, T] go: after each row's cached ones."""
        return self.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]

    def attend(self, kv_layer: int, q: jax.Array, positions: jax.Array, *, strict: bool, window: int | None,
               sinks: int, softcap: float | None = None, backend: str = "auto", remat: bool = False,
               inv_freq=None) -> tuple[jax.Array, KVCache]:
        """q [B, T, H, Dh] at `positions` over KV layer `kv_layer` (`cached_attention`), and the cache (unchanged;
        a paged cache may keep attention scores). remat recomputes the probabilities in the backward pass instead
        of storing them. inv_freq (StreamingLLM's sink rotation on paged KV) does not apply here."""
        attend = functools.partial(cached_attention, strict=strict, window=window, sinks=sinks, softcap=softcap)
        attend = jax.checkpoint(attend) if remat else attend
        # every query block sees every key: with a "seq" axis this is the all-gather of K/V per layer
        k, v = (constrain(a.astype(q.dtype), "batch", None, "kv_heads") for a in self.read(kv_layer))
        return attend(q, k, v, positions), self

    def without_votes(self):
        """(the cache, how to restore it): a dense cache keeps no eviction votes (`PagedKV.without_votes`)."""
        return self, lambda cache: cache

    def advance(self, n_new: jax.Array) -> KVCache:
        return self.replace(lengths=self.lengths + n_new)

    @property
    def kv_nbytes(self) -> int:
        """Bytes held by K and V storage (the per-sequence lengths are negligible)."""
        return self.k.nbytes + self.v.nbytes


def kv_bytes_per_token(cfg: ModelConfig, dtype=None) -> int:
    """KV layers x kv_heads x the bytes of a (token, head)'s K and V, quantized pools' scales included (not KIVI's
    recent float pages, a fixed cost per sequence: `jaxkv.cache.kivi`)."""
    return cfg.n_kv_layers * cfg.n_kv_heads * kv_vector_bytes(_kv_dtype_name(dtype or cfg.dtype), cfg.head_dim)


def _kv_dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name
