"""The Pallas TPU paged-attention kernel, run on CPU in Pallas' TPU interpret mode, against the reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax.numpy as jnp

from jaxkv.errors import JaxkvError
from pallas_kernels import paged_attention
from pallas_kernels.paged_attention import _KERNELS, tpu
from conftest import relative_error
from test_paged_attention import PAGES_PER_SEQ, make_inputs


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
    dict(dtype=jnp.float32, page_size=8, ratio=3, int8=True, sinks=10, window=1, small_blocks=True),
    dict(dtype=jnp.bfloat16, page_size=16, ratio=1, int8=True, sinks=3, window=30, head_dim=128),
    dict(dtype=jnp.float32, **RING),  # the window's pages wrap around the ring of table slots after the sink page
    dict(dtype=jnp.float32, **RING, small_blocks=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tpu_kernel_matches_reference(case, monkeypatch):
    if case.pop("small_blocks", False):
        use_small_blocks(monkeypatch)
    options = {key: case.pop(key) for key in ("scale", "sinks", "window") if key in case}
    inputs = make_inputs(**case)
    want = paged_attention(**inputs, **options, backend="reference")
    got = paged_attention(**inputs, **options, backend="tpu", interpret=True)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert relative_error(got, want) < (2e-2 if case["dtype"] == jnp.bfloat16 else 1e-5)
    assert not np.asarray(got[0]).any()  # length 0 gives zeros


@pytest.mark.parametrize("small_blocks", [False, True])
def test_tpu_kernel_reads_only_sink_and_window_pages(small_blocks, monkeypatch):
    """NaN pages between the sinks and the window would poison the output if the kernel copied them."""
    if small_blocks:
        use_small_blocks(monkeypatch)
    inputs = make_inputs(lengths=[PAGES_PER_SEQ * 8, 5 * 8 + 3])
    skipped = np.asarray(inputs["block_tables"])[:, 1:3].ravel()  # positions 8..23: neither sinks (< 5) nor window
    poisoned = {name: inputs[name].at[:, skipped].set(jnp.nan) for name in ("k_pages", "v_pages")}
    got = paged_attention(**{**inputs, **poisoned}, sinks=5, window=12, backend="tpu", interpret=True)
    want = paged_attention(**inputs, sinks=5, window=12, backend="reference")
    assert relative_error(got, want) < 1e-5


def test_tpu_kernel_rejects_page_size_off_the_sublane_tiles():
    inputs = make_inputs(page_size=12)
    with pytest.raises(JaxkvError, match="multiple of 8"):
        paged_attention(**inputs, backend="tpu", interpret=True)
