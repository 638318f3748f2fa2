"""Paged KV cache: the host page allocator and the jitted write path (int8 included)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.pages import OutOfPages, PageAllocator
from jaxkv.cache.paged import PagedKVCache, quantize_int8
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.sharing import cla, lckv


def _cfg(sources=(0, 1, 2, 3)) -> ModelConfig:
    return ModelConfig(vocab_size=32, d_model=32, n_layers=len(sources), n_heads=4, n_kv_heads=2, head_dim=8,
                       mlp_dim=32, kv_sources=sources)


# --- allocator ----------------------------------------------------------------------------
def test_reserve_release_and_reuse():
    pool = PageAllocator(num_pages=6, page_size=4)
    assert pool.reserve("a", 5) == [0, 1]  # 5 tokens need 2 pages
    assert pool.reserve("a", 8) == [0, 1]  # still fits
    assert pool.reserve("b", 9) == [2, 3, 4]
    with pytest.raises(OutOfPages, match="need 2 free pages, 1 of 6"):
        pool.reserve("c", 5)
    assert pool.free_pages == 1 and "c" not in pool._pages  # all or nothing: nothing leaked
    pool.release("a")
    assert pool.free_pages == 3
    assert sorted(pool.reserve("c", 12)) == [0, 1, 5]


def test_shared_prefix_pages_are_reference_counted():
    pool = PageAllocator(num_pages=4, page_size=4)
    prefix = pool.reserve("a", 8)
    pool.share("b", prefix, 8)
    assert [pool.refcount(p) for p in prefix] == [2, 2]
    pool.reserve("b", 10)  # b grows onto a page of its own
    pool.release("a")
    assert pool.free_pages == 1 and [pool.refcount(p) for p in prefix] == [1, 1]
    pool.release("b")
    assert pool.free_pages == 4
    with pytest.raises(JaxkvError, match="do not fit"):
        pool.share("c", [0], 5)


def test_stats_count_fragmentation_of_used_pages():
    pool = PageAllocator(num_pages=8, page_size=4)
    pool.reserve("a", 5)  # 2 pages, 3 slots empty
    pool.reserve("b", 4)  # 1 full page
    s = pool.stats()
    assert (s.used, s.free, s.tokens) == (3, 5, 9)
    assert s.fragmentation == pytest.approx(3 / 12)


def test_block_table_layout():
    pool = PageAllocator(num_pages=8, page_size=2)
    pool.reserve("x", 1)
    pool.reserve("y", 5)
    np.testing.assert_array_equal(pool.block_table(["y", "x"], 4), [[1, 2, 3, 0], [0, 0, 0, 0]])
    with pytest.raises(JaxkvError, match="table holds 2"):
        pool.block_table(["y"], 2)


# --- device pools -----------------------------------------------------------------------------
def test_pools_only_for_kv_layers():
    for sources, n_kv in (((0, 1, 2, 3), 4), (cla(4, 2), 2), (lckv(4, 2), 3)):
        cfg = _cfg(sources)
        cache = PagedKVCache.init(cfg, batch=2, num_pages=10, page_size=4, pages_per_seq=3)
        assert cache.k_pages.shape == (n_kv, 2, 10, 4, 8)
        assert kv_bytes_per_token(cfg) == 2 * n_kv * 2 * 8 * 4  # K and V x KV layers x heads x dims x fp32
    # int8: 1 byte a value plus a float32 scale per (token, head): 0.53x of bf16 at head_dim 128
    big = ModelConfig(vocab_size=8, d_model=128, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=128, mlp_dim=8)
    assert kv_bytes_per_token(big, "int8") / kv_bytes_per_token(big, "bfloat16") == pytest.approx(132 / 256)


def _gather(cache, slot, b, length):
    """Positions 0..length-1 of sequence b, read through its block table (numpy, dequantized)."""
    table, ps = np.asarray(cache.block_tables[b]), cache.page_size
    pos = np.arange(length)
    k = np.asarray(cache.k_pages[slot], np.float32)[:, table[pos // ps], pos % ps]  # [K, length, D]
    v = np.asarray(cache.v_pages[slot], np.float32)[:, table[pos // ps], pos % ps]
    if cache.quantized:
        k = k * np.asarray(cache.k_scales[slot])[:, table[pos // ps], pos % ps][..., None]
        v = v * np.asarray(cache.v_scales[slot])[:, table[pos // ps], pos % ps][..., None]
    return k.transpose(1, 0, 2), v.transpose(1, 0, 2)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_chunked_writes_read_back_through_scattered_pages(kv_dtype):
    cfg = _cfg(cla(4, 2))
    rng = np.random.default_rng(0)
    pool = PageAllocator(num_pages=12, page_size=4)
    pool._free = list(rng.permutation(12))  # pages handed out in random order
    lengths = [7, 12, 1]
    for seq, n in enumerate(lengths):
        pool.reserve(seq, n)
    cache = PagedKVCache.init(cfg, batch=3, num_pages=12, page_size=4, pages_per_seq=3, kv_dtype=kv_dtype)
    cache = cache.replace(block_tables=jnp.asarray(pool.block_table([0, 1, 2], 3)))
    k_all = rng.normal(size=(3, 12, 2, 8)).astype(np.float32)
    v_all = rng.normal(size=(3, 12, 2, 8)).astype(np.float32)
    step = jax.jit(PagedKVCache.write, static_argnums=1, donate_argnums=0)
    for start in range(0, 12, 5):  # ragged chunks; rows past their length are padding
        pos = np.arange(start, start + 5)[None].repeat(3, 0)
        n_new = np.clip(np.asarray(lengths) - start, 0, 5).astype(np.int32)
        rows, cols = np.arange(3)[:, None], np.minimum(pos, 11)
        cache = step(cache, 1, jnp.asarray(k_all[rows, cols]), jnp.asarray(v_all[rows, cols]),
                     jnp.asarray(pos, jnp.int32), jnp.asarray(n_new))
    tol = 0 if kv_dtype == "float32" else 1 / 127 * np.abs(k_all).max()
    for b, n in enumerate(lengths):
        k, v = _gather(cache, 1, b, n)
        np.testing.assert_allclose(k, k_all[b, :n], atol=tol + 1e-6)
        np.testing.assert_allclose(v, v_all[b, :n], atol=tol + 1e-6)
    assert not np.asarray(cache.k_pages[0]).any()  # the other KV layer's pool is untouched


def test_int8_absmax_quantization():
    x = jnp.asarray([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    q, s = quantize_int8(x)
    np.testing.assert_allclose(s, [1 / 127, 0.0])
    np.testing.assert_array_equal(q, [[64, -127, 32], [0, 0, 0]])
    with pytest.raises(JaxkvError, match="KV dtype"):
        PagedKVCache.init(_cfg(), 1, 2, 4, 1, kv_dtype="int4")


# --- the model on a paged cache ---------------------------------------------------------------
@pytest.mark.parametrize("sources, windowed", [((0, 1, 2, 3), ()), (cla(4, 2), ()), (lckv(4, 2), ()),
                                               ((0, 1, 2, 3), (1, 3)), (lckv(4, 2), (1, 3))],
                         ids=["standard", "cla2", "lckv2", "window", "lckv2-window"])
def test_model_on_paged_cache_equals_dense(sources, windowed):
    """Prefill of ragged prompts then decode steps: same logits through scattered pages as dense."""
    from jaxkv.cache.dense import KVCache
    from jaxkv.model.decoder import forward, init_params

    cfg = _cfg(sources).replace(upward_passes_no_grad=12, window_layers=windowed, sliding_window=3)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 32, size=(2, 14)))
    n_new = jnp.asarray([10, 7], jnp.int32)
    pool = PageAllocator(num_pages=16, page_size=4)
    pool._free = list(rng.permutation(16))
    for seq in (0, 1):
        pool.reserve(seq, 16)
    run = jax.jit(forward, static_argnums=0)
    caches = {"dense": KVCache.init(cfg, 2, 16)}
    for kv_dtype in ("float32", "int8"):
        paged = PagedKVCache.init(cfg, 2, 16, 4, 4, kv_dtype=kv_dtype)
        caches[kv_dtype] = paged.replace(block_tables=jnp.asarray(pool.block_table([0, 1], 4)))
    logits = {}
    for name, cache in caches.items():
        first, cache = run(cfg, params, tokens[:, :10], cache, n_new)
        steps = [first[:, 0]]
        for t in range(3):  # each row continues from its own length
            nxt = tokens[jnp.arange(2), n_new + t][:, None]
            out, cache = run(cfg, params, nxt, cache)
            steps.append(out[:, 0])
        logits[name] = np.stack(steps)
    np.testing.assert_allclose(logits["float32"], logits["dense"], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(logits["int8"] - logits["dense"])) < 0.05 * np.max(np.abs(logits["dense"]))


def test_generation_through_pages_gives_the_dense_tokens(tiny_hf_dir):
    """The same prompts, greedy: a paged float32 cache gives exactly the dense cache's tokens."""
    import jaxkv

    prompts = ["hello there", "a much longer prompt than the first one, to make rows ragged"]
    dense = jaxkv.load(str(tiny_hf_dir)).generate(prompts, max_new_tokens=12)
    paged_llm = jaxkv.load(str(tiny_hf_dir), page_size=8)
    paged = paged_llm.generate(prompts, max_new_tokens=12)
    assert [c.token_ids for c in paged] == [c.token_ids for c in dense]
    int8 = jaxkv.load(str(tiny_hf_dir), kv_dtype="int8")
    head_dim = int8.config.head_dim  # int8: a byte per value plus a float32 scale, against 4 bytes per value
    assert int8.kv_bytes_per_token * 4 * head_dim == paged_llm.kv_bytes_per_token * (head_dim + 4)
    assert all(len(c.token_ids) == 12 for c in int8.generate(prompts, max_new_tokens=12))
    with pytest.raises(JaxkvError, match="power of two"):
        jaxkv.load(str(tiny_hf_dir), page_size=12)
