"""Pallas kernels under a device mesh.

The compiler cannot partition a Pallas call: left to itself it would gather every operand onto
every device. `per_shard` runs the kernel inside shard_map over the mesh in context
(`jax.set_mesh`) instead, each device on its own query heads (when the "model" axis divides both
the query and the KV heads, GQA groups stay whole) and its own rows (over "data" and "fsdp", when
the rows are sequences and divide); what cannot be split is replicated, which is still correct.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

ROW_AXES = ("data", "fsdp")


def per_shard(kernel, q, k_pages, v_pages, block_tables, lengths, *extra, k_scales, v_scales, recent=None,
              rows_are_sequences: bool = True, q_sinks=None, **options):
    """kernel(q, k_pages, v_pages, block_tables, lengths, *extra, k_scales=, v_scales=, recent=, **options) on each
    device's shard; q [rows, H, Dh] and the output share a sharding. `extra` (e.g. cu_q_lens) is replicated.
    q_sinks (StreamingLLM's queries for the sink keys, as q) is passed as q_sinks= when given, split as q.
    recent (KIVI's float pages and flushed counts, `reference.Recent`) splits as the pages and the rows.
    rows_are_sequences=False (ragged prefill: rows are tokens of several sequences) keeps rows whole."""
    mesh = jax.sharding.get_abstract_mesh()
    call = functools.partial(kernel, **options)
    if mesh.empty or mesh.size == 1:
        return call(q, k_pages, v_pages, block_tables, lengths, *extra, k_scales=k_scales, v_scales=v_scales,
                    recent=recent, **({} if q_sinks is None else dict(q_sinks=q_sinks)))
    sizes = dict(mesh.shape)
    model = sizes.get("model", 1)
    heads = "model" if model > 1 and q.shape[1] % model == 0 and k_pages.shape[0] % model == 0 else None
    row_axes = tuple(a for a in ROW_AXES if sizes.get(a, 1) > 1)
    split_rows = rows_are_sequences and row_axes and q.shape[0] % math.prod(sizes[a] for a in row_axes) == 0
    rows = row_axes if split_rows else None
    pool = P(heads, None, None, None)
    scales = None if k_scales is None else P(heads, None, None)
    ring = None if recent is None else type(recent)(pool, pool, P(rows))

    def local(q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, recent, q_sinks, *extra):
        return call(q, k_pages, v_pages, block_tables, lengths, *extra, k_scales=k_scales, v_scales=v_scales,
                    recent=recent, **({} if q_sinks is None else dict(q_sinks=q_sinks)))

    queries = P(rows, heads, None)
    return jax.shard_map(local, mesh=mesh, check_vma=False, out_specs=queries,
                         in_specs=(queries, pool, pool, P(rows, None), P(rows), scales, scales, ring,
                                   None if q_sinks is None else queries) + (P(),) * len(extra))(
        q, k_pages, v_pages, block_tables, lengths, k_scales, v_scales, recent, q_sinks, *extra)
