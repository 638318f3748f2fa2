"""The Pallas TPU paged-attention kernel, run on CPU in Pallas' TPU interpret mode, against the reference."""

from __future__ import annotations

import functools

import pytest

import jax.numpy as jnp

from pallas_kernels.errors import KernelInputError
from pallas_kernels import paged_attention
from pallas_kernels.paged_attention import _KERNELS, tpu
from test_paged_attention import check_kernel_matches_reference, check_kernel_skips_middle_pages, make_inputs


def use_small_blocks(monkeypatch):
    """2-page blocks (1 page from page_size 16) in 2 splits instead of 128-token blocks, so these tiny tables
    still run the prefetch of the next block while computing one, and the combine of splits."""
    monkeypatch.setitem(_KERNELS, "tpu", functools.partial(tpu.paged_attention, block_tokens=16, max_splits=2))


RING = dict(page_size=8, ratio=3, sinks=4, window=20, lengths=[0, 1, 30, 48, 61, 100, 97])  # past the table's 48

CASES = [
    dict(dtype=jnp.float32, page_size=8, ratio=1),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=3, head_dim=128, small_blocks=True),
    dict(dtype=jnp.float32, page_size=32, ratio=8, scale=0.3, small_blocks=True),
    dict(dtype=jnp.bfloat16, page_size=8, ratio=8, sinks=4, window=20, small_blocks=True),
    dict(dtype=jnp.float32, page_size=16, ratio=1, sinks=0, window=5),
    dict(dtype=jnp.float32, page_size=8, ratio=3, kv="int8", sinks=10, window=1, small_blocks=True),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, kv="int8", sinks=3, window=30, head_dim=128),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=3, kv="fp8", sinks=3, window=30),
    dict(dtype=jnp.float32, page_size=8, ratio=3, kv="int4", small_blocks=True),  # int4: a scale per 32 channels
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, kv="int4", sinks=3, window=30, head_dim=128),
    dict(dtype=jnp.float32, **RING),  # the window's pages wrap around the ring of table slots after the sink page
    dict(dtype=jnp.float32, **RING, small_blocks=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tpu_kernel_matches_reference(case, monkeypatch):
    if case.pop("small_blocks", False):
        use_small_blocks(monkeypatch)
    check_kernel_matches_reference("tpu", case)


@pytest.mark.parametrize("small_blocks", [False, True])
def test_tpu_kernel_reads_only_sink_and_window_pages(small_blocks, monkeypatch):
    if small_blocks:
        use_small_blocks(monkeypatch)
    check_kernel_skips_middle_pages("tpu")


def test_tpu_kernel_rejects_page_size_off_the_sublane_tiles():
    inputs = make_inputs(page_size=12)
    with pytest.raises(KernelInputError, match="multiple of 8"):
        paged_attention(**inputs, backend="tpu", interpret=True)
