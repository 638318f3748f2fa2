"""Paged decode attention: the reference against a naive float64 loop, the Pallas kernels against it (interpreted
on CPU; scripts/gpu_check.sh runs the Triton kernel compiled)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.errors import KernelInputError
from pallas_kernels import paged_attention
from conftest import interpret, relative_error

KV_HEADS, PAGES_PER_SEQ = 2, 6


def random_pool(rng, *, batch, pages_per_seq, page_size, head_dim, dtype, kv) -> dict:
    """k/v pages (kv "int8" or "fp8" with float32 scales, else `dtype`) in a pool with 3 spare pages, and block tables
    giving each sequence its pages scattered in random order through it."""
    n_pages = batch * pages_per_seq + 3
    pool = (KV_HEADS, n_pages, page_size, head_dim)
    inputs = dict(block_tables=jnp.asarray(rng.permutation(n_pages)[:batch * pages_per_seq].reshape(batch, -1),
                                           jnp.int32))
    if kv == "int8":
        inputs.update({name: jnp.asarray(rng.integers(-127, 128, pool), jnp.int8) for name in ("k_pages", "v_pages")})
        inputs.update({name: jnp.asarray(rng.uniform(0.004, 0.012, pool[:3]), jnp.float32)
                       for name in ("k_scales", "v_scales")})
    elif kv == "fp8":
        inputs.update({name: jnp.asarray(rng.uniform(-448, 448, pool), jnp.float8_e4m3fn)
                       for name in ("k_pages", "v_pages")})
        inputs.update({name: jnp.asarray(rng.uniform(0.001, 0.003, pool[:3]), jnp.float32)
                       for name in ("k_scales", "v_scales")})
    elif kv == "int4":  # any byte is two valid int4 values; a scale per 32 channels
        inputs.update({name: jnp.asarray(rng.integers(0, 256, (*pool[:3], head_dim // 2)), jnp.uint8)
                       for name in ("k_pages", "v_pages")})
        inputs.update({name: jnp.asarray(rng.uniform(0.1, 0.3, (*pool[:3], head_dim // 32)), jnp.float32)
                       for name in ("k_scales", "v_scales")})
    else:
        inputs.update({name: jnp.asarray(rng.standard_normal(pool), dtype) for name in ("k_pages", "v_pages")})
    return inputs


def dequantized(pages, scales) -> np.ndarray:
    """Pages as float64 values, literally: int8/fp8 values x their (token, head) scale; int4 bytes split into the
    low nibble (channel i) and the high one (channel head_dim / 2 + i), each read as 4-bit two's complement, every
    channel times the scale of its group of 32."""
    pages = np.asarray(pages)
    if scales is None:
        return pages.astype(np.float64)
    scales = np.asarray(scales, np.float64)
    if pages.dtype != np.uint8:
        return pages.astype(np.float64) * scales[..., None]
    nibbles = [pages & 15, pages >> 4]
    values = np.concatenate([np.where(n > 7, n.astype(np.int64) - 16, n) for n in nibbles], axis=-1)
    return values * np.repeat(scales, 32, axis=-1)


def make_inputs(*, dtype=jnp.float32, page_size=8, head_dim=64, ratio=1, lengths=None, kv=None, seed=0):
    """Random q and pages, each sequence's pages scattered in random order through a pool with spares."""
    rng = np.random.default_rng(seed)
    if lengths is None:  # ragged: empty, one token, a page multiple, a full table, one in between
        lengths = [0, 1, 2 * page_size, PAGES_PER_SEQ * page_size, 3 * page_size + 5]
    q = jnp.asarray(rng.standard_normal((len(lengths), KV_HEADS * ratio, head_dim)), dtype)
    return dict(q=q, lengths=jnp.asarray(lengths, jnp.int32),
                **random_pool(rng, batch=len(lengths), pages_per_seq=PAGES_PER_SEQ, page_size=page_size,
                              head_dim=head_dim, dtype=dtype, kv=kv))


