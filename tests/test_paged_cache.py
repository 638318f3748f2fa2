"""Paged KV cache: the host page allocator, the page pool's ragged write path (int8 included), the model on it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.pages import OutOfPages, PageAllocator
from jaxkv.cache.paged import PagedKV, PagePool, StepMetadata
from jaxkv.cache.quantize import quantize
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.sharing import cla, lckv
from conftest import dense_greedy
from test_paged_attention import dequantized


def _cfg(sources=(0, 1, 2, 3), head_dim: int = 8) -> ModelConfig:
    return ModelConfig(vocab_size=32, d_model=32, n_layers=len(sources), n_heads=4, n_kv_heads=2, head_dim=head_dim,
                       mlp_dim=32, kv_sources=sources)


def head_dim_for(kv_dtype: str) -> int:
    """int4 packs channel c with c + head_dim / 2 and scales groups of 32: its smallest head_dim is 64."""
    return 64 if kv_dtype == "int4" else 8


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
    # unreserved columns name the scratch page (8), never page 0, which "x" owns
    np.testing.assert_array_equal(pool.block_table(["y", "x"], 4), [[1, 2, 3, 8], [0, 8, 8, 8]])
    assert pool.pages("y") == [1, 2, 3]
    with pytest.raises(JaxkvError, match="table holds 2"):
        pool.block_table(["y"], 2)


# --- device pools -----------------------------------------------------------------------------
def test_pools_only_for_kv_layers():
    for sources, n_kv in (((0, 1, 2, 3), 4), (cla(4, 2), 2), (lckv(4, 2), 3)):
        cfg = _cfg(sources)
        pool = PagePool.init(cfg, num_pages=10, page_size=4, max_seqs=2)
        assert pool.k_pages.shape == (n_kv, 2, 11, 4, 8)  # and the scratch page
        assert pool.num_pages == 10
        assert kv_bytes_per_token(cfg) == 2 * n_kv * 2 * 8 * 4  # K and V x KV layers x heads x dims x fp32
    # int8: 1 byte a value plus a float32 scale per (token, head): 0.53x of bf16 at head_dim 128
    big = ModelConfig(vocab_size=8, d_model=128, n_layers=2, n_heads=1, n_kv_heads=1, head_dim=128, mlp_dim=8)
    assert kv_bytes_per_token(big, "int8") / kv_bytes_per_token(big, "bfloat16") == pytest.approx(132 / 256)
    assert kv_bytes_per_token(big, "fp8") == kv_bytes_per_token(big, "int8")  # e4m3: a byte too, the same scale
    # int4: half a byte a value plus a float32 scale per 32 channels: 80 of bf16's 256 bytes a vector
    assert kv_bytes_per_token(big, "int4") / kv_bytes_per_token(big, "bfloat16") == pytest.approx(80 / 256)


def _gather(pool, kv_layer, table, length):
    """Positions 0..length-1 of a sequence, read through its block table (numpy, dequantized)."""
    table, ps = np.asarray(table), pool.page_size
    pos = np.arange(length)
    k, v = (dequantized(pages[kv_layer], None if scales is None else scales[kv_layer])[:, table[pos // ps], pos % ps]
            for pages, scales in ((pool.k_pages, pool.k_scales), (pool.v_pages, pool.v_scales)))  # [K, length, D]
    return k.transpose(1, 0, 2), v.transpose(1, 0, 2)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "fp8", "int4"])
def test_ragged_writes_read_back_through_scattered_pages(kv_dtype):
    """Steps that pack chunks of several sequences (ragged, with padding tokens) write each token where its
    sequence's block table says, and nowhere else."""
    head_dim = head_dim_for(kv_dtype)
    cfg = _cfg(cla(4, 2), head_dim)
    rng = np.random.default_rng(0)
    allocator = PageAllocator(num_pages=12, page_size=4)
    allocator._free = list(rng.permutation(12))  # pages handed out in random order
    lengths = [7, 12, 1]
    for seq, n in enumerate(lengths):
        allocator.reserve(seq, n)
    tables = allocator.block_table([0, 1, 2], 3)
    pool = PagePool.init(cfg, num_pages=12, page_size=4, max_seqs=3, kv_dtype=kv_dtype)
    k_all = rng.normal(size=(3, 12, 2, head_dim)).astype(np.float32)
    v_all = rng.normal(size=(3, 12, 2, head_dim)).astype(np.float32)
    write = jax.jit(lambda pool, meta, k, v: PagedKV.whole(pool, meta).write(1, k, v, meta.positions[None]).pools[0],
                    donate_argnums=0)
    for start in range(0, 12, 5):  # chunks of up to 5 per sequence, 2 padding tokens after them
        n_new = np.clip(np.asarray(lengths) - start, 0, 5)
        meta = StepMetadata.pack([tables], [min(start, n) for n in lengths], n_new, n_tokens=int(n_new.sum()) + 2)
        rows, positions = np.asarray(meta.token_rows), np.asarray(meta.positions)
        k, v = k_all[rows, np.minimum(positions, 11)][None], v_all[rows, np.minimum(positions, 11)][None]
        pool = write(pool, meta, jnp.asarray(k), jnp.asarray(v))
    # int8: half a step of absmax / 127; fp8: 2^-4 of the value (3 mantissa bits) or 2^-10 x absmax / 448; int4:
    # half a step of absmax / 7
    top = np.abs(k_all).max()
    tol = {"float32": 0, "int8": 0.5 / 127 * top, "fp8": 2 ** -4 * top, "int4": 0.5 / 7 * top}[kv_dtype]
    for b, n in enumerate(lengths):
        k, v = _gather(pool, 1, tables[b], n)
        np.testing.assert_allclose(k, k_all[b, :n], atol=tol + 1e-6)
        np.testing.assert_allclose(v, v_all[b, :n], atol=tol + 1e-6)
    assert not np.asarray(pool.k_pages[0]).any()  # the other KV layer's pool is untouched
    assert not np.asarray(pool.k_pages[1, :, 12]).any()  # padding wrote nothing, not even to the scratch page


