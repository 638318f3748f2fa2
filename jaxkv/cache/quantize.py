"""The KV dtypes of the page pool: float pages hold K/V as they are; quantized pages hold them with float32
scales, symmetric absmax: int8 (values x scale, |values| <= 127) and fp8 (e4m3, |values| <= 448, the largest
finite e4m3fn number, so nothing saturates) with one scale per (token, head); int4 (|values| <= 7) with one per
(token, head, group of 32 channels), two values a byte (`pallas_kernels.paged_attention.reference.unpack_int4`:
the low nibble holds channel c, the high one channel c + head_dim / 2, so each half of a byte row is whole groups).
Every attention path dequantizes as values x scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import DTYPES
from jaxkv.errors import JaxkvError
from pallas_kernels.paged_attention.reference import INT4_GROUP

# storage dtype, largest magnitude, channels per scale (None: the whole head)
SCALED = {"int8": (jnp.int8, 127.0, None), "fp8": (jnp.float8_e4m3fn, 448.0, None),
          "int4": (jnp.uint8, 7.0, INT4_GROUP)}
KV_DTYPES = DTYPES + tuple(SCALED)


def storage_dtype(kv_dtype: str) -> jnp.dtype:
    return jnp.dtype(SCALED[kv_dtype][0] if kv_dtype in SCALED else kv_dtype)


def storage_shape(kv_dtype: str, head_dim: int) -> tuple[tuple[int], tuple[int, ...] | None]:
    """(the trailing shape of a stored K or V vector, that of its scales or None) for a KV dtype; int4 needs a
    head_dim that is a multiple of 2 x 32 (each half of a byte row whole groups)."""
    if kv_dtype not in SCALED:
        return (head_dim,), None
    group = SCALED[kv_dtype][2]
    if group is None:
        return (head_dim,), ()
    if head_dim % (2 * group):
        raise JaxkvError(f"KV dtype {kv_dtype} needs a head_dim that is a multiple of {2 * group}, got {head_dim}")
    return (head_dim // 2,), (head_dim // group,)


def vector_bytes(kv_dtype: str, head_dim: int) -> int:
    """Bytes one (token, head) K or V vector takes in the pool, its scales included."""
    values, scales = storage_shape(kv_dtype, head_dim)
    return values[0] * np.dtype(storage_dtype(kv_dtype)).itemsize + (0 if scales is None else 4 * int(np.prod(scales)))


def quantize(x: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array]:
    """x over its last axis (head_dim) as (values of the KV dtype, float32 scales) with x ~ values * scale: one
    scale per vector, [...], or per group of channels, [..., head_dim / group]; an all-zero group gets scale 0."""
    dtype, top, group = SCALED[kv_dtype]
    x = x.astype(jnp.float32)
    if group is not None:
        x = x.reshape(*x.shape[:-1], -1, group)
    scale = jnp.max(jnp.abs(x), axis=-1) / top
    scaled = x / jnp.where(scale > 0, scale, 1.0)[..., None]
    if dtype == jnp.float8_e4m3fn:
        return scaled.astype(dtype), scale
    scaled = jnp.clip(jnp.round(scaled), -top, top).astype(jnp.int32)
    if group is None:
        return scaled.astype(dtype), scale
    scaled = scaled.reshape(*scaled.shape[:-2], -1)
    low, high = jnp.split(scaled, 2, axis=-1)
    return ((low & 15) | ((high & 15) << 4)).astype(dtype), scale
