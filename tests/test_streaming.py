"""StreamingLLM: sinks + a window on a paged ring, against a literal token-by-token implementation of the paper."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.api import LLM
from jaxkv.cache.dense import KVCache
from jaxkv.cache.paged import PagedKV, PagePool, StepMetadata, streaming_pages
from jaxkv.config import ModelConfig
from jaxkv.errors import InvalidRequest, JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import forward, init_params
from jaxkv.sharing import cla, lckv

SINKS, WINDOW, PAGE = 4, 12, 4


def _cfg(sources, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=len(sources), n_heads=4, n_kv_heads=2, head_dim=8,
                       mlp_dim=64, kv_sources=sources, max_seq_len=32, streaming_window=WINDOW,
                       streaming_sinks=SINKS, **kw)


def naive_streaming_logits(cfg: ModelConfig, params, tokens) -> np.ndarray:
    """The paper's method, literally, in float64 numpy, one token at a time.

    Each KV layer keeps the un-rotated K and V of its cached tokens. At step t the cache first drops
    every token that is neither one of the first `sinks` nor among the last `window` (t included);
    keys are then rotated by their index in the cache and the query by the index of token t. A layer
    whose source is above it reads that cache before the source adds token t (LCKV).
    """
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    inv_freq = cfg.rope_theta ** -(np.arange(0, cfg.head_dim, 2) / cfg.head_dim)

    def rope(x, positions):  # x [n, heads, Dh] rotated by positions [n], half-split convention
        angles = np.asarray(positions, np.float64)[:, None, None] * inv_freq
        x1, x2 = np.split(x, 2, axis=-1)
        return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x) + cfg.norm_eps) * scale

    group = cfg.n_heads // cfg.n_kv_heads
    cache = {layer: [] for layer in cfg.kv_layers}  # (position, k [K, Dh] un-rotated, v [K, Dh])
    out = []
    for t, token in enumerate(tokens):
        for layer in cache:
            cache[layer] = [e for e in cache[layer] if e[0] < cfg.streaming_sinks or e[0] > t - cfg.streaming_window]
        x = p["embed"]["embedding"][token]
        for layer in range(cfg.n_layers):
            w = p[f"layers_{layer}"]
            h = rms(x, w["attn_norm"]["scale"])
            q = np.einsum("d,dhe->he", h, w["attn"]["q_proj"]["kernel"])
            if cfg.kv_sources[layer] == layer:
                k = np.einsum("d,dhe->he", h, w["attn"]["k_proj"]["kernel"])
                v = np.einsum("d,dhe->he", h, w["attn"]["v_proj"]["kernel"])
                cache[layer].append((t, k, v))
            entries = cache[cfg.kv_sources[layer]]
            attn = np.zeros((cfg.n_heads, cfg.head_dim))
            if entries:
                keys = rope(np.stack([e[1] for e in entries]), np.arange(len(entries)))  # [n, K, Dh]
                values = np.stack([e[2] for e in entries])
                index = len(entries) - 1 if entries[-1][0] == t else len(entries)  # token t's place in the cache
                q_rot = rope(q[None], [index])[0]
                for head in range(cfg.n_heads):
                    logits = keys[:, head // group] @ q_rot[head] / np.sqrt(cfg.head_dim)
                    weights = np.exp(logits - logits.max())
                    attn[head] = weights @ values[:, head // group] / weights.sum()
            x = x + np.einsum("he,hed->d", attn, w["attn"]["o_proj"]["kernel"])
            h = rms(x, w["mlp_norm"]["scale"])
            gate = h @ w["mlp"]["gate_proj"]["kernel"]
            up = h @ w["mlp"]["up_proj"]["kernel"]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w["mlp"]["down_proj"]["kernel"]
        x = rms(x, p["final_norm"]["scale"])
        out.append(p["embed"]["embedding"] @ x if cfg.tie_embeddings else x @ p["lm_head"]["kernel"])
    return np.stack(out)


def _params(cfg, seed):
    """Random weights with queries and keys scaled up, so attention is peaked and positions matter."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 12 if any(getattr(k, "key", None) in ("q_proj", "k_proj") for k in path) else x, params)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _step(cfg, params, tokens, pool, meta):
    logits, kv = forward(cfg, params, tokens, PagedKV.whole(pool, meta))
    return logits, kv.pools[0]


