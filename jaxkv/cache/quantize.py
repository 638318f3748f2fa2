"""The KV dtypes of the page pool: float pages hold K/V as they are; quantized pages hold them with float32
scales, symmetric absmax: int8 (values x scale, |values| <= 127) and fp8 (e4m3, |values| <= 448, the largest
finite e4m3fn number, so nothing saturates) with one scale per (token, head); int4 (|values| <= 7) with one per
(token, head, group of 32 channels), two values a byte (`pallas_kernels.paged_attention.reference.unpack_int4`:
the low nibble holds channel c, the high one channel c + head_dim / 2, so each half of a byte row is whole groups).
Every attention path dequantizes as values x scale.

KIVI (kivi2, kivi4: 2 or 4 bits) is asymmetric, code x scale + minimum with bfloat16 (scale, minimum) pairs: keys
per channel over the KIVI_PAGE tokens of a page (a page is quantized once it is full and out of the KIVI_RECENT
most recent tokens; until then its tokens stay in float recent pages, `jaxkv.cache.kivi`), values per token in
groups of KIVI_GROUP channels; 8 / bits codes a byte (`pallas_kernels.paged_attention.reference.unpack_bits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxkv.config import DTYPES
from jaxkv.errors import JaxkvError
from pallas_kernels.paged_attention.reference import INT4_GROUP, KIVI_GROUP

# storage dtype, largest magnitude, channels per scale (None: the whole head)
SCALED = {"int8": (jnp.int8, 127.0, None), "fp8": (jnp.float8_e4m3fn, 448.0, None),
          "int4": (jnp.uint8, 7.0, INT4_GROUP)}
KIVI = {"kivi2": 2, "kivi4": 4}  # bits a code
KIVI_PAGE = 32  # tokens a page, over which KIVI's keys share a (scale, minimum) per channel: its G
KIVI_RECENT = 128  # the most recent tokens kept in full precision: its R
KV_DTYPES = DTYPES + tuple(SCALED) + tuple(KIVI)


def storage_dtype(kv_dtype: str) -> jnp.dtype:
    return jnp.dtype(jnp.uint8 if kv_dtype in KIVI else SCALED[kv_dtype][0] if kv_dtype in SCALED else kv_dtype)


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


def kv_vector_bytes(kv_dtype: str, head_dim: int) -> int:
    """Bytes the K and V vectors of one (token, head) take in the pool, scales and minimums included (KIVI keys'
    per page shared by its KIVI_PAGE tokens)."""
    if kv_dtype in KIVI:
        if head_dim % KIVI_GROUP or (4 * head_dim) % KIVI_PAGE:
            raise JaxkvError(f"KV dtype {kv_dtype} needs a head_dim that is a multiple of {KIVI_GROUP}, got {head_dim}")
        return 2 * head_dim * KIVI[kv_dtype] // 8 + 4 * head_dim // KIVI_PAGE + 4 * head_dim // KIVI_GROUP
    values, scales = storage_shape(kv_dtype, head_dim)
    one = values[0] * np.dtype(storage_dtype(kv_dtype)).itemsize + (0 if scales is None else 4 * int(np.prod(scales)))
    return 2 * one


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


def quantize_kivi(x: jax.Array, bits: int, *, keys: bool) -> tuple[jax.Array, jax.Array]:
    """KIVI codes uint8 [..., Dh x bits / 8] and bfloat16 (scale, minimum) pairs of x: keys [..., S, Dh] (a page)
    per channel over its S tokens, pairs [..., 2, Dh]; values [..., Dh] per KIVI_GROUP channels, pairs
    [..., 2, Dh / KIVI_GROUP]. The codes are rounded against the pairs as stored, so code x scale + minimum is
    within half a step of x (an all-equal group: scale 0, every value its minimum)."""
    x = x.astype(jnp.float32)
    top = (1 << bits) - 1
    grouped = x if keys else x.reshape(*x.shape[:-1], -1, KIVI_GROUP)
    axis = -2 if keys else -1
    low = jnp.min(grouped, axis=axis, keepdims=True).astype(jnp.bfloat16).astype(jnp.float32)
    scale = ((jnp.max(grouped, axis=axis, keepdims=True) - low) / top).astype(jnp.bfloat16).astype(jnp.float32)
    codes = jnp.clip(jnp.round((grouped - low) / jnp.where(scale > 0, scale, 1.0)), 0, top).astype(jnp.int32)
    pairs = jnp.concatenate([scale, low], axis=axis).astype(jnp.bfloat16)
    if not keys:
        codes, pairs = codes.reshape(x.shape), pairs.swapaxes(-1, -2)  # [..., 2, Dh / group]
    parts = jnp.split(codes, 8 // bits, axis=-1)
    return sum(part << (j * bits) for j, part in enumerate(parts)).astype(jnp.uint8), pairs
