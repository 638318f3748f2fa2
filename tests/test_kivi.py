"""KIVI KV (kivi2, kivi4): the quantizer against a literal numpy one; attention over quantized pages and the float
residual against a float64 loop; the residual filling and flushing as a step writes; the model and the engine on
KIVI pages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.api import LLM
from jaxkv.cache.dense import kv_bytes_per_token
from jaxkv.cache.kivi import Residual, flushed_after, ring_pages
from jaxkv.cache.paged import PagedKV, PagePool, StepMetadata
from jaxkv.cache.pages import PageAllocator
from jaxkv.cache.quantize import quantize_kivi
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import init_params
from jaxkv.serve.engine import Engine, Request
from jaxkv.sharing import cla
from pallas_kernels.errors import KernelInputError
from pallas_kernels.ragged_paged_attention import PoolLayer, RaggedMetadata, ragged_paged_attention
from kivi_reference import literal_bytes, literal_codes, literal_dequantize
from test_engine import run, tokens_of
from test_paged_cache import dense_logits, paged_forward, scattered_tables

S = 32  # KIVI's page: keys share a (scale, minimum) per channel over its tokens


# --- the quantizer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_quantizer_equals_a_literal_one_within_half_a_step(bits):
    rng = np.random.default_rng(bits)
    keys = rng.standard_normal((3, S, 64)).astype(np.float32) * rng.uniform(0.1, 8, (3, 1, 64)).astype(np.float32)
    keys[1, 7, 5] = 40.0  # an outlier sets only its own channel's step, in its own page
    keys[2, :, 9] = 1.25  # a constant channel: scale 0, every value its minimum
    values = rng.standard_normal((5, 64)).astype(np.float32)
    values[2, 40] = -30.0  # only its own group of 32 channels
    values[3, :32] = 0.5
    for x, is_keys in ((keys, True), (values, False)):
        packed, pairs = (np.asarray(a) for a in quantize_kivi(jnp.asarray(x), bits, keys=is_keys))
        pairs = pairs.astype(np.float32)
        for i in range(x.shape[0]):
            codes, scale, low = literal_codes(x[i], bits, is_keys)
            np.testing.assert_array_equal(packed[i], literal_bytes(codes, bits))
            if is_keys:
                np.testing.assert_array_equal(pairs[i], np.concatenate([scale, low]))
                back = literal_dequantize(packed[i], bits, scale, low)
                step = np.broadcast_to(scale, x[i].shape)
            else:
                np.testing.assert_array_equal(pairs[i], np.stack([scale[:, 0], low[:, 0]]))
                back = literal_dequantize(packed[i], bits, np.repeat(scale[:, 0], 32), np.repeat(low[:, 0], 32))
                step = np.repeat(scale[:, 0], 32)
            # half a step, plus what rounding the minimum and the scale to bfloat16 can add at the range's ends
            bound = step * (0.5 + 2 ** -8 * 2 ** bits) + 2 ** -8 * np.abs(x[i]) + 1e-6
            assert np.all(np.abs(back - x[i]) <= bound), (is_keys, i)
    key_pairs = np.asarray(quantize_kivi(jnp.asarray(keys), bits, keys=True)[1], np.float32)
    plain = np.asarray(quantize_kivi(jnp.asarray(np.where(keys == 40.0, 0.0, keys)), bits, keys=True)[1], np.float32)
    changed = np.argwhere(key_pairs != plain)
    assert {(int(p), int(c)) for p, _, c in changed} == {(1, 5)}  # page 1, channel 5 only
    assert np.all(key_pairs[2, 0, 9] == 0) and np.all(key_pairs[2, 1, 9] == 1.25)
    value_pairs = np.asarray(quantize_kivi(jnp.asarray(values), bits, keys=False)[1], np.float32)
    assert value_pairs[2, 0, 1] > 20 / (2 ** bits - 1) > value_pairs[2, 0, 0]  # group 1 holds channel 40
    assert value_pairs[3, 0, 0] == 0 and value_pairs[3, 1, 0] == 0.5


# --- attention over quantized pages and the residual ------------------------------------------------
def kivi_step(bits: int, rows, flushed, *, seed=0, head_dim=64, ratio=2, n_kv=2, ring=3):
    """Random KIVI pages and rings for rows (cached, new): columns before flushed // S name quantized pages
    (scattered), the rest ring pages; q for the packed new tokens."""
    rng = np.random.default_rng(seed)
    width = max(-(-(c + n) // S) for c, n in rows)
    n_pages = len(rows) * width + 2
    k, v = (rng.standard_normal((n_kv, n_pages, S, head_dim)).astype(np.float32) for _ in range(2))
    k_codes, k_pairs = quantize_kivi(jnp.asarray(k), bits, keys=True)
    v_codes, v_pairs = quantize_kivi(jnp.asarray(v), bits, keys=False)
    k_recent, v_recent = (jnp.asarray(rng.standard_normal((n_kv, len(rows) * ring + 1, S, head_dim)), jnp.float32)
                          for _ in range(2))
    order = rng.permutation(n_pages)
    tables = np.zeros((len(rows), width), np.int32)
    for r in range(len(rows)):
        tables[r] = order[r * width:(r + 1) * width]
        columns = np.arange(flushed[r] // S, width)
        tables[r, columns] = r * ring + columns % ring
    q_lens = [n for _, n in rows]
    meta = RaggedMetadata(jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
                          jnp.asarray([c + n for c, n in rows], jnp.int32), jnp.asarray(tables), max(max(q_lens), 1),
                          jnp.asarray(flushed, jnp.int32))
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + 2, n_kv * ratio, head_dim)), jnp.float32)
    return q, PoolLayer(k_codes, v_codes, k_pairs, v_pairs, k_recent, v_recent), meta


def literal_attention(q, pages: PoolLayer, meta: RaggedMetadata, bits: int, strict=False):
    """Each query's tokens one by one: position p of row r is quantized page table[r, p // S] dequantized literally
    when p < flushed[r], else the float ring page the same column names; float64 softmax."""
    q, tables = np.asarray(q, np.float64), np.asarray(meta.block_tables)
    k_pairs, v_pairs = (np.asarray(a, np.float32) for a in (pages.k_scales, pages.v_scales))
    codes_k, codes_v = np.asarray(pages.k), np.asarray(pages.v)
    cu, kv_lens, flushed = (np.asarray(a) for a in (meta.cu_q_lens, meta.kv_lens, meta.flushed))
    n_kv, head_dim = codes_k.shape[0], q.shape[-1]
    group, out = q.shape[1] // n_kv, np.zeros(q.shape)

    def token(h, r, p):
        page, o = tables[r, p // S], p % S
        if p >= flushed[r]:
            return tuple(np.asarray(ring[h, page, o], np.float64) for ring in (pages.k_recent, pages.v_recent))
        key = literal_dequantize(codes_k[h, page, o], bits, k_pairs[h, page, 0], k_pairs[h, page, 1])
        value = literal_dequantize(codes_v[h, page, o], bits, np.repeat(v_pairs[h, page, o, 0], 32),
                                   np.repeat(v_pairs[h, page, o, 1], 32))
        return key, value

    for r, length in enumerate(kv_lens):
        q_len = cu[r + 1] - cu[r]
        for i in range(q_len):
            pos = length - q_len + i
            for h in range(q.shape[1]):
                seen = [token(h // group, r, p) for p in range(pos if strict else pos + 1)]
                if not seen:
                    continue
                keys, values = np.stack([s[0] for s in seen]), np.stack([s[1] for s in seen])
                logits = keys @ q[cu[r] + i, h] * head_dim ** -0.5
                weights = np.exp(logits - logits.max())
                out[cu[r] + i, h] = weights @ values / weights.sum()
    return out


# rows (cached, new) and flushed tokens: decode rows and chunks, a row that flushed nothing, one all flushed
ROWS = [(70, 1), (0, 40), (96, 30), (33, 1), (0, 0), (64, 1)]
FLUSHED = [32, 0, 64, 0, 0, 64]


@pytest.mark.parametrize("bits, strict", [(2, False), (4, False), (2, True)])
def test_reference_reads_quantized_pages_then_the_residual(bits, strict):
    q, pages, meta = kivi_step(bits, ROWS, FLUSHED)
    got = ragged_paged_attention(q, pages, meta, backend="reference", strict=strict)
    want = literal_attention(q, pages, meta, bits, strict=strict)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    decode = [(c, 1) for c, _ in ROWS]  # every row one query: the decode path
    q, pages, meta = kivi_step(bits, decode, FLUSHED, seed=1)
    np.testing.assert_allclose(np.asarray(ragged_paged_attention(q, pages, meta)),
                               literal_attention(q, pages, meta, bits), rtol=2e-5, atol=2e-5)


def test_kivi_pages_refuse_a_window_in_one_line():
    q, pages, meta = kivi_step(2, ROWS, FLUSHED)
    with pytest.raises(KernelInputError, match="KIVI pages do not take a window"):
        ragged_paged_attention(q, pages, meta, window=8)


# --- the residual as steps write ---------------------------------------------------------------------
def test_steps_flush_full_pages_out_of_the_recent_window_and_keep_the_rest_exact():
    """Two sequences written step by step (chunks, then single tokens): after every step each token before its
    row's flushed count is in its quantized page, coded exactly as a literal quantizer codes that page's float
    K/V; every later token is in the row's ring, as written; recent 64, so 64..95 tokens stay float."""
    cfg = ModelConfig(vocab_size=8, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64, mlp_dim=8)
    recent, bits = 64, 2
    residual = Residual(recent, S)
    pool = PagePool.init(cfg, 12, S, max_seqs=3, kv_dtype="kivi2", recent=recent)
    allocator = PageAllocator(12, S)
    allocator._free = list(np.random.default_rng(0).permutation(12))
    rows = {0: 2, 1: 0}  # sequence -> its pool row (ring)
    for seq in rows:
        allocator.reserve(seq, 6 * S)
    rng = np.random.default_rng(1)
    written = {seq: np.zeros((0, 2, 2, 64), np.float32) for seq in rows}  # [tokens, K/V, heads, Dh]
    flushed = {seq: 0 for seq in rows}

    @jax.jit
    def write(pool, meta, k, v):
        kv = PagedKV.whole(pool, meta).write(0, k[None], v[None], meta.positions[None])
        return kv.pools[0]

    for n_new in ([100, 37], [1, 60], [1, 1], *[[1, 1]] * 30, [40, 1]):
        held = [len(written[s]) for s in rows]
        meta = StepMetadata.pack([allocator.block_table(list(rows), 6)], held, n_new, n_tokens=sum(n_new) + 3,
                                 sink_rows=list(rows.values()), residual=residual, flushed=[flushed[s] for s in rows])
        new = rng.standard_normal((sum(n_new) + 3, 2, 2, 64)).astype(np.float32)
        pool = write(pool, meta, jnp.asarray(new[:, 0]), jnp.asarray(new[:, 1]))
        at = 0
        for seq, n in zip(rows, n_new):
            written[seq] = np.concatenate([written[seq], new[at:at + n]])
            at += n
            flushed[seq] = flushed_after(flushed[seq], len(written[seq]), recent, S)
            assert recent <= len(written[seq]) - flushed[seq] < recent + S or flushed[seq] == 0
        assert np.array_equal(np.asarray(meta.rows.flushed[:2]), [flushed[s] for s in rows])
        for seq, row in rows.items():
            pages, tokens = allocator.pages(seq), written[seq]
            for p in range(len(tokens) // S):
                if (p + 1) * S <= flushed[seq]:
                    for i, name in enumerate(("k", "v")):
                        codes = np.asarray(getattr(pool, f"{name}_pages")[0, :, pages[p]])
                        for h in range(2):
                            if name == "k":
                                want, scale, low = literal_codes(tokens[p * S:(p + 1) * S, i, h], bits, keys=True)
                            else:
                                want = np.stack([literal_codes(t, bits, keys=False)[0]
                                                 for t in tokens[p * S:(p + 1) * S, i, h]])
                            np.testing.assert_array_equal(codes[h], literal_bytes(want, bits), err_msg=f"{seq} {p}")
            ring = ring_pages(recent, S)
            for t in range(flushed[seq], len(tokens)):
                page = row * ring + (t // S) % ring
                np.testing.assert_array_equal(np.asarray(pool.k_recent[0, :, page, t % S]), tokens[t, 0])
                np.testing.assert_array_equal(np.asarray(pool.v_recent[0, :, page, t % S]), tokens[t, 1])
    assert flushed == {0: 96, 1: 64}  # 172 tokens: 3 pages flushed, 76 float; 129: 2 pages, 65 float


# --- the model ---------------------------------------------------------------------------------------------
def test_model_on_kivi_pages_is_exact_before_a_flush_and_close_after():
    """A CLA2 model, prompts of 100 and 70 then 20 tokens one at a time: with the residual holding every token the
    logits are the dense cache's; with a residual of 32, kivi4 and kivi2 stay close (the step's size is the error)."""
    cfg = ModelConfig(vocab_size=32, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=32,
                      kv_sources=cla(4, 2))
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    tokens = np.asarray(rng.integers(0, 32, size=(2, 128)), np.int32)
    prompt, steps = [100, 70], 20
    tables = scattered_tables(rng, 16, S, 128, 4)
    want = dense_logits(cfg, params, tokens, prompt, steps)
    paged = paged_forward(cfg, params)

    for kv_dtype, recent, tolerance in (("kivi2", 160, 1e-5), ("kivi4", 32, 0.1), ("kivi2", 32, 0.3)):
        pool = PagePool.init(cfg, 16, S, 2, kv_dtype=kv_dtype, recent=recent)
        held, flushed, got = [0, 0], [0, 0], []
        for n_new in [prompt] + [[1, 1]] * steps:
            meta = StepMetadata.pack([tables], held, n_new, residual=Residual(recent, S), flushed=flushed)
            out, pool = paged(jnp.asarray(np.concatenate([tokens[r, held[r]:held[r] + n] for r, n in
                                                          enumerate(n_new)])), pool, meta)
            got.append(np.asarray(out))
            held = [c + n for c, n in zip(held, n_new)]
            flushed = [flushed_after(f, n, recent, S) for f, n in zip(flushed, held)]
        error = np.max(np.abs(np.stack(got) - want)) / np.max(np.abs(want))
        assert error < tolerance, (kv_dtype, recent, error)
        assert (max(flushed) == 0) == (recent == 160), flushed


def test_bytes_per_token_count_codes_and_pairs_and_equal_the_pool():
    cfg = ModelConfig(vocab_size=8, d_model=128, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=64, mlp_dim=8,
                      kv_sources=cla(3, 3))
    # kivi2: 16 code bytes a vector, keys' bfloat16 pair per channel over 32 tokens (8 bytes a token), values' per
    # 32 channels (8 bytes): 48 of bf16's 256 bytes for K and V
    assert kv_bytes_per_token(cfg, "kivi2") / kv_bytes_per_token(cfg, "bfloat16") == pytest.approx(48 / 256)
    assert kv_bytes_per_token(cfg, "kivi4") / kv_bytes_per_token(cfg, "bfloat16") == pytest.approx(80 / 256)
    for kv_dtype in ("kivi2", "kivi4"):
        pool = PagePool.init(cfg, 6, S, max_seqs=2, kv_dtype=kv_dtype, recent=64)
        paged = sum(a.nbytes for a in (pool.k_pages, pool.v_pages, pool.k_scales, pool.v_scales))
        assert paged == kv_bytes_per_token(cfg, kv_dtype) * (6 + 1) * S  # (+ the scratch page)
        assert pool.k_recent.shape == (1, 2, 2 * 3 + 1, S, 64) and pool.kv_dtype == kv_dtype  # rings of 3 pages


# --- the engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kivi_llm(byte_tokenizer):
    cfg = ModelConfig(vocab_size=258, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=64,
                      max_seq_len=320, kv_sources=cla(4, 2))
    return LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(5)), kv_dtype="kivi2", kv_recent=32)


