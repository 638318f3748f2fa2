"""Prefill attention over a paged KV cache: ragged chunks of new queries, a pure-JAX reference and a Pallas kernel.

The new tokens of all sequences are packed one after another in q; their K/V are already written into the
pages (vLLM convention), so sequence b's `lengths[b]` counts its cached prefix plus its chunk. Every backend
computes the same thing; the reference is the ground truth.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.backend import auto_backend
from pallas_kernels.errors import KernelInputError
from pallas_kernels.paged_attention import checker, validate_pages
from pallas_kernels.paged_prefill import gpu, reference
from pallas_kernels.sharded import per_shard

# jax.default_backend() name -> kernel; "auto" uses the one for the current platform, else the reference.
_KERNELS = {"gpu": gpu.paged_prefill_attention}


def paged_prefill_attention(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, *, k_scales=None, v_scales=None,
                            scale=None, softcap: float | None = None, sinks: int = 0, window: int | None = None,
                            backend: str = "auto", interpret: bool = False):
    """Causal attention of each sequence's chunk of new queries over its paged K/V; returns [T, H, Dh] in q.dtype.

    q [T, H, Dh]: sequence b's queries are rows cu_q_lens[b]:cu_q_lens[b+1] (cu_q_lens int32 [B+1], from 0,
    non-decreasing); rows from cu_q_lens[B] on are padding and come out zero.
    k_pages, v_pages [K, N, S, Dh]; block_tables int32 [B, P]; lengths int32 [B]: sequence b's tokens including
    its chunk, so its query i sits at position lengths[b] - q_len_b + i and sees positions 0..that position
    (with a window: the first `sinks` and the last `window` of them). A query that sees nothing gives zeros.
    k_scales, v_scales, scale, GQA, the float32 softmax and the page ring past the table are as in
    pallas_kernels.paged_attention. backend: "reference", "gpu" (Pallas Triton; interpret=True runs it on
    CPU) or "auto" (the kernel for jax.default_backend() when there is one and the device takes it, else the
    reference: `pallas_kernels.backend`).
    """
    _validate(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, k_scales, v_scales, sinks, window)
    if backend == "auto":
        backend = auto_backend(_KERNELS)
    if backend != "reference" and backend not in _KERNELS:
        raise KernelInputError(f"paged_prefill_attention: unknown backend {backend!r}; choose auto, reference or "
                         f"{', '.join(_KERNELS)}")
    options = dict(k_scales=k_scales, v_scales=v_scales, sinks=sinks, window=window, softcap=softcap,
                   scale=float(q.shape[-1] ** -0.5 if scale is None else scale))
    if backend == "reference":
        return reference.paged_prefill_attention(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, **options)
    return per_shard(_KERNELS[backend], q, k_pages, v_pages, block_tables, lengths, cu_q_lens, interpret=interpret,
                     rows_are_sequences=False, **options)


def _validate(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, k_scales, v_scales, sinks, window) -> None:
    check = checker("paged_prefill_attention")
    check(q.ndim == 3, f"q must be [tokens, q_heads, head_dim], got shape {q.shape}")
    validate_pages(check, q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, sinks, window)
    batch = block_tables.shape[0]
    check(cu_q_lens.ndim == 1 and cu_q_lens.shape[0] == batch + 1,
          f"cu_q_lens must be [batch + 1] = [{batch + 1}], got shape {cu_q_lens.shape}")
    check(cu_q_lens.dtype == jnp.int32, f"cu_q_lens must be int32, got {cu_q_lens.dtype}")


__all__ = ["paged_prefill_attention"]