def split_options(case: dict) -> tuple[dict, dict]:
    """A test case as (attention options: scale, softcap, sinks, window; make_inputs' arguments), leaving the case
    (a parametrize value, shared by reruns) as it was."""
    options = ("scale", "softcap", "sinks", "window")
    return {k: v for k, v in case.items() if k in options}, {k: v for k, v in case.items() if k not in options}


def naive_attention(q, k_pages, v_pages, block_tables, lengths, k_scales=None, v_scales=None, *, scale=None,
                    sinks=0, window=None):
    """Each sequence's dense K/V read token by token through its block table, attended in float64."""
    q, block_tables, lengths = np.asarray(q, np.float64), np.asarray(block_tables), np.asarray(lengths)
    k_pages, v_pages = dequantized(k_pages, k_scales), dequantized(v_pages, v_scales)
    n_kv, _, page_size, head_dim = k_pages.shape
    group = q.shape[1] // n_kv
    scale = head_dim ** -0.5 if scale is None else scale
    pages_per_seq, sink_pages = block_tables.shape[1], -(-sinks // page_size)

    def column(page):  # past the table, pages cycle through the columns after the sink pages
        return page if page < pages_per_seq else sink_pages + (page - pages_per_seq) % (pages_per_seq - sink_pages)

    out = np.zeros(q.shape)
    for b, length in enumerate(lengths):
        seen = [p for p in range(length) if window is None or p < sinks or p >= length - window]
        if not seen:
            continue
        pages = [block_tables[b, column(p // page_size)] for p in seen]
        k = np.stack([k_pages[:, page, p % page_size] for page, p in zip(pages, seen)], axis=1)  # [K, T, Dh]
        v = np.stack([v_pages[:, page, p % page_size] for page, p in zip(pages, seen)], axis=1)
        for h in range(q.shape[1]):
            logits = k[h // group] @ q[b, h] * scale
            weights = np.exp(logits - logits.max())
            out[b, h] = weights @ v[h // group] / weights.sum()
    return out


@pytest.mark.parametrize("case", [
    dict(),
    dict(page_size=16, ratio=3, scale=0.3),
    dict(ratio=8, sinks=4, window=11),
    dict(page_size=16, sinks=0, window=1),
    dict(ratio=3, kv="int8", sinks=9, window=20),
    dict(ratio=3, kv="fp8", sinks=9, window=20),
    dict(ratio=3, kv="int4", head_dim=128),
    dict(kv="int4", sinks=9, window=20),
    dict(lengths=[0, 30, 49, 100, 213], sinks=4, window=20),  # past the table: the window wraps round its ring
], ids=str)
def test_reference_matches_naive_loop(case):
    options, case = split_options(case)
    inputs = make_inputs(**case)
    got = paged_attention(**inputs, **options, backend="reference")
    np.testing.assert_allclose(np.asarray(got), naive_attention(**inputs, **options), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [
    dict(dtype=jnp.float32, page_size=8, ratio=1),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=3),
    dict(dtype=jnp.float32, page_size=16, ratio=8, head_dim=128),
    dict(dtype=jnp.bfloat16, page_size=8, ratio=8, sinks=4, window=20),
    dict(dtype=jnp.float32, page_size=16, ratio=1, sinks=0, window=5, scale=0.3),
    dict(dtype=jnp.float32, page_size=8, ratio=3, sinks=10, window=1),
    dict(dtype=jnp.float32, page_size=8, ratio=1, sinks=10, window=0),  # sinks only
    dict(dtype=jnp.float32, page_size=8, ratio=3, kv="int8"),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, kv="int8", sinks=3, window=30),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, kv="fp8", sinks=3, window=30),
    dict(dtype=jnp.float32, page_size=8, ratio=3, kv="int4"),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, kv="int4", sinks=3, window=30, head_dim=128),
    dict(dtype=jnp.float32, page_size=32, ratio=3, head_dim=128),
    dict(dtype=jnp.float32, page_size=8, ratio=3, lengths=[0, 30, 49, 100, 213], sinks=4, window=20),
], ids=str)
def test_gpu_kernel_matches_reference(case):
    check_kernel_matches_reference("gpu", case)


def check_kernel_matches_reference(backend: str, case: dict) -> None:
    """The interpreted kernel's output against the reference: same dtype and shape, close, zeros for length 0."""
    options, case = split_options(case)
    inputs = make_inputs(**case)
    want = paged_attention(**inputs, **options, backend="reference")
    got = paged_attention(**inputs, **options, backend=backend, interpret=interpret(backend))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert relative_error(got, want) < (2e-2 if case["dtype"] == jnp.bfloat16 else 1e-5)
    assert not np.asarray(got[0]).any()  # length 0 gives zeros


def check_kernel_skips_middle_pages(backend: str) -> None:
    """NaN pages between the sinks and the window would poison the output if the kernel loaded them."""
    inputs = make_inputs(lengths=[PAGES_PER_SEQ * 8, 5 * 8 + 3])
    skipped = np.asarray(inputs["block_tables"])[:, 1:3].ravel()  # positions 8..23: neither sinks (< 5) nor window
    poisoned = {name: inputs[name].at[:, skipped].set(jnp.nan) for name in ("k_pages", "v_pages")}
    got = paged_attention(**{**inputs, **poisoned}, sinks=5, window=12, backend=backend, interpret=interpret(backend))
    want = paged_attention(**inputs, sinks=5, window=12, backend="reference")
    assert relative_error(got, want) < 1e-5


def test_gpu_kernel_reads_only_sink_and_window_pages():
    check_kernel_skips_middle_pages("gpu")


def test_auto_is_the_platforms_kernel():
    """auto: the Triton kernel on a GPU, the reference on CPU."""
    inputs = make_inputs(ratio=3)
    platform = "gpu" if jax.default_backend() == "gpu" else "reference"
    np.testing.assert_array_equal(paged_attention(**inputs), paged_attention(**inputs, backend=platform))


BAD_INPUTS = {  # name -> what to change in good inputs
    "backend": lambda q, k, tables, lengths: dict(backend="tpu-v9"),
    "q rank": lambda q, k, tables, lengths: dict(q=q[0]),
    "v shape": lambda q, k, tables, lengths: dict(v_pages=k[:, :-1]),
    "head_dim": lambda q, k, tables, lengths: dict(q=q[..., :32]),
    "head ratio": lambda q, k, tables, lengths: dict(q=q[:, :5]),
    "batch": lambda q, k, tables, lengths: dict(lengths=lengths[:-1]),
    "table dtype": lambda q, k, tables, lengths: dict(block_tables=tables.astype(jnp.float32)),
    "page dtype": lambda q, k, tables, lengths: dict(k_pages=k.astype(jnp.bfloat16), v_pages=k.astype(jnp.bfloat16)),
    "scales on float pages": lambda q, k, tables, lengths: dict(k_scales=jnp.ones(k.shape[:3]),
                                                                v_scales=jnp.ones(k.shape[:3])),
    "int8 without scales": lambda q, k, tables, lengths: dict(k_pages=k.astype(jnp.int8), v_pages=k.astype(jnp.int8)),
    "window": lambda q, k, tables, lengths: dict(window=-1),
    "gpu page size": lambda q, k, tables, lengths: dict(k_pages=k[:, :, :6], v_pages=k[:, :, :6], backend="gpu",
                                                        interpret=True),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises(name):
    inputs = make_inputs(ratio=3)
    change = BAD_INPUTS[name](inputs["q"], inputs["k_pages"], inputs["block_tables"], inputs["lengths"])
    with pytest.raises(KernelInputError):
        paged_attention(**{**inputs, **change})
