"""Ragged paged attention (the model's one attention entry on paged KV): the reference against a literal float64
loop, with decode rows and prefill chunks mixed in one step; the kernels (interpreted) against the reference; every
GPU path still lowers for CUDA, every TPU path for TPU."""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.backend import auto_backend, triton_supported
from pallas_kernels.errors import KernelInputError
from pallas_kernels.ragged_paged_attention import PoolLayer, RaggedMetadata, ragged_paged_attention
from pallas_kernels.ragged_paged_attention import tpu as ragged_tpu
from conftest import interpret, relative_error
from test_paged_attention import KV_HEADS, random_pool, split_options

PAGES_PER_SEQ, PADDING = 6, 3
# (cached tokens, new queries) per row: decode rows (one query) between chunks, an idle row, a fresh prompt
MIXED = [(5, 0), (9, 1), (0, 16), (8, 8), (30, 1), (11, 13), (0, 7), (40, 1)]
DECODE = [(5, 1), (0, 1), (17, 1), (0, 0), (47, 1)]


def make_step(*, rows=MIXED, dtype=jnp.float32, page_size=8, head_dim=64, ratio=1, kv=None, seed=0):
    rng = np.random.default_rng(seed)
    q_lens = [new for _, new in rows]
    pool = random_pool(rng, batch=len(rows), pages_per_seq=PAGES_PER_SEQ, page_size=page_size, head_dim=head_dim,
                       dtype=dtype, kv=kv)
    meta = RaggedMetadata(cu_q_lens=jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
                          kv_lens=jnp.asarray([c + n for c, n in rows], jnp.int32),
                          block_tables=pool.pop("block_tables"), max_q_len=max(max(q_lens), 1))
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + PADDING, KV_HEADS * ratio, head_dim)), dtype)
    pages = PoolLayer(pool["k_pages"], pool["v_pages"], pool.get("k_scales"), pool.get("v_scales"))
    return q, pages, meta


