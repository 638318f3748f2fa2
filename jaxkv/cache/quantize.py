"""The KV dtypes of the page pool: float pages hold K/V as they are; quantized pages hold them with one float32
scale per (token, head), symmetric absmax: int8 (values x scale, |values| <= 127) and fp8 (e4m3, |values| <=
448, the largest finite e4m3fn number, so nothing saturates). Every attention path dequantizes as values x scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import DTYPES

SCALED = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}  # storage dtype, largest magnitude
KV_DTYPES = DTYPES + tuple(SCALED)


def storage_dtype(kv_dtype: str) -> jnp.dtype:
    return jnp.dtype(SCALED[kv_dtype][0] if kv_dtype in SCALED else kv_dtype)


def bytes_per_value(kv_dtype: str) -> tuple[int, int]:
    """(bytes per K or V element, bytes of scale per (token, head) vector) of a KV dtype."""
    return np.dtype(storage_dtype(kv_dtype)).itemsize, 4 if kv_dtype in SCALED else 0


def quantize(x: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array]:
    """x over its last axis as (values of the KV dtype, float32 scale) with x ~ values * scale; an all-zero
    vector gets scale 0."""
    dtype, top = SCALED[kv_dtype]
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / top
    scaled = x / jnp.where(scale > 0, scale, 1.0)[..., None]
    if dtype == jnp.int8:
        scaled = jnp.clip(jnp.round(scaled), -top, top)
    return scaled.astype(dtype), scale
