"""The dense KV cache: an explicit pytree, with storage only for the layers that produce KV."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxkv.config import ModelConfig


@struct.dataclass
class KVCache:
    """K/V of every KV-producing layer plus how many positions each sequence holds.

    k, v: [n_kv_layers, batch, max_len, kv_heads, head_dim]; lengths: int32 [batch].
    Readers of another layer's KV (CLA, LCKV) have no slot here: that is the saving.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.n_kv_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, slot: int, k: jax.Array, v: jax.Array, positions: jax.Array, n_new: jax.Array) -> KVCache:
        """k, v [B, T, kv_heads, head_dim] at positions [B, T] into KV layer `slot`; tokens
        t >= n_new[b] (bucket padding) and positions past the end are dropped, never clamped."""
        rows = jnp.arange(positions.shape[0])[:, None]
        real = jnp.arange(positions.shape[1])[None, :] < n_new[:, None]
        positions = jnp.where(real, positions, self.max_len)
        return self.replace(k=self.k.at[slot, rows, positions].set(k.astype(self.k.dtype), mode="drop"),
                            v=self.v.at[slot, rows, positions].set(v.astype(self.v.dtype), mode="drop"))

    def read(self, slot: int) -> tuple[jax.Array, jax.Array]:
        """K, V [B, max_len, kv_heads, head_dim] of KV layer `slot`, position-indexed."""
        return self.k[slot], self.v[slot]

    @property
    def kv_nbytes(self) -> int:
        """Bytes held by K and V storage (the per-sequence lengths are negligible)."""
        return self.k.nbytes + self.v.nbytes


def kv_bytes_per_token(cfg: ModelConfig, dtype=None) -> int:
    """2 (K and V) x KV layers x kv_heads x head_dim x bytes per element; int8 (the paged
    cache's quantized pools) adds a float32 scale per (token, head)."""
    dtype = np.dtype(jnp.dtype(dtype or cfg.dtype))
    scale_bytes = 4 if dtype == np.int8 else 0
    return 2 * cfg.n_kv_layers * cfg.n_kv_heads * (cfg.head_dim * dtype.itemsize + scale_bytes)
