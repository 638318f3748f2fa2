"""The serving engine against the one-shot generator (an independent path: dense or paged, unchunked, unbatched)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from conftest import byte_tokenizer_files
from jaxkv.api import LLM
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.generate.generator import Generator
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import forward, init_params
from jaxkv.serve.detokenize import TextStream
from jaxkv.serve.engine import Engine, Request
from jaxkv.sharing import cla, lckv
from jaxkv.tokenizer import Tokenizer


def run(engine: Engine, requests) -> dict[str, list]:
    """Every request to completion: request id -> its outputs in order."""
    for request in requests:
        engine.add(request)
    outputs = collections.defaultdict(list)
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def tokens_of(outputs) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def check_finished_once(outputs) -> None:
    assert [out.finished for out in outputs] == [False] * (len(outputs) - 1) + [True]


# --- every model kind on a tiny random model ---------------------------------------------------
@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("bytes")
    byte_tokenizer_files(directory)
    return Tokenizer.load(directory)


KINDS = {  # name -> (ModelConfig changes, kv_dtype)
    "standard": (dict(n_kv_heads=4), None),
    "gqa": (dict(), None),
    "mqa": (dict(n_kv_heads=1), None),
    "cla2": (dict(kv_sources=cla(4, 2)), None),
    "lckv": (dict(kv_sources=lckv(4, 2), upward_passes_no_grad=24), None),
    "int8": (dict(kv_sources=cla(4, 2)), "int8"),
    "sinks+window": (dict(streaming_window=24, streaming_sinks=4), None),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_serves_the_generators_greedy_tokens(kind, byte_tokenizer):
    """Eight requests of different lengths on five slots, prefilled in chunks of 16 (several per step), decoded
    in packed rows that change as requests finish: each gets what it would alone."""
    changes, kv_dtype = KINDS[kind]
    cfg = ModelConfig(**{**dict(vocab_size=258, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                                mlp_dim=64, max_seq_len=96), **changes})
    params = init_params(cfg, jax.random.PRNGKey(3))
    llm = LLM(cfg, byte_tokenizer, params)
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(0, 256, n)] for n in (3, 17, 28, 9, 20, 5, 26, 12)]
    longest = 80 if cfg.streaming_window else 24  # streaming: past max_seq_len
    budgets = [longest - 5 * (i % 4) for i in range(len(prompts))]
    engine = Engine(llm, max_batch=5, page_size=8, prefill_chunk=16, kv_dtype=kv_dtype)
    got = run(engine, [Request(p, max_tokens=n, request_id=str(i)) for i, (p, n) in enumerate(zip(prompts, budgets))])
    generator = Generator(cfg, params, byte_tokenizer.eos_ids, kv_dtype=kv_dtype, page_size=8)
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        want = generator.generate([prompt], budget, SamplingParams())[0].token_ids
        assert tokens_of(got[str(i)]) == want, f"request {i}"
        check_finished_once(got[str(i)])
    if cfg.kv_sources != tuple(range(4)):
        assert engine.cache.k_pages.shape[0] == cfg.n_kv_layers < cfg.n_layers  # pools only for KV layers
    assert engine.allocator.stats().used == 0


# --- the real model ------------------------------------------------------------------------------

SYSTEM = ("You are a careful assistant who answers questions about Shakespeare's plays in one short sentence, "
          "quoting the play when you can.\n")
QUESTIONS = ["Who is Hamlet's father?", "Where is Twelfth Night set?", "Who wrote Henry V?", "What is a sonnet?",
             "Name a Roman play."]


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint):
    return jaxkv.load(str(smollm2_checkpoint))


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(SYSTEM + q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def alone(llm, prompts) -> list[list[int]]:
    """Each prompt's greedy continuation from the one-shot generator."""
    return [llm.generator.generate([p], 12, SamplingParams())[0].token_ids for p in prompts]