def literal(q, pages: PoolLayer, meta: RaggedMetadata, *, scale=None, softcap=None, sinks=0, window=None,
            strict=False, q_sinks=None):
    """Each query's visible tokens read one by one through its row's block table, attended in float64 (logits
    soft-capped as Gemma 2 does: cap * tanh(logits / cap)); the sink positions meet q_sinks when given."""
    q, tables = np.asarray(q, np.float64), np.asarray(meta.block_tables)
    q_sinks = q if q_sinks is None else np.asarray(q_sinks, np.float64)
    k, v = np.asarray(pages.k, np.float64), np.asarray(pages.v, np.float64)
    if pages.k_scales is not None:
        k, v = k * np.asarray(pages.k_scales)[..., None], v * np.asarray(pages.v_scales)[..., None]
    n_kv, _, page_size, head_dim = k.shape
    group, scale = q.shape[1] // n_kv, head_dim ** -0.5 if scale is None else scale
    cu, kv_lens, out = np.asarray(meta.cu_q_lens), np.asarray(meta.kv_lens), np.zeros(q.shape)
    for r, length in enumerate(kv_lens):
        q_len = cu[r + 1] - cu[r]
        for i in range(q_len):
            pos = length - q_len + i
            seen = [p for p in range(pos if strict else pos + 1) if window is None or p < sinks or p > pos - window]
            for h in range(q.shape[1]):
                if not seen:
                    continue
                keys = np.stack([k[h // group, tables[r, p // page_size], p % page_size] for p in seen])
                values = np.stack([v[h // group, tables[r, p // page_size], p % page_size] for p in seen])
                logits = np.where(np.asarray(seen) < sinks, keys @ q_sinks[cu[r] + i, h], keys @ q[cu[r] + i, h])
                logits = logits * scale
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                weights = np.exp(logits - logits.max())
                out[cu[r] + i, h] = weights @ values / weights.sum()
    return out


CASES = [
    dict(),
    dict(page_size=16, ratio=3, scale=0.3, softcap=1.5, sinks=4, window=11),
    dict(ratio=2, sinks=0, window=1),
    dict(ratio=3, kv="int8", sinks=9, window=20),
    dict(rows=DECODE, ratio=2),
    dict(rows=DECODE, kv="int8", softcap=2.0, sinks=2, window=9),
    dict(kv="fp8", sinks=9, window=20),
]


@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_literal_loop(case, strict):
    options, case = split_options(case)
    q, pages, meta = make_step(**case)
    got = ragged_paged_attention(q, pages, meta, **options, strict=strict, backend="reference")
    np.testing.assert_allclose(np.asarray(got), literal(q, pages, meta, **options, strict=strict), atol=2e-5,
                               rtol=1e-5, err_msg=f"reference != literal loop for {case} {options} strict={strict}")
    assert not np.asarray(got[-PADDING:]).any(), "padding rows must come out zero"


@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4], CASES[5]], ids=str)
def test_gpu_kernel_matches_reference(case, strict):
    options, case = split_options(case)
    q, pages, meta = make_step(**case)
    want = ragged_paged_attention(q, pages, meta, **options, strict=strict, backend="reference")
    got = ragged_paged_attention(q, pages, meta, **options, strict=strict, backend="gpu", interpret=interpret("gpu"))
    assert relative_error(got, want) < 1e-5, f"gpu kernel != reference for {case} {options} strict={strict}"


def test_tpu_decode_kernel_matches_reference():
    q, pages, meta = make_step(rows=DECODE, ratio=2)
    want = ragged_paged_attention(q, pages, meta, backend="reference")
    got = ragged_paged_attention(q, pages, meta, backend="tpu", interpret=True)
    assert relative_error(got, want) < 1e-5


INT4_CASES = [dict(ratio=3, kv="int4", sinks=9, window=20), dict(rows=DECODE, kv="int4", softcap=2.0, head_dim=128)]


@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4], CASES[5], *INT4_CASES], ids=str)
def test_tpu_ragged_kernel_matches_reference(case, strict, monkeypatch):
    """Mixed steps run the ragged Mosaic kernel, decode steps the decode one, in TPU interpret mode (~5 s a compile
    here). The ragged kernel walks 16-token KV blocks (several double-buffered ones a row, and a shorter compile
    than with its 128); the strict runs also cut chunks into 4-query blocks, the causal runs keep max_q_len's."""
    small = dict(block_tokens=16, block_q=4) if strict else dict(block_tokens=16)
    monkeypatch.setattr(ragged_tpu, "ragged_paged_attention", functools.partial(ragged_tpu.ragged_paged_attention,
                                                                                **small))
    options, case = split_options(case)
    q, pages, meta = make_step(**case)
    want = jax.jit(functools.partial(ragged_paged_attention, **options, strict=strict, backend="reference"))(
        q, pages, meta)  # jitted: several times faster than the reference op by op
    got = ragged_paged_attention(q, pages, meta, **options, strict=strict, backend="tpu", interpret=True)
    assert relative_error(got, want) < 1e-5, f"tpu kernel != reference for {case} {options} strict={strict}"
    assert not np.asarray(got[-PADDING:]).any(), "padding rows must come out zero"


