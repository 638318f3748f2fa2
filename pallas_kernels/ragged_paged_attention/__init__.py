"""Attention of one ragged step over a paged KV cache: the single entry point the model calls.

A step packs the new tokens of several sequences one after another (a decode row is a chunk of one
token, a prefill row a chunk of many); their K/V are already written into the pages. `RaggedMetadata`
says where each row's queries are, how long its sequence is after them and where its pages are. The
pure-JAX reference is the ground truth and the CPU path; on GPU the Triton kernel of `paged_prefill`
runs, on TPU the ragged Mosaic kernel of `tpu.py`; a step whose rows are all one token runs either
platform's decode kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import auto_backend
from pallas_kernels.errors import KernelInputError
from pallas_kernels.paged_attention import checker, gpu as decode_gpu, tpu as decode_tpu, validate_pages
from pallas_kernels.paged_attention.reference import Recent
from pallas_kernels.paged_prefill import gpu as prefill_gpu
from pallas_kernels.ragged_paged_attention import reference, tpu as ragged_tpu
from pallas_kernels.sharded import per_shard

BACKENDS = ("reference", "gpu", "tpu")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["cu_q_lens", "kv_lens", "block_tables", "flushed"], meta_fields=["max_q_len"])
@dataclasses.dataclass(frozen=True)
class RaggedMetadata:
    """Where a step's rows are. cu_q_lens int32 [R+1]: row r's queries are q[cu_q_lens[r]:cu_q_lens[r+1]] (from
    0, non-decreasing; q rows past cu_q_lens[R] are padding). kv_lens int32 [R]: row r's tokens once its new ones
    are written, so its query i sits at position kv_lens[r] - q_len_r + i. block_tables int32 [R, W]: the pages of
    each row, in position order (past W they wrap as a ring after the sink pages, for StreamingLLM).
    max_q_len (static): the longest chunk any row may have; 1 means every row is a decode row. flushed int32 [R]
    (KIVI pools only): row r's first flushed[r] tokens are in quantized pages, the rest in its recent pages, which
    its block-table columns from flushed[r] // page_size on name."""

    cu_q_lens: jax.Array
    kv_lens: jax.Array
    block_tables: jax.Array
    max_q_len: int = 1
    flushed: jax.Array | None = None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "k_scales", "v_scales", "k_recent", "v_recent"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PoolLayer:
    """One KV layer's pages: k, v [kv_heads, num_pages, page_size, head_dim]; quantized pages carry their scales
    (`pallas_kernels.paged_attention`); KIVI pages also their float recent pages k_recent, v_recent [kv_heads,
    recent_pages, page_size, head_dim], where the tokens not yet flushed live (`RaggedMetadata.flushed`)."""

    k: jax.Array
    v: jax.Array
    k_scales: jax.Array | None = None
    v_scales: jax.Array | None = None
    k_recent: jax.Array | None = None
    v_recent: jax.Array | None = None


KERNELS = {  # what each backend runs, for a bug report (`jaxkv env`)
    "reference": "pure-JAX reference (pallas_kernels.ragged_paged_attention.reference)",
    "gpu": "Pallas Triton: paged_prefill for steps with chunks, paged_attention for decode steps",
    "tpu": "Pallas Mosaic: the ragged kernel for steps with chunks, paged_attention for decode steps",
}


