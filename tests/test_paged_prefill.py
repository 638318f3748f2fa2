"""Paged prefill attention: the reference against a naive float64 loop, the Pallas kernel (interpreted) against it,
and chunks of one query against decode attention."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.errors import KernelInputError
from pallas_kernels import paged_attention
from pallas_kernels.paged_attention.reference import visible_pages
from pallas_kernels.paged_prefill import gpu, paged_prefill_attention
from conftest import interpret, relative_error
from test_paged_attention import KV_HEADS, dequantized, random_pool, split_options

PAGES_PER_SEQ, PADDING = 6, 3


def default_chunks(page_size):
    """(cached tokens, new queries) per sequence: an empty chunk, a chunk of 1 after a prefix, a whole prompt that
    is a page multiple, a page-multiple chunk after a page, a ragged chunk after a ragged prefix, a short prompt."""
    return [(5, 0), (9, 1), (0, 2 * page_size), (page_size, page_size), (page_size + 3, page_size + 5), (0, 7)]


def make_inputs(*, dtype=jnp.float32, page_size=8, head_dim=64, ratio=1, chunks=None, kv=None,
                pages_per_seq=PAGES_PER_SEQ, padding=PADDING, seed=0):
    """Random packed queries (plus `padding` rows) and pages, each sequence's pages scattered in random order
    through a pool with spares."""
    rng = np.random.default_rng(seed)
    chunks = default_chunks(page_size) if chunks is None else chunks
    q_lens = [new for _, new in chunks]
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + padding, KV_HEADS * ratio, head_dim)), dtype)
    return dict(q=q, lengths=jnp.asarray([c + n for c, n in chunks], jnp.int32),
                cu_q_lens=jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
                **random_pool(rng, batch=len(chunks), pages_per_seq=pages_per_seq, page_size=page_size,
                              head_dim=head_dim, dtype=dtype, kv=kv))


def naive_prefill(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, k_scales=None, v_scales=None, *,
                  scale=None, sinks=0, window=None):
    """Each query's visible tokens read one by one through its sequence's block table, attended in float64."""
    q, block_tables, lengths = np.asarray(q, np.float64), np.asarray(block_tables), np.asarray(lengths)
    k_pages, v_pages = dequantized(k_pages, k_scales), dequantized(v_pages, v_scales)
    cu_q_lens = np.asarray(cu_q_lens)
    n_kv, _, page_size, head_dim = k_pages.shape
    group = q.shape[1] // n_kv
    scale = head_dim ** -0.5 if scale is None else scale
    out = np.zeros(q.shape)
    for b, length in enumerate(lengths):
        q_len = cu_q_lens[b + 1] - cu_q_lens[b]
        for i in range(q_len):
            pos, row = length - q_len + i, cu_q_lens[b] + i
            seen = [p for p in range(pos + 1) if window is None or p < sinks or p > pos - window]
            if not seen:
                continue
            pages = [block_tables[b, p // page_size] for p in seen]
            k = np.stack([k_pages[:, page, p % page_size] for page, p in zip(pages, seen)], axis=1)  # [K, T, Dh]
            v = np.stack([v_pages[:, page, p % page_size] for page, p in zip(pages, seen)], axis=1)
            for h in range(q.shape[1]):
                logits = k[h // group] @ q[row, h] * scale
                weights = np.exp(logits - logits.max())
                out[row, h] = weights @ v[h // group] / weights.sum()
    return out


@pytest.mark.parametrize("case", [
    dict(),
    dict(page_size=16, ratio=3, scale=0.3, sinks=4, window=11),
    dict(ratio=2, sinks=0, window=1),
    dict(ratio=3, kv="int8", sinks=9, window=20),
    dict(ratio=3, kv="int4", sinks=9, window=20),
], ids=str)
def test_reference_matches_naive_loop(case):
    options, case = split_options(case)
    inputs = make_inputs(**case)
    got = paged_prefill_attention(**inputs, **options, backend="reference")
    np.testing.assert_allclose(np.asarray(got), naive_prefill(**inputs, **options), atol=2e-5, rtol=1e-5)
    assert not np.asarray(got[-PADDING:]).any()


@pytest.mark.parametrize("case", [
    dict(dtype=jnp.float32, page_size=8, ratio=1),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=3),
    dict(dtype=jnp.float32, page_size=32, ratio=8, head_dim=128, chunks=[(40, 30), (0, 1), (0, 64), (70, 0)]),
    dict(dtype=jnp.bfloat16, page_size=8, ratio=8, sinks=4, window=10),
    dict(dtype=jnp.float32, page_size=16, ratio=1, sinks=0, window=5, scale=0.3),
    dict(dtype=jnp.float32, page_size=8, ratio=3, kv="int8", sinks=10, window=1),
    dict(dtype=jnp.float32, page_size=8, ratio=2, sinks=3, window=0),  # the sinks alone
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, head_dim=128, kv="int8"),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=3, kv="fp8", sinks=3, window=30),
    dict(dtype=jnp.float32, page_size=8, ratio=3, kv="int4", sinks=10, window=1),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, head_dim=128, kv="int4"),
], ids=str)
def test_gpu_kernel_matches_reference(case):
    options, case = split_options(case)
    inputs = make_inputs(**case)
    want = paged_prefill_attention(**inputs, **options, backend="reference")
    got = paged_prefill_attention(**inputs, **options, backend="gpu", interpret=interpret("gpu"))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert relative_error(got, want) < (2e-2 if case["dtype"] == jnp.bfloat16 else 1e-5)
    assert not np.asarray(got[-PADDING:]).any()  # padding rows after cu_q_lens[-1] give zeros


def test_gpu_kernel_small_query_blocks_and_kv_steps():
    """Several query blocks per chunk and several KV steps per block, through the kernel's tuning knobs."""
    inputs = make_inputs(chunks=[(3, 13), (0, 0), (17, 22), (0, 8)], ratio=1)
    options = dict(k_scales=None, v_scales=None, scale=0.125, softcap=None, sinks=2, window=9)
    want = paged_prefill_attention(**inputs, **options, backend="reference")
    got = gpu.paged_prefill_attention(**inputs, **options, interpret=interpret("gpu"), block_q=16, block_tokens=16)
    assert relative_error(got, want) < 1e-5
    got = gpu.paged_prefill_attention(**inputs, **{**options, "window": None}, interpret=interpret("gpu"), block_q=16,
                                      block_tokens=16)
    assert relative_error(got, paged_prefill_attention(**inputs, **{**options, "window": None},
                                                       backend="reference")) < 1e-5


