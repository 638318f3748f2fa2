"""Speculative decoding (n-gram prompt lookup, verified in the ragged step): greedy and sampled output are the
non-speculative output token for token on every model kind it serves (sampled: with the same seeds); sampled output
keeps the exact distribution (against the dense forward's, on a small effective vocabulary); a seed reproduces a
request; pages past the kept tokens go back; the payoff turns verification off when it would be slower; bad values
are one clear line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from conftest import write_tiny_hf_model
from jaxkv.api import LLM
from jaxkv.cache.dense import KVCache
from jaxkv.cache.eviction import eviction_policy
from jaxkv.cli import main
from jaxkv.config import ModelConfig
from jaxkv.errors import InvalidRequest, JaxkvError
from jaxkv.generate.sampling import SamplingParams, filter_logits
from jaxkv.model.decoder import forward, init_params
from jaxkv.serve.engine import Engine, Limits, Request
from jaxkv.serve.speculative import EXPLORE, Acceptance, Payoff, Speculation, ngram_proposal, speculation
from jaxkv.sharing import cla, lckv
from test_engine import run

BASE = dict(vocab_size=258, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=256)
# LCKV: passes as long as a verification chunk, so that it converges to the token-by-token forward
KINDS = {"standard": dict(n_layers=2, n_kv_heads=4), "gqa": dict(n_layers=2),
         "cla2": dict(n_layers=4, kv_sources=cla(4, 2)),
         "lckv": dict(n_layers=4, kv_sources=lckv(4, 2), upward_passes_no_grad=8),
         "window": dict(n_layers=2, window_layers=(0,), sliding_window=8), "int8": dict(n_layers=2),
         "sinks": dict(n_layers=2, streaming_window=16, streaming_sinks=3)}  # StreamingLLM
ALWAYS = Speculation("ngram", 4, adaptive=False)  # verify whenever there are proposals


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    """Proposals and the length of the match they came from."""
    assert ngram_proposal([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == ([7, 8, 1], 3)  # the latest of two matches
    assert ngram_proposal([5, 6, 7, 6], 4) == ([7, 6], 1)  # no 3- or 2-token match: the last token alone
    assert ngram_proposal([1, 2, 3, 4], 2) == ([], 0)
    assert ngram_proposal([4], 2) == ([], 0)


@pytest.mark.parametrize("kind", KINDS)
def test_speculation_gives_the_tokens_of_plain_decoding(byte_tokenizer, kind):
    """Three requests (prompts that repeat themselves, greedy; one that does not, sampled with top-k and top-p)
    on two rows, beside prompt chunks: with ngram:4 every request's tokens are those of plain decoding with the
    same seeds and their log-probabilities agree, some proposals are kept (fewer steps), and every page comes
    back."""
    cfg = ModelConfig(**{**BASE, **KINDS[kind]})
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(1)),
              kv_dtype="int8" if kind == "int8" else None)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, 256, 10)] * 3, [int(t) for t in rng.integers(0, 256, 40)],
               [5, 6, 7] * 8]
    if kind == "sinks":  # prompts inside sinks + window; the tokens after them slide the window far on
        prompts = [p[:15] for p in prompts]
    sampling = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3), SamplingParams()]

    def generate(spec):
        engine = Engine(llm, max_batch=2, page_size=8, prefill_chunk=16, kv_dtype=llm.kv_dtype, speculative=spec)
        got = run(engine, [Request(p, s, max_tokens=24, request_id=str(i), ignore_eos=True, logprobs=True)
                           for i, (p, s) in enumerate(zip(prompts, sampling))])
        return got, engine.metrics()

    plain, plain_metrics = generate(None)
    spec, metrics = generate(ALWAYS)
    for i in map(str, range(len(prompts))):
        assert [t for o in spec[i] for t in o.token_ids] == [t for o in plain[i] for t in o.token_ids], f"request {i}"
        np.testing.assert_allclose([lp for o in spec[i] for lp in o.logprobs],
                                   [lp for o in plain[i] for lp in o.logprobs], atol=1e-4, err_msg=f"request {i}")
    assert metrics["speculative_accepted_total"] > 0
    assert metrics["steps_total"] < plain_metrics["steps_total"]
    assert metrics["generation_tokens_total"] == plain_metrics["generation_tokens_total"] == 72
    assert metrics["kv_pages_used"] == 0


def exact_distribution(cfg, params, prompt, n, sampling) -> dict[tuple, float]:
    """Probabilities of every continuation of n tokens under the dense forward and the filtered distribution
    (top-k keeps few, so few continuations have any)."""
    out = {}

    def extend(prefix, p):
        if len(prefix) == len(prompt) + n:
            out[tuple(prefix[len(prompt):])] = p
            return
        logits, _ = forward(cfg, params, jnp.asarray([prefix]), KVCache.init(cfg, 1, len(prefix)))
        filtered = filter_logits(logits[0, -1:], jnp.asarray([sampling.temperature]), jnp.asarray([sampling.top_k]),
                                 jnp.asarray([sampling.top_p]))
        probs = np.asarray(jax.nn.softmax(filtered[0]), np.float64)
        for token in np.flatnonzero(probs > 0):
            extend(prefix + [int(token)], p * probs[token])

    extend(list(prompt), 1.0)
    return out


def test_sampled_speculation_keeps_the_distribution(byte_tokenizer):
    """3 tokens after a prompt that holds every token of a 16-token vocabulary (so prompt lookup always proposes),
    temperature 1 and top-k 3 (27 continuations), 1500 seeds: the continuations with speculation (ngram:2: the
    second token verifies a proposal, the third is its bonus or drawn plainly) follow the exact distribution of
    the dense forward (chi-square over the likelier cells), and plain sampling does too. (16 prompts fill one
    step, then their rows verify together.)"""
    cfg = ModelConfig(**{**BASE, "vocab_size": 16}, n_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(7))
    llm = LLM(cfg, byte_tokenizer, params)
    prompt = [*range(16), 3, 4, 5]
    sampling = SamplingParams(temperature=1.0, top_k=3)
    exact = exact_distribution(cfg, params, prompt, 3, sampling)
    n = 1500
    for spec in (Speculation("ngram", 2, adaptive=False), None):
        engine = Engine(llm, max_batch=16, page_size=8, prefill_chunk=32, prefill_budget=16 * 32, speculative=spec,
                        limits=Limits(max_waiting=None, request_timeout_s=None))
        got = run(engine, [Request(prompt, max_tokens=3, request_id=str(i), ignore_eos=True,
                                   sampling=SamplingParams(temperature=1.0, top_k=3, seed=i)) for i in range(n)])
        counts = {}
        for outs in got.values():
            key = tuple(t for o in outs for t in o.token_ids)
            counts[key] = counts.get(key, 0) + 1
        assert set(counts) <= set(exact), spec  # nothing outside top-k
        cells = [c for c in exact if exact[c] * n >= 5]
        rest = 1 - sum(exact[c] for c in cells)
        observed = [counts.get(c, 0) for c in cells] + [n - sum(counts.get(c, 0) for c in cells)]
        expected = [exact[c] * n for c in cells] + [rest * n]
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
        assert chi2 < CHI2_999[len(cells) - (rest * n < 1e-9)], (spec, chi2, len(cells))
        if spec:
            assert engine.metrics()["speculative_proposed_total"] > n // 2  # verification did the sampling


# 99.9% quantiles of chi-square by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
            11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 16: 39.25, 17: 40.79, 18: 42.31, 19: 43.82,
            20: 45.31, 21: 46.80, 22: 48.27, 23: 49.73, 24: 51.18, 25: 52.62, 26: 54.05}


def test_a_seed_reproduces_a_speculative_request(byte_tokenizer):
    """A sampled request gives the same tokens alone, beside others, and without speculation."""
    cfg = ModelConfig(**BASE, n_layers=2)
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(2)))
    prompt = [10, 11, 12, 13, 14] * 5
    outs = []
    for batch, spec in ((1, ALWAYS), (3, ALWAYS), (1, None)):
        engine = Engine(llm, max_batch=4, page_size=8, prefill_chunk=16, speculative=spec)
        requests = [Request(prompt, max_tokens=20, request_id="r", sampling=SamplingParams(temperature=0.8, seed=5))]
        requests += [Request(prompt[:7 + i], max_tokens=5, request_id=str(i)) for i in range(batch - 1)]
        outs.append([t for o in run(engine, requests)["r"] for t in o.token_ids])
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 20


def test_acceptance_counts_kept_and_rejected_proposals_per_source():
    """A source's acceptance a = (kept + prior) / (kept + rejected + 1), decayed per update, and the tokens a step
    expects from k proposals, 1 + a + ... + a^k. A step that sampled fewer tokens than were proposed, all as
    proposed, rejected none. Sources (match lengths) count apart."""
    acceptance = Acceptance()
    assert acceptance.expected_tokens(3, 4) == pytest.approx(1 + 0.5 + 0.25 + 0.125 + 0.0625)
    assert acceptance.update(3, [1, 2, 3], [1, 2, 9]) == 2
    assert acceptance.expected_tokens(3, 2) == pytest.approx(1 + 0.625 + 0.625 ** 2)
    assert acceptance.update(3, [4, 5, 6, 7], [4, 5]) == 2  # a plain step of two tokens: both as proposed
    assert (acceptance.kept[3], acceptance.rejected[3]) == (pytest.approx(0.9 * 2 + 2), pytest.approx(0.9))
    assert acceptance.update(1, [4, 5], [6, 5]) == 0
    assert acceptance.rate(1) == pytest.approx(0.5 / 2) and acceptance.rate(2, prior=0.9) == pytest.approx(0.9)


def test_payoff_verifies_when_the_expected_tokens_per_second_are_higher():
    """Verification is timed first, then plain decoding; then it verifies when tokens per second favour it, and
    every EXPLORE-th decision tries the other option, unless it is expected at under half the rate; beside a
    request that does not speculate, only when that request keeps 95% of its plain tokens/s."""
    payoff = Payoff()
    assert payoff.verify(4, 3, [2.0, 1.0], iters=8)
    payoff.record((16, 4, 4, 1), 0.02)  # 4 rows of 1 + 3 tokens: 20 ms
    assert not payoff.verify(4, 3, [2.0, 1.0], iters=8)
    payoff.record((4, 4, 1, 8), 0.08)  # 8 plain tokens per row: 10 ms each
    choices = [payoff.verify(4, 3, [2.5, 2.0], iters=8) for _ in range(EXPLORE)]  # 2.25 per row in 20 ms: faster
    assert all(choices[:-1]) and not choices[-1]
    choices = [payoff.verify(4, 3, [1.5, 2.0], iters=8) for _ in range(EXPLORE)]  # 1.75 in 20 ms: slower
    assert not any(choices[:-1]) and choices[-1]
    choices = [payoff.verify(4, 3, [1.0, 0.8], iters=8) for _ in range(EXPLORE)]  # 0.9 in 20 ms: under half
    assert not any(choices)  # never tried again
    assert not payoff.verify(4, 3, [2.5, 2.0], iters=8, bystander=True)  # it would get 1 token in 20 ms, not 2
    payoff.record((4, 4, 1, 1), 0.0195)
    assert payoff.verify(4, 3, [2.5, 2.0], iters=1, bystander=True)  # 1 token in 20 ms, not 19.5: within 5%
    payoff.record((16, 4, 4, 1), 0.01)  # a running mean: 0.8 x 20 + 0.2 x 10 ms
    assert payoff.seconds[(16, 4, 4, 1)] == pytest.approx(0.018)


def test_the_engine_stops_verifying_when_it_does_not_pay(byte_tokenizer):
    """With verification timed far slower than plain decoding, an adaptive engine feeds no proposals (but still
    counts how they would have fared); timed far faster, it verifies. The tokens are the same either way."""
    cfg = ModelConfig(**BASE, n_layers=2)
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(2)))
    request = dict(prompt_ids=[7, 8, 9] * 8, max_tokens=16, ignore_eos=True, request_id="r")
    outs = []
    for verify_seconds in (10.0, 1e-6):
        engine = Engine(llm, max_batch=4, page_size=8, prefill_chunk=16, speculative=speculation("ngram:4"))
        for rows in engine._shapes().decode_rows:
            engine.payoff.seconds[(rows * 5, rows, 5, 1)] = verify_seconds
            engine.payoff.seconds[(rows, rows, 1, 1)] = 1e-3
        engine.payoff.record = lambda *_: None  # keep the times given
        outs.append([t for o in run(engine, [Request(**request)])["r"] for t in o.token_ids])
        seq_metrics = engine.metrics()
        if verify_seconds > 1:
            assert seq_metrics["speculative_proposed_total"] == 0
        else:
            assert seq_metrics["speculative_verified_rows_total"] > 0
    assert outs[0] == outs[1]


def test_a_request_chooses_its_own_k(byte_tokenizer):
    """num_speculative_tokens: 0 proposes nothing, 2 at most 2 per step (of the engine's 4), the same tokens; more
    than the engine's K, or any on an engine that does not speculate, is refused naming the field."""
    cfg = ModelConfig(**BASE, n_layers=2)
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(2)))
    request = dict(prompt_ids=[7, 8, 9] * 8, max_tokens=16, ignore_eos=True, request_id="r")
    outs = []
    for k in (None, 0, 2):
        engine = Engine(llm, max_batch=2, page_size=8, prefill_chunk=16, speculative=ALWAYS)
        outs.append([t for o in run(engine, [Request(**request, num_speculative_tokens=k)])["r"]
                     for t in o.token_ids])
        m = engine.metrics()
        if k == 0:
            assert m["speculative_proposed_total"] == 0
        else:
            assert 0 < m["speculative_proposed_total"] <= (k or 4) * m["speculative_verified_rows_total"]
    assert outs[0] == outs[1] == outs[2]
    with pytest.raises(InvalidRequest, match="num_speculative_tokens must be at most 4, the server's speculative K"):
        engine.check(Request(**request, num_speculative_tokens=5))
    with pytest.raises(InvalidRequest, match="this server does not speculate"):
        Engine(llm, max_batch=2, page_size=8).check(Request(**request, num_speculative_tokens=1))