def ragged_paged_attention(q, pages: PoolLayer, meta: RaggedMetadata, *, scale=None, softcap: float | None = None,
                           sinks: int = 0, window: int | None = None, strict: bool = False, backend: str = "auto",
                           interpret: bool = False, q_sinks=None):
    """Causal attention of every packed query [T, H, Dh] over its row's pages; returns [T, H, Dh] in q.dtype.

    With a window only the first `sinks` positions and the last `window` up to the query are visible. strict:
    a query sees the positions strictly before its own (LCKV's upward source, whose KV of the current token is
    not known yet); one that sees nothing gives zeros. GQA maps query head h to KV head h // (H // K); the
    softmax runs in float32; softcap caps the scaled logits (Gemma 2). q_sinks [T, H, Dh] (with a window): the
    queries the sink keys meet, each row's last one equal to q (StreamingLLM rotates a row's sinks for its last
    query: `jaxkv.cache.paged.PagedKV.slide_sinks`; the row's earlier queries see them rotated back). backend:
    "reference", "gpu", "tpu" or "auto" (the platform's kernel, else the reference); interpret=True runs a kernel on
    CPU. Under a mesh a kernel runs per shard of the heads.
    """
    check = checker("ragged_paged_attention")
    meta = jax.tree.map(jnp.asarray, meta)  # host arrays (a step built outside jit) index like traced ones
    check(q.ndim == 3, f"q must be [tokens, q_heads, head_dim], got shape {q.shape}")
    validate_pages(check, q, pages.k, pages.v, meta.block_tables, meta.kv_lens, pages.k_scales, pages.v_scales,
                   sinks, window)
    check(meta.cu_q_lens.shape == (meta.kv_lens.shape[0] + 1,) and meta.cu_q_lens.dtype == jnp.int32,
          f"cu_q_lens must be int32 [rows + 1] = [{meta.kv_lens.shape[0] + 1}], got {meta.cu_q_lens.dtype} "
          f"{meta.cu_q_lens.shape}")
    check(meta.max_q_len >= 1, f"max_q_len must be >= 1, got {meta.max_q_len}")
    check(q_sinks is None or (q_sinks.shape == q.shape and window is not None),
          f"q_sinks must be shaped as q {q.shape}, with a window, got {None if q_sinks is None else q_sinks.shape}")
    recent = None
    if pages.k_recent is not None or meta.flushed is not None:
        check(pages.k_recent is not None and pages.v_recent is not None and meta.flushed is not None,
              "recent pages (k_recent, v_recent) and meta.flushed come together")
        check(pages.k_recent.shape == pages.v_recent.shape and pages.k_recent.shape[0] == pages.k.shape[0]
              and pages.k_recent.shape[2:] == (pages.k.shape[2], q.shape[-1]),
              f"recent pages must be [kv_heads, n, page_size, head_dim], got {pages.k_recent.shape} and "
              f"{pages.v_recent.shape} beside pages {pages.k.shape}")
        check(meta.flushed.shape == meta.kv_lens.shape, f"flushed must be [rows] = {meta.kv_lens.shape}, got "
                                                         f"{meta.flushed.shape}")
        recent = Recent(pages.k_recent, pages.v_recent, meta.flushed)
    backend = auto_backend() if backend == "auto" else backend
    if backend not in BACKENDS:
        raise KernelInputError(f"ragged_paged_attention: unknown backend {backend!r}; choose auto, "
                               f"{', '.join(BACKENDS)}")
    if strict:  # a query at p sees what one at p - 1 sees, its window one shorter: positions p - window + 1 .. p - 1
        meta = dataclasses.replace(meta, kv_lens=meta.kv_lens - 1)
        window = None if window is None else window - 1
    options = dict(k_scales=pages.k_scales, v_scales=pages.v_scales, sinks=sinks, window=window, softcap=softcap,
                   scale=float(q.shape[-1] ** -0.5 if scale is None else scale))
    if backend == "reference":
        return reference.ragged_paged_attention(q, pages.k, pages.v, meta, recent=recent, q_sinks=q_sinks, **options)
    lengths = jnp.maximum(meta.kv_lens, 0)
    # Every row one query: the decode kernel, on each row's query (q_sinks is q there). On TPU it beats the ragged
    # kernel there: a program has `group` rows, not block_q * group mostly empty ones, and long sequences split over
    # 2 programs.
    if meta.max_q_len == 1:
        kernel = decode_gpu.paged_attention if backend == "gpu" else decode_tpu.paged_attention
        rows, real = reference.last_queries(meta.cu_q_lens, q.shape[0])
        out = per_shard(kernel, q[rows], pages.k, pages.v, meta.block_tables, jnp.where(real, lengths, 0),
                        interpret=interpret, recent=recent, **options)
        return jnp.zeros_like(q).at[jnp.where(real, rows, q.shape[0])].set(out, mode="drop")
    kernel = (prefill_gpu.paged_prefill_attention if backend == "gpu"
              else functools.partial(ragged_tpu.ragged_paged_attention, max_q_len=meta.max_q_len))
    return per_shard(kernel, q, pages.k, pages.v, meta.block_tables, lengths, meta.cu_q_lens, interpret=interpret,
                     rows_are_sequences=False, recent=recent, q_sinks=q_sinks, **options)


__all__ = ["KERNELS", "PoolLayer", "RaggedMetadata", "auto_backend", "ragged_paged_attention"]
