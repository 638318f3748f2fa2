"""Token eviction (H2O, SnapKV) in the engine against their literal token-by-token implementation on a dense cache
(tests/eviction_reference.py): the same distributions at every generated token, hence the same kept tokens; pages
past the budget go back to the allocator; the prefix cache stays right; bad values are one clear line."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eviction_reference import EvictingDenseModel
from jaxkv.api import LLM
from jaxkv.cache.eviction import eviction_policy
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import init_params
from jaxkv.serve.engine import Engine, Request
from jaxkv.sharing import cla, lckv

BUDGET, WINDOW, PAGE = 24, 8, 8
BASE = dict(vocab_size=258, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=128)
# LCKV: passes as long as a prompt chunk, so that chunked prefill converges to the token-by-token forward
MODELS = {"gqa": dict(n_layers=2), "cla2": dict(n_layers=4, kv_sources=cla(4, 2)),
          "lckv": dict(n_layers=4, kv_sources=lckv(4, 2), upward_passes_no_grad=16)}


def run(engine, requests) -> dict[str, list]:
    for request in requests:
        engine.add(request)
    outputs = {}
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def oracle(cfg, params, policy, prompt, n, kivi=None):
    model = EvictingDenseModel(cfg, params, method=policy.method, budget=policy.budget, window=policy.window,
                               kernel=policy.kernel, sinks=policy.sinks, kivi=kivi)
    tokens, logits = model.generate(prompt, n)
    return tokens, [lg - np.log(np.sum(np.exp(lg - lg.max()))) - lg.max() for lg in logits]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["h2o", "snapkv"])
def test_engine_keeps_what_literal_eviction_keeps(byte_tokenizer, method, model):
    """Three prompts (two past the budget, one under it) on two rows, prefilled in chunks of 16 beside decode rows:
    each request's log-probabilities at every generated token equal the literal implementation's, whose own kept
    tokens matter (they differ from keeping everything), and every page comes back."""
    cfg = ModelConfig(**BASE, **MODELS[model])
    params = init_params(cfg, jax.random.PRNGKey(1))
    policy = eviction_policy(method, BUDGET, WINDOW)
    engine = Engine(LLM(cfg, byte_tokenizer, params), max_batch=2, page_size=PAGE, prefill_chunk=16, eviction=policy)
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (45, 17, 60)]
    got = run(engine, [Request(p, max_tokens=12, request_id=str(i), ignore_eos=True, distributions=True)
                       for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        tokens, log_probs = oracle(cfg, params, policy, prompt, 12)
        outs = got[str(i)]
        assert [t for out in outs for t in out.token_ids] == tokens, f"request {i}"
        distributions = np.concatenate([out.distributions for out in outs])
        np.testing.assert_allclose(distributions, np.stack(log_probs), atol=2e-4, err_msg=f"request {i}")
    _, everything = oracle(cfg, params, eviction_policy(method, 10_000, WINDOW), prompts[2], 12)
    _, evicting = oracle(cfg, params, policy, prompts[2], 12)
    assert max(np.abs(a - b).max() for a, b in zip(everything, evicting)) > 1e-3  # what is kept shows
    m = engine.metrics()
    assert m["kv_pages_used"] == 0
    past = [len(p) - BUDGET for p in prompts if len(p) > BUDGET]
    if method == "snapkv":  # the prompt cut once; generated tokens all kept
        assert m["kv_tokens_evicted_total"] == sum(past)
    else:  # then one a generated token fed (the last one emitted is never fed: 11 of 12), 4 for the short prompt
        assert m["kv_tokens_evicted_total"] == sum(p + 11 for p in past) + (17 + 11 - BUDGET)


@pytest.mark.parametrize("model", ["gqa", "cla2"])
def test_attention_sinks_are_always_kept(byte_tokenizer, model):
    """--eviction-sinks 4: the first 4 tokens are never candidates. The engine equals the literal implementation
    with sinks, which keeps them in every head and differs from the one without. (SnapKV: H2O's votes favour the
    first tokens anyway, as every later query sees them, so here it would keep them without sinks too.)"""
    method = "snapkv"
    cfg = ModelConfig(**BASE, **MODELS[model])
    params = init_params(cfg, jax.random.PRNGKey(5))
    policy = eviction_policy(method, BUDGET, WINDOW, sinks=4)
    engine = Engine(LLM(cfg, byte_tokenizer, params), max_batch=2, page_size=PAGE, prefill_chunk=16, eviction=policy)
    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (70, 30)]
    got = run(engine, [Request(p, max_tokens=8, request_id=str(i), ignore_eos=True, distributions=True)
                       for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        model_ = EvictingDenseModel(cfg, params, method=method, budget=BUDGET, window=WINDOW, kernel=policy.kernel,
                                    sinks=4)
        tokens, logits = model_.generate(prompt, 8)
        assert all(kept[:4] == [0, 1, 2, 3] for heads in model_.kept() for kept in heads)
        log_probs = [lg - np.log(np.sum(np.exp(lg - lg.max()))) - lg.max() for lg in logits]
        np.testing.assert_allclose(np.concatenate([out.distributions for out in got[str(i)]]), np.stack(log_probs),
                                   atol=2e-4, err_msg=f"request {i}")
        assert [t for out in got[str(i)] for t in out.token_ids] == tokens, f"request {i}"
    _, without = oracle(cfg, params, eviction_policy(method, BUDGET, WINDOW), prompts[0], 8)
    _, with_sinks = oracle(cfg, params, policy, prompts[0], 8)
    assert max(np.abs(a - b).max() for a, b in zip(without, with_sinks)) > 1e-3  # the sinks' keeping shows
    assert engine.metrics()["kv_pages_used"] == 0


@pytest.mark.parametrize("method, kv_dtype, model", [("h2o", "kivi4", "gqa"), ("h2o", "kivi2", "cla2"),
                                                    ("snapkv", "kivi2", "gqa"), ("snapkv", "kivi4", "cla2")])
def test_eviction_on_kivi_pages_is_the_literal_one(byte_tokenizer, method, kv_dtype, model):
    """KIVI composed with eviction: a cut reads the kept tokens (dequantized, or from the ring) and quantizes
    their first pages anew, as the evicting dense model with KIVI's storage does (pages outside the last 32 tokens
    quantized literally, before any query reads them). Prompts of 150 and 100 tokens (one prefill chunk each) and
    one of 40 under the budget of 80 (one quantized page after each cut): the same log-probabilities at every
    generated token (they agree to 1e-6; SnapKV's kept pages mix tokens of several old pages, and not quantizing
    them anew moves the distributions by 2e-4), and every page back."""
    cfg = ModelConfig(**{**BASE, "head_dim": 32, "max_seq_len": 256}, **MODELS[model])
    params = init_params(cfg, jax.random.PRNGKey(3))
    policy = eviction_policy(method, 80, 16)
    bits = int(kv_dtype[-1])
    engine = Engine(LLM(cfg, byte_tokenizer, params, kv_dtype=kv_dtype, kv_recent=32), max_batch=2, page_size=32,
                    prefill_chunk=256, kv_dtype=kv_dtype, eviction=policy)
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (150, 40, 100)]
    got = run(engine, [Request(p, max_tokens=10, request_id=str(i), ignore_eos=True, distributions=True)
                       for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        tokens, log_probs = oracle(cfg, params, policy, prompt, 10, kivi=(bits, 32))
        distributions = np.concatenate([out.distributions for out in got[str(i)]])
        np.testing.assert_allclose(distributions, np.stack(log_probs), atol=1e-5, err_msg=f"request {i}")
        assert [t for out in got[str(i)] for t in out.token_ids] == tokens, f"request {i}"
    _, unquantized = oracle(cfg, params, policy, prompts[0], 10)
    _, quantized = oracle(cfg, params, policy, prompts[0], 10, kivi=(bits, 32))
    assert max(np.abs(a - b).max() for a, b in zip(unquantized, quantized)) > 1e-2  # the quantization shows
    assert engine.metrics()["kv_pages_used"] == 0


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_pages_past_the_budget_go_back(byte_tokenizer, kv_dtype):
    """Right after its prompt a sequence holds cdiv(budget, page_size) pages, and the bytes it reports are theirs;
    quantized pages are cut the same way (their scales move with them)."""
    cfg = ModelConfig(**{**BASE, "head_dim": 64 if kv_dtype == "int4" else 8}, n_layers=2)
    policy = eviction_policy("h2o", BUDGET, WINDOW)
    engine = Engine(LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(0))), max_batch=2, page_size=PAGE,
                    prefill_chunk=16, kv_dtype=kv_dtype, eviction=policy)
    engine.add(Request(list(range(70)), max_tokens=6, request_id="long", ignore_eos=True))
    held = []
    while engine.has_work():
        for out in engine.step():
            held.append((len(engine.allocators[0].pages("long")) if engine.allocators[0].holds("long") else 0,
                         out.kv_bytes))
    page_bytes = engine._page_bytes[0]
    assert held[0] == (-(-BUDGET // PAGE), -(-BUDGET // PAGE) * page_bytes)  # cut as the first token came out
    assert all(pages <= -(-(BUDGET + 1) // PAGE) for pages, _ in held)
    assert engine.metrics()["kv_pages_used"] == 0


def test_prefix_cache_stays_right_for_evicting_sequences(byte_tokenizer):
    """Requests with a common 40-token prefix: the second and third reuse the first's cached pages, and each cut
    moves off them first, so every request still equals the literal H2O of its own prompt."""
    cfg = ModelConfig(**BASE, n_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(4))
    policy = eviction_policy("h2o", BUDGET, WINDOW)
    engine = Engine(LLM(cfg, byte_tokenizer, params), max_batch=2, page_size=PAGE, prefill_chunk=16, eviction=policy)
    prefix = [int(t) for t in np.random.default_rng(5).integers(0, 256, 40)]
    prompts = [prefix + [7, 8, 9], prefix + [100] * 5, prefix + [3]]
    got = run(engine, [Request(prompts[0], max_tokens=8, request_id="0", ignore_eos=True)])
    got.update(run(engine, [Request(p, max_tokens=8, request_id=str(i), ignore_eos=True)
                            for i, p in enumerate(prompts[1:], 1)]))
    assert engine.metrics()["cached_tokens_total"] >= 2 * 40 // PAGE * PAGE  # the later two reused the prefix
    for i, prompt in enumerate(prompts):
        assert [t for out in got[str(i)] for t in out.token_ids] == oracle(cfg, params, policy, prompt, 8)[0], i


@pytest.mark.parametrize("args, message", [
    (("h2o", None, None), "eviction h2o needs a KV budget"),
    (("lru", 64, None), "eviction must be one of h2o, snapkv, got 'lru'"),
    ((None, 64, None), "--kv-budget, --eviction-window and --eviction-sinks need --eviction"),
    ((None, None, None, 4), "--kv-budget, --eviction-window and --eviction-sinks need --eviction"),
    (("snapkv", 16, 16), "the eviction window must be at least 1 and below the KV budget \\(16\\), got 16"),
    (("h2o", 1, None), "the KV budget must be at least 2 tokens, got 1"),
    (("h2o", 16, 8, 8), r"the KV budget \(16\) must exceed the eviction sinks \(8\) plus the eviction window \(8\)"),
    (("h2o", 16, None, -1), "eviction sinks must be at least 0, got -1"),
])
def test_bad_eviction_values_are_one_line(args, message):
    with pytest.raises(JaxkvError, match=message):
        eviction_policy(*args)


def test_eviction_refuses_windows_and_streaming(byte_tokenizer):
    policy = eviction_policy("h2o", BUDGET, WINDOW)
    for changes in (dict(sliding_window=8, window_layers=(1,)), dict(streaming_window=16, streaming_sinks=4)):
        cfg = ModelConfig(**BASE, n_layers=2, **changes)
        with pytest.raises(JaxkvError, match="token eviction needs every layer to attend to the whole sequence"):
            Engine(LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(0))), eviction=policy)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["h2o", "snapkv"]), seed=st.integers(0, 2**16),
       lengths=st.lists(st.integers(1, 50), min_size=1, max_size=4),
       aborts=st.lists(st.integers(0, 20), max_size=2))
def test_no_page_leaks_under_random_streams(byte_tokenizer, stream_executables, method, seed, lengths, aborts):
    """Requests of random lengths (some sharing a prefix) on a pool too small for them all, so that some are
    preempted and recomputed, and some aborted at random steps: each ends exactly once and every page comes back."""
    cfg, params, executables = stream_executables
    engine = Engine(LLM(cfg, byte_tokenizer, params), max_batch=2, page_size=PAGE, prefill_chunk=16, num_pages=11,
                    eviction=eviction_policy(method, BUDGET, WINDOW), executables=executables)
    rng = np.random.default_rng(seed)
    prefix = [int(t) for t in rng.integers(0, 256, 24)]
    for i, n in enumerate(lengths):
        prompt = (prefix if i % 2 else []) + [int(t) for t in rng.integers(0, 256, n)]
        engine.add(Request(prompt, max_tokens=int(rng.integers(1, 16)), request_id=str(i), ignore_eos=True))
    finished, step = collections.Counter(), 0
    while engine.has_work():
        if step in aborts:
            engine.abort(str(int(rng.integers(0, len(lengths)))))
        for out in engine.step():
            finished[out.request_id] += out.finished
        step += 1
    assert finished == collections.Counter({str(i): 1 for i in range(len(lengths))})
    assert engine.metrics()["kv_pages_used"] == 0


@pytest.fixture(scope="module")
def stream_executables():
    """One model and one set of compiled steps for every generated stream."""
    from jaxkv.serve.compiled import Executables

    cfg = ModelConfig(**BASE, n_layers=2)
    return cfg, init_params(cfg, jax.random.PRNGKey(6)), Executables()