def test_engine_rows_keep_their_own_residual_and_cache_only_flushed_pages(kivi_llm):
    """Requests past a residual of 32 tokens batched on three rows get what each gets alone; a finished request's
    flushed pages (only those) serve a later prompt's prefix; bytes held count the ring."""
    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (90, 70, 30, 110)]
    budgets = [20, 15, 10, 12]
    engine = Engine(kivi_llm, max_batch=3, page_size=S, prefill_chunk=64, kv_dtype="kivi2", max_context=128,
                    prefix_caching=False)  # alone below means from scratch: a cached prefix arrives quantized
    got = run(engine, [Request(p, max_tokens=n, request_id=str(i)) for i, (p, n) in enumerate(zip(prompts, budgets))])
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        engine.prefix_caching = i == 3  # the last one fills the prefix cache, empty until then
        alone = run(engine, [Request(prompt, max_tokens=budget, request_id=f"alone {i}")])[f"alone {i}"]
        assert tokens_of(got[str(i)]) == tokens_of(alone), f"request {i}"
    # the last alone run (prompt 3, 110 + 11 fed) flushed (121 - 32) // 32 = 2 pages, which are cached
    again = prompts[3][:100] + [1, 2, 3]
    out = run(engine, [Request(again, max_tokens=2, request_id="again")])["again"]
    assert out[-1].cached_tokens == 2 * S
    ring = 2 * 2 * 2 * (32 // S + 1) * S * 32 * 4  # K and V x 2 KV layers x 2 heads x 2 ring pages x 32 x fp32
    pages = -(-(len(again) + 1) // S)
    assert out[0].kv_bytes == pages * S * kv_bytes_per_token(kivi_llm.config, "kivi2") + ring


def test_bad_kivi_settings_are_one_line(kivi_llm, byte_tokenizer):
    with pytest.raises(JaxkvError, match="groups keys over pages of 32 tokens"):
        Engine(kivi_llm, page_size=16, kv_dtype="kivi2")
    window = kivi_llm.config.replace(window_layers=(1,), sliding_window=16)
    with pytest.raises(JaxkvError, match="KV dtype kivi4 needs every layer to attend to the whole sequence"):
        Engine(LLM(window, byte_tokenizer, kivi_llm.params), page_size=S, kv_dtype="kivi4")
    with pytest.raises(JaxkvError, match="kivi2 needs a head_dim that is a multiple of 32, got 8"):
        kv_bytes_per_token(kivi_llm.config.replace(head_dim=8), "kivi2")
    with pytest.raises(JaxkvError, match="kivi2 groups keys per page of 32 tokens: page_size must be 32, got 16"):
        LLM(kivi_llm.config, byte_tokenizer, kivi_llm.params, kv_dtype="kivi2", page_size=16)
    with pytest.raises(JaxkvError, match="kv_recent must be a multiple of the page size 32 .*, got 48"):
        LLM(kivi_llm.config, byte_tokenizer, kivi_llm.params, kv_dtype="kivi4", kv_recent=48)
    assert LLM(kivi_llm.config, byte_tokenizer, kivi_llm.params, kv_dtype="kivi4").page_size == S