def test_gpu_kernel_reads_only_what_some_query_sees():
    """NaN everywhere no query of the sequence can see (the middle between sinks and window, page tails past the
    sequence, unused table slots, spare pool pages) would poison the output if the kernel let it in."""
    chunks, page_size, sinks, window = [(30, 4), (0, 0), (5, 9), (41, 1)], 8, 3, 6
    inputs = make_inputs(chunks=chunks, page_size=page_size)
    tables = np.asarray(inputs["block_tables"])
    keep = np.zeros(inputs["k_pages"].shape[1:3], bool)
    for b, (cached, new) in enumerate(chunks):
        for p in range(cached + new):
            if p < sinks or p > cached - window:  # cached = the first query's position
                keep[tables[b, p // page_size], p % page_size] = True
    poisoned = {name: jnp.where(keep[None, :, :, None], inputs[name], jnp.nan) for name in ("k_pages", "v_pages")}
    got = paged_prefill_attention(**{**inputs, **poisoned}, sinks=sinks, window=window, backend="gpu",
                                  interpret=interpret("gpu"))
    want = paged_prefill_attention(**inputs, sinks=sinks, window=window, backend="reference")
    assert relative_error(got, want) < 1e-5


def test_kernel_loads_exactly_the_pages_some_query_sees():
    """Block sparsity: a query block's page loop covers every page holding a position one of its queries sees,
    and no other page (none between the sinks and the window, none past the last query)."""
    pages_per_seq = 6
    firsts, n_queries = np.meshgrid(np.arange(-2, 45), [0, 1, 2, 5, 17], indexing="ij")
    firsts, lasts = firsts.ravel(), (firsts + n_queries - 1).ravel()
    for page_size in (4, 8):
        for sinks in (0, 3, 9):
            for window in (None, 0, 1, 6, 20):
                n_sink, window_first, n_visible = map(np.asarray, visible_pages(
                    firsts, lasts, page_size=page_size, pages_per_seq=pages_per_seq, sinks=sinks, window=window))
                for i, (first, last) in enumerate(zip(firsts, lasts)):
                    loaded = [j if j < n_sink[i] else j - n_sink[i] + window_first[i] for j in range(n_visible[i])]
                    seen = {p // page_size for pos in range(max(first, 0), last + 1) for p in range(pos + 1)
                            if (window is None and p < pages_per_seq * page_size)
                            or (window is not None and (p < sinks or p > pos - window))}
                    assert loaded == sorted(seen), (page_size, sinks, window, first, last)


@pytest.mark.parametrize("case", [
    dict(ratio=3),
    dict(ratio=1, page_size=16, sinks=5, window=13),
    dict(ratio=8, sinks=4, window=12, pages_per_seq=4, cached=[0, 7, 30, 75, 200]),  # past the table: the ring
], ids=str)
def test_chunks_of_one_are_decode(case):
    cached = case.pop("cached", [0, 7, 8, 29, 47])
    options, case = split_options(case)
    inputs = make_inputs(**case, chunks=[(c, 1) for c in cached], padding=0)
    decode_inputs = {k: v for k, v in inputs.items() if k != "cu_q_lens"}
    want = paged_attention(**decode_inputs, **options, backend="reference")
    np.testing.assert_allclose(paged_prefill_attention(**inputs, **options, backend="reference"), want,
                               atol=1e-6, rtol=1e-6)
    got = paged_prefill_attention(**inputs, **options, backend="gpu", interpret=interpret("gpu"))
    assert relative_error(got, want) < 1e-5


def test_auto_is_the_platforms_kernel():
    """auto: the Triton kernel on a GPU, the reference on CPU."""
    inputs = make_inputs(ratio=3)
    platform = "gpu" if jax.default_backend() == "gpu" else "reference"
    np.testing.assert_array_equal(paged_prefill_attention(**inputs),
                                  paged_prefill_attention(**inputs, backend=platform))


BAD_INPUTS = {  # name -> what to change in good inputs
    "backend": lambda inputs: dict(backend="tpu-v9"),
    "q rank": lambda inputs: dict(q=inputs["q"][0]),
    "head ratio": lambda inputs: dict(q=inputs["q"][:, :5]),
    "cu_q_lens length": lambda inputs: dict(cu_q_lens=inputs["cu_q_lens"][:-1]),
    "cu_q_lens dtype": lambda inputs: dict(cu_q_lens=inputs["cu_q_lens"].astype(jnp.float32)),
    "lengths batch": lambda inputs: dict(lengths=inputs["lengths"][:-1]),
    "int8 without scales": lambda inputs: dict(k_pages=inputs["k_pages"].astype(jnp.int8),
                                               v_pages=inputs["v_pages"].astype(jnp.int8)),
    "window": lambda inputs: dict(window=-1),
    "gpu page size": lambda inputs: dict(k_pages=inputs["k_pages"][:, :, :6], v_pages=inputs["v_pages"][:, :, :6],
                                         backend="gpu", interpret=interpret("gpu")),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises(name):
    inputs = make_inputs(ratio=3)
    with pytest.raises(KernelInputError):
        paged_prefill_attention(**{**inputs, **BAD_INPUTS[name](inputs)})