class _Ring:
    """One sequence on a table of just the sink pages and the window's ring, its pages shuffled in a larger pool,
    fed by hand: each call one step of `tokens` [1, T] after the ones before."""

    def __init__(self, cfg, kv_dtype=None):
        per_seq = streaming_pages(cfg, PAGE)
        self.cfg, self.length = cfg, 0
        self.pool = PagePool.init(cfg, per_seq + 3, PAGE, 1, kv_dtype)
        self.table = np.random.default_rng(0).permutation(per_seq + 3)[:per_seq]

    def __call__(self, params, tokens):
        meta = StepMetadata.pack([self.table[None]], [self.length], [tokens.shape[1]])
        logits, self.pool = _step(self.cfg, params, jnp.asarray(tokens), self.pool, meta)
        self.length += tokens.shape[1]
        return logits


@pytest.mark.parametrize("sources", [(0, 1, 2, 3), cla(4, 2), lckv(4, 2)], ids=["standard", "cla2", "lckv"])
def test_decoding_far_past_the_context_matches_the_literal_method(sources):
    """A 10-token prompt, then 86 tokens one by one: 3x max_seq_len on a cache of 5 pages of 4 tokens."""
    cfg = _cfg(sources, upward_passes_no_grad=12)
    params = _params(cfg, 1)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, 96)
    ring = _Ring(cfg)
    assert PAGE * len(ring.table) == 20 < len(tokens) / 4
    steps = [ring(params, tokens[None, :10])[0]]
    for t in range(10, len(tokens)):
        steps.append(ring(params, tokens[None, t:t + 1])[0])
    got = np.concatenate(steps)
    want = naive_streaming_logits(cfg, params, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_without_moving_the_sinks_the_logits_drift_from_the_literal_method(monkeypatch):
    """The sinks' re-rotation is what the test above checks: skip it and the logits agree only until
    the first eviction."""
    monkeypatch.setattr(PagedKV, "slide_sinks", lambda kv, cfg: kv)
    cfg = _cfg((0, 1, 2, 3), name="sinks-left-behind")  # a new static config: traced afresh, with the patch
    params = _params(cfg, 1)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, 40)
    ring = _Ring(cfg)
    steps = [ring(params, tokens[None, t:t + 1])[0] for t in range(len(tokens))]
    got, want = np.concatenate(steps), naive_streaming_logits(cfg, params, tokens)
    assert np.abs(got[:SINKS + WINDOW] - want[:SINKS + WINDOW]).max() < 1e-4
    assert np.abs(got[-10:] - want[-10:]).max() > 1e-2


def test_int8_streaming_stays_near_float():
    cfg = _cfg(cla(4, 2))
    params = _params(cfg, 4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, 48))
    runs = {}
    for kv_dtype in ("float32", "int8"):
        ring = _Ring(cfg, kv_dtype)
        runs[kv_dtype] = np.concatenate([ring(params, tokens[None, t:t + 1])[0] for t in range(len(tokens))])
    assert np.abs(runs["int8"] - runs["float32"]).max() < 2e-2 * np.abs(runs["float32"]).max()


def test_generate_streams_past_the_context_with_one_fixed_cache(byte_tokenizer):
    """LLM.generate's greedy tokens equal the literal method's, 6x past max_seq_len, and a longer run
    reuses the same executables: the cache does not grow with the length."""
    cfg = _cfg(cla(4, 2))
    params = _params(cfg, 6)
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, cfg.vocab_size, 9)]
    llm = LLM(cfg, byte_tokenizer, params, page_size=PAGE)  # (the byte tokenizer's EOS ids lie past this vocab)
    short = llm.generate_ids([prompt], 40, SamplingParams())[0].token_ids
    compiled = llm.executables.count
    got = llm.generate_ids([prompt], 192, SamplingParams())[0].token_ids
    assert llm.executables.count == compiled and len(got) == 192 and got[:40] == short
    ids = list(prompt)
    for _ in range(60):  # the literal method is slow: check the first 60 greedy tokens
        ids.append(int(np.argmax(naive_streaming_logits(cfg, params, ids)[-1])))
    assert got[:60] == ids[len(prompt):]


def test_streaming_refuses_what_it_cannot_do(byte_tokenizer):
    cfg = _cfg((0, 1))
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(InvalidRequest, match=f"takes at most {SINKS + WINDOW}") as e:
        LLM(cfg, byte_tokenizer, params, page_size=PAGE).generate_ids([[1] * (SINKS + WINDOW + 1)], 4,
                                                                       SamplingParams())
    assert e.value.param == "prompt"
    with pytest.raises(JaxkvError, match="paged cache"):
        forward(cfg, params, jnp.zeros((1, 1), jnp.int32), KVCache.init(cfg, 1, 8))
    with pytest.raises(JaxkvError, match="streaming_window"):
        _cfg((0, 1)).replace(streaming_window=0)
