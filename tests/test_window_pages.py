"""Window layers hold only their window's pages (a ring per sequence, in a pool of their own) while global layers
keep full tables: the page groups a config gives, the engine's greedy tokens against the dense token-by-token
oracle with the pages each group holds, and `jaxkv plan`'s per-layer accounting."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import dense_greedy
from jaxkv.api import LLM
from jaxkv.cache.paged import PageGroup, page_groups, streaming_pages
from jaxkv.checkpoints.registry import resolve_config
from jaxkv.config import ModelConfig
from jaxkv.model.decoder import init_params
from jaxkv.plan import plan
from jaxkv.serve.engine import Engine, Request
from jaxkv.sharing import cla

# Gemma 3's pattern in small: five window layers to one global, windows of 8 tokens
LOCAL_GLOBAL = dict(vocab_size=258, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                    max_seq_len=128, window_layers=(0, 1, 2, 3, 4), sliding_window=8, window_rope_theta=100.0)
PAGE, CHUNK, PER_SEQ = 4, 8, 32
RING = -(-(8 + CHUNK - 1) // PAGE) + 1  # the window of a chunk's first query through its last token: 5 pages


def groups(**changes):
    return page_groups(ModelConfig(**{**LOCAL_GLOBAL, **changes}), PAGE, CHUNK, PER_SEQ)


def test_page_groups_follow_what_each_kv_layers_readers_see():
    assert groups() == (PageGroup((5,), None), PageGroup((0, 1, 2, 3, 4), RING))
    # CLA2: the global layer 5 reads layer 4's KV, so that KV layer (index 2) keeps every page
    assert groups(kv_sources=cla(6, 2)) == (PageGroup((2,), None), PageGroup((0, 1), RING))
    assert groups(window_layers=tuple(range(6))) == (PageGroup(tuple(range(6)), RING),)  # Mistral: every layer
    assert groups(window_layers=()) == (PageGroup(tuple(range(6)), None),)
    assert groups(sliding_window=120) == (PageGroup(tuple(range(6)), None),)  # a ring as wide as the table: none
    streaming = ModelConfig(**LOCAL_GLOBAL, streaming_window=16)
    assert page_groups(streaming, PAGE, CHUNK, PER_SEQ) == (
        PageGroup(tuple(range(6)), streaming_pages(streaming, PAGE)),)
    # speculative verification writes K + 1 tokens before its first query reads: the ring holds that query's window
    # through the last token (StreamingLLM's ring counts positions modulo its tokens)
    for k in (4, 8, 20):
        (group,) = page_groups(streaming, PAGE, CHUNK, PER_SEQ, verify=k + 1)
        assert (group.ring - -(-streaming.streaming_sinks // PAGE)) * PAGE >= 16 + k, k


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_engine_on_window_rings_generates_what_dense_decoding_does(byte_tokenizer, kv_dtype):
    """Three requests with prompts past the window, prompt chunks of 8 beside decode rows: every greedy token
    equals the dense oracle's, window layers never hold more than their ring, and every page comes back."""
    cfg = ModelConfig(**LOCAL_GLOBAL)
    params = init_params(cfg, jax.random.PRNGKey(0))
    engine = Engine(LLM(cfg, byte_tokenizer, params, kv_dtype=kv_dtype), max_batch=3, page_size=PAGE,
                    prefill_chunk=CHUNK, prefill_budget=12, max_context=PER_SEQ * PAGE)
    assert [g.kv_layers for g in engine.groups] == [(5,), (0, 1, 2, 3, 4)] and not engine.prefix_caching
    full_pages, ring_pages = (a.num_pages for a in engine.allocators)
    assert ring_pages == 3 * RING < full_pages == 3 * PER_SEQ  # as many full-length sequences in each
    assert engine.pools[1].k_pages.shape[:3] == (5, cfg.n_kv_heads, ring_pages + 1)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (21, 30, 13)]
    for i, prompt in enumerate(prompts):
        engine.add(Request(prompt, max_tokens=12, request_id=str(i), ignore_eos=True))
    got, most_held = {}, 0
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        running = [s for s in engine.running if s is not None]
        held = engine.allocators[1].stats().used
        assert held <= RING * len(running), "window layers hold more than their rings"
        most_held = max(most_held, held)
    assert most_held == 3 * RING  # all three long sequences at once, each on its full ring
    assert engine.allocators[0].stats().used == engine.allocators[1].stats().used == 0
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == dense_greedy(cfg, params, prompt, 12), f"request {i} differs from dense decoding"


def test_plan_counts_what_each_layer_holds():
    """Gemma 3 12B at 8k: 8 global KV layers hold 8192 tokens, 40 window layers their ring of 1024 + a chunk;
    Mistral 7B at 32k: every layer a ring of 4096 + a chunk."""
    gemma = resolve_config("gemma-3-12b")
    p = plan(gemma, context=8192, batch=2)
    per_layer_token = p["kv_bytes_per_token"] // 48
    ring_tokens = (-(-(1024 + 63) // 16) + 1) * 16
    held = {row["layer"]: row["tokens_held"] for row in p["per_kv_layer"]}
    assert held == {layer: (8192 if (layer + 1) % 6 == 0 else ring_tokens) for layer in range(48)}
    assert p["kv_bytes_per_sequence"] == (8 * 8192 + 40 * ring_tokens) * per_layer_token
    assert p["kv_bytes"] == 2 * p["kv_bytes_per_sequence"]
    full = plan(gemma.replace(window_layers=()), context=8192, batch=1)
    assert full["kv_bytes_per_sequence"] == 48 * 8192 * per_layer_token
    mistral = plan(resolve_config("mistral-7b"), context=32768, batch=1)
    assert {row["tokens_held"] for row in mistral["per_kv_layer"]} == {(-(-(4096 + 63) // 16) + 1) * 16}
