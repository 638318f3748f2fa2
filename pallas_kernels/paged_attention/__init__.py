"""Decode attention over a paged KV cache: one entry point, a pure-JAX reference and per-platform kernels.

A sequence's tokens live in fixed-size pages of a shared pool; its block table row lists the pool
pages in token order. Every backend computes the same thing; the reference is the ground truth.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.backend import auto_backend
from pallas_kernels.errors import KernelInputError
from pallas_kernels.paged_attention import gpu, reference, tpu
from pallas_kernels.sharded import per_shard

# quantized pages: values x a float32 scale per (token, head), or for int4 (two values a uint8) per (token, head,
# group of reference.INT4_GROUP channels); KIVI pages (uint8 codes) carry bfloat16 (scale, minimum) pairs instead,
# keys per (page, head, channel), values per (token, head, group of reference.KIVI_GROUP channels)
SCALED_DTYPES = (jnp.int8, jnp.float8_e4m3fn, jnp.uint8)

# jax.default_backend() name -> kernel; "auto" uses the one for the current platform, else the reference.
_KERNELS = {"gpu": gpu.paged_attention, "tpu": tpu.paged_attention}


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scales=None, v_scales=None, scale=None,
                    softcap: float | None = None, sinks: int = 0, window: int | None = None, backend: str = "auto",
                    interpret: bool = False):
    """Attention of one new query per sequence over its paged K/V; returns [batch, q_heads, head_dim] in q.dtype.

    q [B, H, Dh]; k_pages, v_pages [K, N, S, Dh] (one pool per KV layer); block_tables int32 [B, P];
    lengths int32 [B]: the query is token lengths-1 and sees positions 0..lengths-1 (length 0: zeros).
    k_scales, v_scales dequantize quantized pages: float32 [K, N, S] int8/fp8 ones (value = int8 * scale per token
    and head), [K, N, S, Dh / 32] int4 ones; bfloat16 (scale, minimum) pairs KIVI ones (keys [K, N, 2, Dh] per page
    and channel, values [K, N, S, 2, Dh / 32]: `reference.dequantize`), all of whose positions are quantized here
    (the ragged entry also reads KIVI's float recent pages).
    scale multiplies the logits (default 1/sqrt(Dh)); softcap then caps them (Gemma 2). With a window, only the
    first `sinks` and the last `window` positions are visible. Query head h reads KV head h // (H // K); softmax
    is float32.
    backend: "reference", "gpu" (Pallas Triton), "tpu" (Pallas Mosaic TPU) or "auto" (the kernel for
    jax.default_backend() when there is one and the device takes it, else the reference: `pallas_kernels.backend`);
    interpret=True runs a kernel on CPU.
    Under a mesh (`jax.set_mesh`) a kernel runs per shard (`pallas_kernels.sharded.per_shard`); the reference
    is plain JAX, which the compiler partitions itself.
    """
    _validate(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, sinks, window)
    if backend == "auto":
        backend = auto_backend(_KERNELS)
    options = dict(k_scales=k_scales, v_scales=v_scales, sinks=sinks, window=window, softcap=softcap,
                   scale=float(q.shape[-1] ** -0.5 if scale is None else scale))
    if backend == "reference":
        return reference.paged_attention(q, k_pages, v_pages, block_tables, lengths, **options)
    if backend not in _KERNELS:
        raise KernelInputError(f"paged_attention: unknown backend {backend!r}; choose auto, reference or "
                         f"{', '.join(_KERNELS)}")
    return per_shard(_KERNELS[backend], q, k_pages, v_pages, block_tables, lengths, interpret=interpret, **options)


def _validate(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, sinks, window) -> None:
    check = checker("paged_attention")
    check(q.ndim == 3, f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
    check(block_tables.ndim == 2 and block_tables.shape[0] == q.shape[0],
          f"block_tables must be [batch, pages_per_seq] with q's batch {q.shape[0]}, got {block_tables.shape}")
    validate_pages(check, q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, sinks, window)


def checker(name: str):
    """check(ok, message): raise one clear KernelInputError line naming the entry point."""
    def check(ok, message):
        if not ok:
            raise KernelInputError(f"{name}: {message}")
    return check


def validate_pages(check, q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, sinks, window) -> None:
    """The checks every paged-attention entry point shares: pools, tables, lengths, scales, sinks and window
    against q [..., q_heads, head_dim]; one clear line for each way they can disagree, before anything is traced."""
    check(k_pages.ndim == 4, f"k_pages must be [kv_heads, num_pages, page_size, head_dim], got {k_pages.shape}")
    check(v_pages.shape == k_pages.shape, f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    check(v_pages.dtype == k_pages.dtype, f"v_pages dtype {v_pages.dtype} != k_pages dtype {k_pages.dtype}")
    check(block_tables.ndim == 2, f"block_tables must be [batch, pages_per_seq], got {block_tables.shape}")
    check(lengths.ndim == 1 and lengths.shape[0] == block_tables.shape[0],
          f"lengths must be [batch] = [{block_tables.shape[0]}], got shape {lengths.shape}")
    check(block_tables.dtype == jnp.int32 and lengths.dtype == jnp.int32,
          f"block_tables and lengths must be int32, got {block_tables.dtype} and {lengths.dtype}")
    n_heads, head_dim = q.shape[-2:]
    n_kv, n_pages, page_size, kv_head_dim = k_pages.shape
    kivi = reference.is_kivi(k_scales)
    int4 = k_pages.dtype == jnp.uint8 and not kivi
    if kivi:
        check(kv_head_dim * 8 in (2 * head_dim, 4 * head_dim) and head_dim % reference.KIVI_GROUP == 0,
              f"KIVI (uint8) pages hold head_dim / 4 (2 bits) or / 2 (4 bits) bytes a vector, head_dim a multiple of "
              f"{reference.KIVI_GROUP}: q head_dim {head_dim}, pages {kv_head_dim}")
        check(window is None, "KIVI pages do not take a window")
        for name, scales, want in (("k_scales", k_scales, (n_kv, n_pages, 2, head_dim)),
                                   ("v_scales", v_scales, (n_kv, n_pages, page_size, 2,
                                                           head_dim // reference.KIVI_GROUP))):
            check(scales is not None and scales.shape == want and scales.dtype == jnp.bfloat16,
                  f"KIVI {name} must be bfloat16 (scale, minimum) pairs {want}, got "
                  f"{None if scales is None else (scales.dtype, scales.shape)}")
    elif int4:
        check(head_dim % (2 * reference.INT4_GROUP) == 0 and kv_head_dim * 2 == head_dim,
              f"int4 (uint8) pages hold head_dim / 2 bytes a vector, head_dim a multiple of {2 * reference.INT4_GROUP}:"
              f" q head_dim {head_dim}, pages {kv_head_dim}")
    else:
        check(kv_head_dim == head_dim, f"head_dim differs: q {head_dim}, k/v pages {kv_head_dim}")
    check(n_kv > 0 and n_heads % n_kv == 0, f"q_heads {n_heads} is not a multiple of kv_heads {n_kv}")
    check(jnp.issubdtype(q.dtype, jnp.floating), f"q must be a float array, got {q.dtype}")
    if k_pages.dtype in SCALED_DTYPES and not kivi:
        for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
            check(scales is not None, f"{k_pages.dtype} pages need {name}")
            want = (n_kv, n_pages, page_size) + ((head_dim // reference.INT4_GROUP,) if int4 else ())
            check(scales.shape == want and scales.dtype == jnp.float32,
                  f"{name} must be float32 {want}, got {scales.dtype} {scales.shape}")
    elif not kivi:
        check(k_scales is None and v_scales is None,
              f"k_scales/v_scales are for int8, float8_e4m3fn, int4 and KIVI (uint8) pages, not {k_pages.dtype}")
        check(k_pages.dtype == q.dtype, f"k/v pages dtype {k_pages.dtype} != q dtype {q.dtype} (or quantize them)")
    check(sinks >= 0, f"sinks must be >= 0, got {sinks}")
    check(window is None or window >= 0, f"window must be None or >= 0, got {window}")