@pytest.mark.parametrize("kv", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("rows", [MIXED, DECODE], ids=["mixed", "decode"])
def test_tpu_paths_lower_for_tpu(rows, kv):
    """Both TPU paths (the ragged Mosaic kernel, the decode kernel) lower to Mosaic on this CPU-only machine: an
    abstract mesh names the chip Pallas lowers for. (libtpu's own Mosaic compile still needs a TPU.)"""
    q, pages, meta = make_step(rows=rows, kv=kv)
    attend = jax.jit(lambda q, pages, meta: ragged_paged_attention(q, pages, meta, sinks=4, window=16, softcap=5.0,
                                                                     backend="tpu"))
    chip = AbstractMesh((1,), ("chip",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                                         platform="tpu"))
    with jax.sharding.use_abstract_mesh(chip):
        text = attend.trace(q, pages, meta).lower(lowering_platforms=("tpu",)).as_text()
    kernel = "jaxkv_ragged_paged_attention_tpu" if rows is MIXED else "jaxkv_paged_attention_tpu"
    assert f'kernel_name = "{kernel}"' in text, f"no {kernel} Mosaic call in the TPU lowering"


@pytest.mark.parametrize("kv", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("rows", [MIXED, DECODE], ids=["mixed", "decode"])
def test_gpu_paths_lower_for_cuda(rows, kv):
    """Both GPU paths (the ragged Triton kernel, the decode kernel) still lower on this CPU-only machine."""
    q, pages, meta = make_step(rows=rows, kv=kv)
    attend = jax.jit(lambda q, pages, meta: ragged_paged_attention(q, pages, meta, sinks=4, window=16, softcap=5.0,
                                                                     backend="gpu"))
    text = attend.trace(q, pages, meta).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower() or "__gpu$xla.gpu.triton" in text, "no Triton call in the CUDA lowering"


def sink_queries(q, meta, seed=1):
    """Random queries for the sink keys, equal to q at each row's last query (as StreamingLLM's are)."""
    q_sinks = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape), q.dtype)
    last = np.asarray(meta.cu_q_lens[1:]) - 1
    last = last[np.asarray(meta.cu_q_lens[1:] > meta.cu_q_lens[:-1])]
    return q_sinks.at[last].set(q[last])


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)
def test_sink_queries_meet_the_sinks_in_every_backend(case, monkeypatch):
    """StreamingLLM's rows of several queries: the sink positions meet q_sinks, the window q: the reference against
    the literal loop, the GPU and TPU kernels (interpreted) against the reference."""
    monkeypatch.setattr(ragged_tpu, "ragged_paged_attention", functools.partial(ragged_tpu.ragged_paged_attention,
                                                                                block_tokens=16))
    options, case = split_options(case)
    q, pages, meta = make_step(**case)
    q_sinks = sink_queries(q, meta)
    want = jax.jit(functools.partial(ragged_paged_attention, **options, backend="reference"))(q, pages, meta,
                                                                                             q_sinks=q_sinks)
    np.testing.assert_allclose(np.asarray(want), literal(q, pages, meta, **options, q_sinks=q_sinks), atol=2e-5,
                               rtol=1e-5, err_msg=f"reference != literal loop with q_sinks for {case} {options}")
    plain = ragged_paged_attention(q, pages, meta, **options, backend="reference")
    assert relative_error(plain, want) > 1e-2, "q_sinks changed nothing: the test cannot tell"
    for backend in ("gpu", "tpu"):
        got = ragged_paged_attention(q, pages, meta, **options, backend=backend, q_sinks=q_sinks,
                                     interpret=interpret(backend) if backend == "gpu" else True)
        assert relative_error(got, want) < 1e-5, f"{backend} kernel != reference with q_sinks for {case} {options}"


def test_sink_queries_lower_for_cuda_and_tpu():
    q, pages, meta = make_step(kv="int8")
    q_sinks = sink_queries(q, meta)
    for backend, platform in (("gpu", "cuda"), ("tpu", "tpu")):
        attend = jax.jit(lambda q, q_sinks, pages, meta, backend=backend: ragged_paged_attention(
            q, pages, meta, sinks=4, window=16, backend=backend, q_sinks=q_sinks))
        chip = AbstractMesh((1,), ("chip",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                                             platform="tpu"))
        with jax.sharding.use_abstract_mesh(chip) if backend == "tpu" else contextlib.nullcontext():
            text = attend.trace(q, q_sinks, pages, meta).lower(lowering_platforms=(platform,)).as_text()
        assert ("triton" in text.lower()) if backend == "gpu" else "jaxkv_ragged_paged_attention_tpu" in text, backend


def test_bad_input_raises_one_line():
    q, pages, meta = make_step()
    with pytest.raises(KernelInputError, match="cu_q_lens must be int32"):
        ragged_paged_attention(q, pages, RaggedMetadata(meta.cu_q_lens[:-1], meta.kv_lens, meta.block_tables, 16))
    with pytest.raises(KernelInputError, match="unknown backend"):
        ragged_paged_attention(q, pages, meta, backend="cuda")


@pytest.mark.parametrize("capability, kernels", [("7.5", "reference"), ("8.0", "gpu"), ("9.0", "gpu"),
                                                 ("10.0", "gpu"), (None, "gpu")])
def test_auto_runs_the_reference_on_a_gpu_pallas_triton_refuses(monkeypatch, capability, kernels):
    """Pallas's Triton lowering refuses compute capability below 8.0 (Colab's T4 is 7.5): there "auto" runs the
    reference instead of failing at the first step; on 8.0 and up (compared as numbers: 10.0 > 8.0) the Triton
    kernels, and a GPU that reports no CUDA capability is let through."""
    device = SimpleNamespace(compute_capability=capability)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *args: [device])
    assert triton_supported(device) == (kernels == "gpu")
    assert auto_backend() == kernels
    assert auto_backend(("tpu",)) == "reference"  # (paged_prefill has no TPU kernel; the decode one has both)