def test_int8_absmax_quantization():
    x = jnp.asarray([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    q, s = quantize(x, "int8")
    np.testing.assert_allclose(s, [1 / 127, 0.0])
    np.testing.assert_array_equal(q, [[64, -127, 32], [0, 0, 0]])
    with pytest.raises(JaxkvError, match="KV dtype"):
        PagePool.init(_cfg(), 2, 4, kv_dtype="int3")


def test_int4_quantization_equals_a_literal_quantizer():
    """int4 against numpy, literally: per (vector, 32 channels) scale = absmax / 7, values round(x / scale) in
    [-7, 7], channel c in the low nibble of byte c and channel head_dim / 2 + c in its high one. A group
    is scaled by its own absmax only (an outlier in one leaves the others' steps), an all-zero group gets scale 0
    and stays zero, and the round trip is within half a step of each group."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 128)).astype(np.float32)
    x[0, 0, 7] = 40.0  # an outlier in group 0 of one vector
    x[1, 2, 64:96] = 0.0  # an all-zero group
    q, s = quantize(jnp.asarray(x), "int4")
    assert q.dtype == jnp.uint8 and q.shape == (5, 3, 64) and s.shape == (5, 3, 4) and s.dtype == jnp.float32
    groups = x.reshape(5, 3, 4, 32)
    scale = np.abs(groups).max(-1) / 7
    np.testing.assert_allclose(np.asarray(s), scale, rtol=1e-6)
    values = np.clip(np.round(groups / np.where(scale > 0, scale, 1)[..., None]), -7, 7).astype(np.int64)
    values = values.reshape(5, 3, 128)
    np.testing.assert_array_equal(np.asarray(q), (values[..., :64] & 15) | ((values[..., 64:] & 15) << 4))
    back = dequantized(q, s)
    assert np.all(np.abs(back - x) <= np.repeat(scale, 32, -1) / 2 * (1 + 1e-5))
    assert not back[1, 2, 64:96].any() and s[1, 2, 2] == 0
    assert s[0, 0, 0] == pytest.approx(40 / 7) and s[0, 0, 1] < 1  # the outlier sets only its own group's step
    with pytest.raises(JaxkvError, match="int4 needs a head_dim that is a multiple of 64, got 8"):
        PagePool.init(_cfg(), 2, 4, kv_dtype="int4")


def test_fp8_absmax_quantization_error_bound():
    """e4m3 keeps 3 mantissa bits: each value round-trips within half an ulp, 2^-4 of itself (2^-10 x scale
    among the subnormals below 2^-6 x scale); the largest magnitude maps to 448 exactly; zeros stay zeros."""
    x = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32) * np.logspace(-3, 2, 64)[:, None]
    x[3] = 0.0
    q, s = quantize(jnp.asarray(x), "fp8")
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
    q, s = np.asarray(q, np.float32), np.asarray(s)
    np.testing.assert_allclose(s, np.abs(x).max(-1) / 448.0, rtol=1e-6)
    assert np.all(np.abs(q).max(-1)[s > 0] == 448.0) and not q[3].any()
    err = np.abs(q * s[:, None] - x)
    assert np.all(err <= np.maximum(2.0 ** -4 * np.abs(x), 2.0 ** -10 * s[:, None]) * (1 + 1e-6))


# --- the model on a paged cache ---------------------------------------------------------------
def scattered_tables(rng, num_pages: int, page_size: int, tokens: int, width: int) -> np.ndarray:
    """Block tables [2, width] of two sequences of `tokens` tokens whose pages are scattered through the pool."""
    allocator = PageAllocator(num_pages=num_pages, page_size=page_size)
    allocator._free = list(rng.permutation(num_pages))
    for seq in (0, 1):
        allocator.reserve(seq, tokens)
    return allocator.block_table([0, 1], width)


def dense_logits(cfg, params, tokens: np.ndarray, prompt: list[int], steps: int) -> np.ndarray:
    """[steps + 1, rows, vocab] on a dense cache: the logits of each row's last prompt token, then of its next
    `steps` tokens fed one at a time (each row continues from its own length)."""
    from jaxkv.cache.dense import KVCache
    from jaxkv.model.decoder import forward

    dense = jax.jit(forward, static_argnums=0)
    rows = np.arange(len(prompt))
    first, cache = dense(cfg, params, jnp.asarray(tokens[:, :max(prompt)]),
                         KVCache.init(cfg, len(prompt), tokens.shape[1]), jnp.asarray(prompt))
    want = [np.asarray(first)[rows, np.asarray(prompt) - 1]]
    for t in range(steps):
        out, cache = dense(cfg, params, jnp.asarray(tokens[rows, np.asarray(prompt) + t][:, None]), cache)
        want.append(np.asarray(out[:, 0]))
    return np.stack(want)


def paged_forward(cfg, params):
    """The model on one page pool, jitted: (tokens, pool, meta) -> (each row's last logits, the pool), donated."""
    from jaxkv.model.decoder import forward

    @functools.partial(jax.jit, donate_argnums=1)
    def step(tokens, pool, meta):
        logits, kv = forward(cfg, params, tokens[None], PagedKV.whole(pool, meta), logits_at=meta.logits_index[None])
        return logits[0], kv.pools[0]

    return step


@pytest.mark.parametrize("sources, windowed, head_dim", [
    ((0, 1, 2, 3), (), 8), (cla(4, 2), (), 8), (lckv(4, 2), (), 8), ((0, 1, 2, 3), (1, 3), 8), (lckv(4, 2), (1, 3), 8),
    (cla(4, 2), (), 64)], ids=["standard", "cla2", "lckv2", "window", "lckv2-window", "cla2-int4"])
def test_model_on_paged_cache_equals_dense(sources, windowed, head_dim):
    """Ragged prompts prefilled in one step, then steps of one token per row: the logits of the rows' last
    tokens through scattered pages equal the dense cache's (int8, fp8, bfloat16, int4 where head_dim allows it:
    close)."""
    from jaxkv.model.decoder import init_params

    cfg = _cfg(sources, head_dim).replace(upward_passes_no_grad=12, window_layers=windowed, sliding_window=3)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    tokens = np.asarray(rng.integers(0, 32, size=(2, 14)), np.int32)
    prompt = [10, 7]
    tables = scattered_tables(rng, 16, 4, 16, 4)
    want = dense_logits(cfg, params, tokens, prompt, 3)
    paged_step = paged_forward(cfg, params)

    # bfloat16 pages under float32 compute: q in bf16
    for kv_dtype in ("float32", "int8", "fp8", "bfloat16") if head_dim < 64 else ("float32", "int4"):
        pool, lengths, got = PagePool.init(cfg, 16, 4, 2, kv_dtype=kv_dtype), [0, 0], []
        for n_new in (prompt, [1, 1], [1, 1], [1, 1]):
            meta = StepMetadata.pack([tables], lengths, n_new)
            step_tokens = np.concatenate([tokens[r, lengths[r]:lengths[r] + n] for r, n in enumerate(n_new)])
            out, pool = paged_step(jnp.asarray(step_tokens), pool, meta)
            got.append(np.asarray(out))
            lengths = [c + n for c, n in zip(lengths, n_new)]
        got = np.stack(got)
        if kv_dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        else:
            # int4's step is 1/7 of a group's absmax (int8's 1/127): close, on a random model, means within 25%;
            # its arithmetic is checked exactly against literal quantizers and kernels elsewhere, this is the wiring
            error = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert error < (0.25 if kv_dtype == "int4" else 0.05), (kv_dtype, error)


def test_generation_through_pages_gives_the_dense_tokens(tiny_hf_dir):
    """The same prompts, greedy: a paged float32 cache gives exactly the dense cache's tokens."""
    import jaxkv

    prompts = ["hello there", "a much longer prompt than the first one, to make rows ragged"]
    paged_llm = jaxkv.load(str(tiny_hf_dir), page_size=8)
    paged = paged_llm.generate(prompts, max_new_tokens=12, ignore_eos=True)
    dense = [dense_greedy(paged_llm.config, paged_llm.params, paged_llm.encode(p), 12) for p in prompts]
    assert [c.token_ids for c in paged] == dense
    int8 = jaxkv.load(str(tiny_hf_dir), kv_dtype="int8")
    head_dim = int8.config.head_dim  # int8: a byte per value plus a float32 scale, against 4 bytes per value
    assert int8.kv_bytes_per_token * 4 * head_dim == paged_llm.kv_bytes_per_token * (head_dim + 4)
    assert all(len(c.token_ids) == 12 for c in int8.generate(prompts, max_new_tokens=12))
    with pytest.raises(JaxkvError, match="power of two"):
        jaxkv.load(str(tiny_hf_dir), page_size=12)


# --- Hadamard rotation of K and Q before the KV is stored (kv_rotate) ------------------------------------
def test_hadamard_is_orthonormal():
    from jaxkv.model.rope import hadamard

    for n in (1, 2, 64, 128):
        h = hadamard(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
        np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)


def test_rotation_keeps_the_logits_and_spreads_outliers():
    """kv_rotate changes what is stored, not what is computed (float32 KV: the same logits); on keys with an outlier
    channel, int8 loses ten times less on the rotated keys than on the keys as they are."""
    from jaxkv.cache.dense import KVCache
    from jaxkv.model.decoder import forward, init_params
    from jaxkv.model.rope import hadamard

    cfg = _cfg(cla(4, 2))
    params = init_params(cfg, jax.random.PRNGKey(3))
    tokens = np.random.default_rng(0).integers(0, 32, size=(2, 12))
    plain, _ = forward(cfg, params, tokens, KVCache.init(cfg, 2, 12))
    rotated, cache = forward(cfg.replace(kv_rotate=True), params, tokens, KVCache.init(cfg, 2, 12))
    np.testing.assert_allclose(np.asarray(rotated), np.asarray(plain), rtol=1e-5, atol=1e-5)

    k = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
    k[:, 5] *= 50.0  # one outlier channel, as trained models' keys have
    h = hadamard(64)
    def loss(x, kv_dtype):  # squared error of the stored keys; an orthonormal rotation keeps it, so bases compare
        q, s = quantize(jnp.asarray(x), kv_dtype)
        return float(np.square(np.asarray(q, np.float32) * np.asarray(s)[:, None] - x).sum())

    # int8's step is absmax / 127 for every channel: the outlier sets it. (fp8's error is relative to each value, so
    # rotating, which makes every value large, costs it instead: about 37x here; README says so.)
    assert loss(k @ h, "int8") * 10 < loss(k, "int8")


def test_rotation_needs_a_power_of_two_head_dim_and_no_streaming():
    with pytest.raises(JaxkvError, match="kv_rotate needs a power-of-two head_dim \\(got 24\\)"):
        _cfg((0, 1, 2, 3)).replace(head_dim=24, kv_rotate=True)
    with pytest.raises(JaxkvError, match="and no StreamingLLM"):
        _cfg((0, 1, 2, 3)).replace(kv_rotate=True, streaming_window=8)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8", "fp8", "int4"])
def test_bytes_per_token_are_the_bytes_allocated(kv_dtype):
    """kv_bytes_per_token (what `jaxkv plan` and the engine count) equals the pool's arrays, scales included."""
    cfg = _cfg(cla(4, 2), head_dim_for(kv_dtype))
    pool = PagePool.init(cfg, num_pages=6, page_size=4, kv_dtype=kv_dtype)
    arrays = [a for a in (pool.k_pages, pool.v_pages, pool.k_scales, pool.v_scales) if a is not None]
    assert sum(a.nbytes for a in arrays) == kv_bytes_per_token(cfg, kv_dtype) * (6 + 1) * 4  # (+ the scratch page)