@pytest.mark.slow
def test_prefix_cache_serves_the_shared_system_prompt_without_recomputing_it(llm, prompts, alone):
    engine = Engine(llm, max_batch=2, max_context=512, page_size=16, prefill_chunk=32)
    first = run(engine, [Request(prompts[0], max_tokens=12, request_id="first")])
    assert first["first"][-1].cached_tokens == 0
    rest = run(engine, [Request(p, max_tokens=12, request_id=str(i)) for i, p in enumerate(prompts[1:], 1)])
    shared_pages = len(llm.tokenizer.encode(SYSTEM)) // 16
    metrics = engine.metrics()
    for i in range(1, len(prompts)):
        assert rest[str(i)][-1].cached_tokens >= 16 * shared_pages > 0
        assert tokens_of(rest[str(i)]) == alone[i]
    assert tokens_of(first["first"]) == alone[0]
    cached = sum(rest[str(i)][-1].cached_tokens for i in range(1, len(prompts)))
    assert metrics["prefilled_tokens_total"] == sum(map(len, prompts)) - cached  # counted, not recomputed
    assert metrics["prefix_cache_hit_rate"] == pytest.approx(cached / sum(map(len, prompts)))
    assert metrics["kv_pages_used"] == 0 and metrics["kv_pages_cached"] > 0


@pytest.mark.slow
def test_pool_exhaustion_preempts_and_recomputes_without_losing_anything(llm, prompts, alone):
    """Four slots but pages for about two requests: requests are preempted mid-generation and redone."""
    engine = Engine(llm, max_batch=4, max_context=512, page_size=16, num_pages=9, prefill_chunk=32, prefix_caching=False)
    got = run(engine, [Request(p, max_tokens=12, request_id=str(i)) for i, p in enumerate(prompts)])
    assert engine.metrics()["preemptions_total"] > 0
    assert sorted(got) == [str(i) for i in range(len(prompts))]
    for i in range(len(prompts)):
        check_finished_once(got[str(i)])
        assert tokens_of(got[str(i)]) == alone[i]  # none lost, duplicated or corrupted
        assert "".join(o.text for o in got[str(i)]) == llm.tokenizer.decode(alone[i])
    assert engine.allocator.stats().used == 0


@pytest.mark.slow
def test_abort_frees_pages_and_the_others_carry_on(llm, prompts, alone):
    engine = Engine(llm, max_batch=2, max_context=512, page_size=16, prefill_chunk=32, prefix_caching=False)
    engine.add(Request(prompts[0], max_tokens=12, request_id="keep"))
    engine.add(Request(prompts[1], max_tokens=12, request_id="drop"))
    outputs = collections.defaultdict(list)
    for _ in range(4):
        for out in engine.step():
            outputs[out.request_id].append(out)
    used_by_both = engine.allocator.stats().used
    engine.abort("drop")
    assert engine.allocator.stats().used < used_by_both
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert outputs["drop"][-1].finish_reason == "abort"
    assert tokens_of(outputs["keep"]) == alone[0]
    assert engine.allocator.stats().used == 0


@pytest.mark.slow
def test_seeded_sampling_logprobs_stops_and_no_compiles_after_warmup(llm, prompts):
    engine = Engine(llm, max_batch=4, max_context=512, page_size=16, prefill_chunk=32)
    engine.warmup()
    compiled = engine.executables.count
    sampled = SamplingParams(temperature=0.8, top_k=40, seed=3)
    solo = run(engine, [Request(prompts[2], sampled, max_tokens=10, logprobs=True, request_id="solo")])["solo"]
    crowd = run(engine, [Request(prompts[2], sampled, max_tokens=10, logprobs=True, request_id="again")] +
                [Request(p, SamplingParams(temperature=1.0, seed=i), max_tokens=10) for i, p in enumerate(prompts)])
    assert tokens_of(crowd["again"]) == tokens_of(solo)  # the seed, not the batch, decides
    assert engine.executables.count == compiled  # no compilation after warm-up

    ids = prompts[2] + tokens_of(solo)
    logits, _ = forward(llm.config, llm.params, jnp.asarray([ids]), _dense(llm.config, len(ids)), all_logits=True)
    want = jax.nn.log_softmax(logits[0, len(prompts[2]) - 1:-1])[np.arange(10), np.asarray(tokens_of(solo))]
    np.testing.assert_allclose([lp for o in solo for lp in o.logprobs], want, atol=2e-3)

    text = llm.tokenizer.decode(tokens_of(solo))
    stop = text[3:6]
    stopped = run(engine, [Request(prompts[2], sampled, max_tokens=10, stop=(stop,), request_id="stop")])["stop"]
    assert stopped[-1].finish_reason == "stop"
    assert "".join(o.text for o in stopped) == text[:text.find(stop)]


def _dense(cfg, length):
    from jaxkv.cache.dense import KVCache

    return KVCache.init(cfg, 1, length)