@pytest.mark.parametrize("spec, message", [
    ("ngram:0", r"speculative ngram needs K, the tokens proposed per step, an integer >= 1: got 'ngram:0'"),
    ("ngram", r"speculative ngram needs K"), ("ngram:x", r"speculative ngram needs K"),
    ("eagle:3", r"speculative must be ngram:K or draft:MODEL:K, got 'eagle:3'"),
    ("draft:3", r"speculative draft needs a model: draft:MODEL:K \(a model as --model takes, or first-N"),
])
def test_bad_speculative_values_are_one_line(spec, message):
    with pytest.raises(JaxkvError, match=message):
        speculation(spec)
    with pytest.raises(JaxkvError, match=message):  # before any weights are read
        jaxkv.load("/nonexistent/model", speculative=spec)


def test_speculation_refuses_what_it_does_not_compose_with_yet(byte_tokenizer):
    cfg = ModelConfig(**{**BASE, "head_dim": 32}, n_layers=2)
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(0)))
    spec = speculation("ngram:4")
    with pytest.raises(JaxkvError, match="speculative decoding does not compose with token eviction yet"):
        Engine(llm, speculative=spec, eviction=eviction_policy("h2o", 32))
    with pytest.raises(JaxkvError, match="speculative decoding does not compose with KV dtype kivi2 yet"):
        Engine(llm, page_size=32, kv_dtype="kivi2", speculative=spec)
    streaming = LLM(cfg.replace(streaming_window=16, streaming_sinks=4), byte_tokenizer, llm.params)
    with pytest.raises(JaxkvError, match="speculative draft models do not compose with StreamingLLM yet"):
        Engine(streaming, speculative=Speculation("draft", 4, draft=llm))


def test_cli_generate_speculative_json(tmp_path, capsys):
    """`jaxkv generate --speculative ngram:4 --json` on a tiny HF model: the tokens of the plain run, and how its
    verifications fared (the payoff decides how many there are); a bad K is one line."""
    write_tiny_hf_model(tmp_path, "llama-bias")
    argv = ["generate", "--model", str(tmp_path), "--prompt", "abcabcabcabcabcabc", "--max-new-tokens", "24",
            "--ignore-eos", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--speculative", "ngram:4"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["token_ids"] == plain["token_ids"] and len(spec["token_ids"]) == 24
    assert "speculative_acceptance_rate" not in plain and 0 <= spec["speculative_acceptance_rate"] <= 1
    assert 1 <= spec["speculative_tokens_per_verify"] <= 5  # the first decode step verifies (it is timed first)
    assert main([*argv, "--speculative", "ngram:0"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxkv")]
    assert err == ["jaxkv: error: speculative ngram needs K, the tokens proposed per step, an integer >= 1: got "
                   "'ngram:0'"]
