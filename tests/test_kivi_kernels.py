"""KIVI pages in the Pallas kernels: each kernel (interpreted) against the reference, with rows whose positions
straddle quantized pages and their float recent pages, and every KIVI path still lowers for CUDA and for TPU."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention
from pallas_kernels.ragged_paged_attention import tpu as ragged_tpu
from conftest import interpret, relative_error
from test_kivi import FLUSHED, ROWS, kivi_step

DECODE = [(c, 1) for c, _ in ROWS]  # every row one query: the decode kernels


@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("bits, rows", [(2, ROWS), (4, ROWS), (2, DECODE)], ids=["kivi2", "kivi4", "kivi2-decode"])
def test_gpu_kernels_match_reference(bits, rows, strict):
    q, pages, meta = kivi_step(bits, rows, FLUSHED, ratio=3)
    want = ragged_paged_attention(q, pages, meta, strict=strict, softcap=3.0, backend="reference")
    got = ragged_paged_attention(q, pages, meta, strict=strict, softcap=3.0, backend="gpu",
                                 interpret=interpret("gpu"))
    assert relative_error(got, want) < 1e-5, f"gpu kernel != reference (kivi{bits}, strict={strict})"


@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("bits, rows", [(2, ROWS), (4, ROWS), (2, DECODE)], ids=["kivi2", "kivi4", "kivi2-decode"])
def test_tpu_kernels_match_reference(bits, rows, strict, monkeypatch):
    """The ragged kernel in small blocks (several a row, as test_ragged_attention runs it), the decode kernel."""
    monkeypatch.setattr(ragged_tpu, "ragged_paged_attention", functools.partial(
        ragged_tpu.ragged_paged_attention, block_tokens=32, block_q=8))
    q, pages, meta = kivi_step(bits, rows, FLUSHED, ratio=3)
    want = ragged_paged_attention(q, pages, meta, strict=strict, softcap=3.0, backend="reference")
    got = ragged_paged_attention(q, pages, meta, strict=strict, softcap=3.0, backend="tpu", interpret=True)
    assert relative_error(got, want) < 1e-5, f"tpu kernel != reference (kivi{bits}, strict={strict})"
    assert not np.asarray(got[-2:]).any(), "padding rows must come out zero"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_decode_entry_reads_kivi_pages_without_a_residual(backend):
    """The public decode entry takes KIVI pages alone (no recent pages): every position is quantized."""
    q, pages, meta = kivi_step(4, DECODE, [0] * len(DECODE))
    args = (q[:len(DECODE)], pages.k, pages.v, meta.block_tables, meta.kv_lens)
    want = paged_attention(*args, k_scales=pages.k_scales, v_scales=pages.v_scales, backend="reference")
    got = paged_attention(*args, k_scales=pages.k_scales, v_scales=pages.v_scales, backend=backend,
                          interpret=interpret(backend))
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("rows", [ROWS, DECODE], ids=["mixed", "decode"])
def test_kivi_paths_lower_for_cuda_and_tpu(rows):
    q, pages, meta = kivi_step(2, rows, FLUSHED)
    for backend, platform in (("gpu", "cuda"), ("tpu", "tpu")):
        attend = jax.jit(lambda q, pages, meta: ragged_paged_attention(q, pages, meta, softcap=5.0, backend=backend))
        if platform == "cuda":
            text = attend.trace(q, pages, meta).lower(lowering_platforms=("cuda",)).as_text()
            assert "triton" in text.lower(), "no Triton call in the CUDA lowering"
            continue
        chip = AbstractMesh((1,), ("chip",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                                             platform="tpu"))
        with jax.sharding.use_abstract_mesh(chip):
            text = attend.trace(q, pages, meta).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text or "kernel_name" in text, "no Mosaic call in the TPU lowering"