def test_bad_requests_are_refused_and_leave_nothing_behind(byte_tokenizer):
    cfg = ModelConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                      max_seq_len=32)
    engine = Engine(LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(0))), max_batch=2, page_size=8)
    for request, message in [(Request([], max_tokens=4), "empty"), (Request([1] * 32, max_tokens=1), "at most 31"),
                             (Request([1] * 8, max_tokens=0), "max_tokens"),
                             (Request([1] * 8, max_tokens=30), "exceeds the context"),
                             (Request([300], max_tokens=2), "token ids")]:
        with pytest.raises(JaxkvError, match=message):
            engine.add(request)
    assert not engine.has_work()


def test_text_stream_never_emits_half_characters_or_stop_strings(smollm2_checkpoint):
    tokenizer = Tokenizer.load(smollm2_checkpoint)
    text = "Café 🎭 naïve — “quoted” 日本語 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer.decode)
    deltas = [stream.add([i]) for i in ids] + [stream.add([], final=True)]
    assert "".join(deltas) == tokenizer.decode(ids) and not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # the emoji and CJK bytes arrive over several tokens

    stream = TextStream(tokenizer.decode, stop=("quoted”",))
    deltas = [stream.add([i]) for i in ids]
    assert stream.stopped and "".join(deltas) == text[:text.find("quoted”")]
    assert not any("quot" in d for d in deltas)


def test_a_failed_device_call_loses_no_request_and_no_token(byte_tokenizer, monkeypatch):
    """The third device call raises (its donated cache is gone): the engine starts from fresh pools, recomputes
    the running requests, and every client still gets exactly the greedy tokens."""
    cfg = ModelConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                      max_seq_len=64)
    params = init_params(cfg, jax.random.PRNGKey(5))
    engine = Engine(LLM(cfg, byte_tokenizer, params), max_batch=2, page_size=8, prefill_chunk=16)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [100] * 12]
    for i, prompt in enumerate(prompts):
        engine.add(Request(prompt, max_tokens=10, request_id=str(i)))
    run_once, calls = engine.executables.run, []

    def flaky(fn, donate, *args, **static):
        calls.append(fn.__name__)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return run_once(fn, donate, *args, **static)

    monkeypatch.setattr(engine.executables, "run", flaky)
    outputs, failures = collections.defaultdict(list), 0
    while engine.has_work():
        try:
            for out in engine.step():
                outputs[out.request_id].append(out)
        except RuntimeError:
            failures += 1
    generator = Generator(cfg, params, byte_tokenizer.eos_ids)
    assert failures == 1
    for i, prompt in enumerate(prompts):
        assert tokens_of(outputs[str(i)]) == generator.generate([prompt], 10, SamplingParams())[0].token_ids
        check_finished_once(outputs[str(i)])
    assert engine.allocator.stats().used == 0


def test_steps_prefill_within_the_budget_and_decode_in_the_smallest_shape(byte_tokenizer, monkeypatch):
    """Each step prefills at most `prefill_budget` prompt tokens, across requests; each decode call packs the
    generating requests into the smallest row bucket and the narrowest table width that hold them."""
    cfg = ModelConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                      max_seq_len=64)
    engine = Engine(LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(6))), max_batch=8, page_size=8,
                    prefill_chunk=16, prefill_budget=24)
    rows_options, widths = engine._decode_shapes()
    assert (rows_options, widths) == ([4, 8], [1, 2, 4, 6, 8])
    run_once, decodes = engine.executables.run, []

    def record(fn, donate, *args, **static):
        if fn.__name__ == "_decode_step":
            tables, lengths, active = args[3], args[4], args[6]
            decodes.append((tables.shape, int(active.sum()), -(-(int(lengths[active > 0].max()) + 1) // 8)))
        return run_once(fn, donate, *args, **static)

    monkeypatch.setattr(engine.executables, "run", record)
    for i in range(6):
        engine.add(Request([i + 1] * 20, max_tokens=3 + 4 * i, request_id=str(i)))
    prefilled, firsts = [], []
    while engine.has_work():
        before = engine.metrics()["prefilled_tokens_total"]
        outputs = engine.step()
        prefilled.append(engine.metrics()["prefilled_tokens_total"] - before)
        firsts.append(sum(out.completion_tokens == 1 for out in outputs))
    assert max(prefilled) == 24 and sum(prefilled) == 6 * 20
    assert max(firsts) >= 2  # several requests finished prefilling in one step
    for (rows, width), active, need in decodes:
        assert rows == min(r for r in rows_options if r >= active)
        assert width == min(w for w in widths if w >= need)
    assert {shape[0] for shape, _, _ in decodes} == {4, 8}  # the batch shrank as requests finished
