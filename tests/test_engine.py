"""The engine (the one runtime) against greedy decoding on a dense cache, one token at a time (`dense_greedy`: no
pages, chunks or batch), and against itself alone where the dense path cannot follow (int8 pages, StreamingLLM)."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from conftest import POISON_SEED, dense_greedy, failing_device, first_layers, poisoned
from jaxkv.api import LLM
from jaxkv.cache.dense import KVCache
from jaxkv.config import ModelConfig
from jaxkv.errors import DeadlineExceeded, InvalidRequest, QueueFull
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import forward, init_params
from jaxkv.serve.engine import Engine, EngineStepError, Limits, Request
from jaxkv.sharing import cla, lckv


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
KINDS = {  # name -> (ModelConfig changes, kv_dtype); 2 layers where the kind is not a map over layers (faster)
    "standard": (dict(n_kv_heads=4, n_layers=2), None),
    "gqa": (dict(n_layers=2), None),
    "mqa": (dict(n_kv_heads=1, n_layers=2), None),
    "cla2": (dict(kv_sources=cla(4, 2)), None),
    "lckv": (dict(kv_sources=lckv(4, 2), upward_passes_no_grad=24), None),
    "int8": (dict(kv_sources=cla(4, 2)), "int8"),
    "int4": (dict(kv_sources=cla(4, 2), head_dim=64), "int4"),  # int4's groups of 32: head_dim a multiple of 64
    "sinks+window": (dict(streaming_window=24, streaming_sinks=4, n_layers=2), None),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_kind_serves_exact_greedy_tokens(kind, byte_tokenizer):
    """Eight requests of different lengths on five rows, prefilled in chunks of 16 (several per step, beside the
    decode rows), decoded in packed rows that change as requests finish: each gets what it gets alone."""
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
    by_itself = kv_dtype is not None or cfg.streaming_window is not None  # the dense path has neither
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        if by_itself:  # alone on the same engine (its compiled steps), after the batch: the same tokens
            want = tokens_of(run(engine, [Request(prompt, max_tokens=budget, request_id=f"alone {i}")])[f"alone {i}"])
        else:
            want = dense_greedy(cfg, params, prompt, budget, byte_tokenizer.eos_ids)
        assert tokens_of(got[str(i)]) == want, f"request {i}"
        check_finished_once(got[str(i)])
    if cfg.kv_sources != tuple(range(cfg.n_layers)):
        assert engine.pools[0].k_pages.shape[0] == cfg.n_kv_layers < cfg.n_layers  # pools only for KV layers
    assert engine.allocators[0].stats().used == 0


# --- the real model ------------------------------------------------------------------------------

SYSTEM = ("You are a careful assistant who answers questions about Shakespeare's plays in one short sentence, "
          "quoting the play when you can.\n")
QUESTIONS = ["Who is Hamlet's father?", "Where is Twelfth Night set?", "Who wrote Henry V?", "What is a sonnet?",
             "Name a Roman play."]


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint):
    """SmolLM2's first 4 layers: its weights and tokenizer, compiled in a fraction of the full model's time
    (the whole model's tokens are checked against transformers in test_smollm2 and served in test_server)."""
    return first_layers(jaxkv.load(str(smollm2_checkpoint)), 4)


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(SYSTEM + q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def alone(llm, prompts) -> list[list[int]]:
    """Each prompt's greedy continuation, decoded alone on a dense cache."""
    return [dense_greedy(llm.config, llm.params, p, 12, llm.tokenizer.eos_ids) for p in prompts]


# One geometry for the engines below (the pool-exhaustion one with fewer pages), so that they run the same compiled
# steps: 4 rows, tables of 4 pages of 16 (the prompts are about 31 tokens, + 12 generated), chunks of 16, one a step:
# 8 step shapes in all.
GEOMETRY = dict(max_batch=4, max_context=64, page_size=16, prefill_chunk=16, prefill_budget=16)


@pytest.mark.slow
def test_prefix_cache_serves_the_shared_system_prompt_without_recomputing_it(llm, prompts, alone):
    engine = Engine(llm, **GEOMETRY)
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
    engine = Engine(llm, **GEOMETRY, num_pages=9, prefix_caching=False)
    got = run(engine, [Request(p, max_tokens=12, request_id=str(i)) for i, p in enumerate(prompts)])
    assert engine.metrics()["preemptions_total"] > 0
    assert sorted(got) == [str(i) for i in range(len(prompts))]
    for i in range(len(prompts)):
        check_finished_once(got[str(i)])
        assert tokens_of(got[str(i)]) == alone[i]  # none lost, duplicated or corrupted
        assert "".join(o.text for o in got[str(i)]) == llm.tokenizer.decode(alone[i])
    assert engine.allocators[0].stats().used == 0


@pytest.mark.slow
def test_abort_frees_pages_and_the_others_carry_on(llm, prompts, alone):
    engine = Engine(llm, **GEOMETRY, prefix_caching=False)
    engine.add(Request(prompts[0], max_tokens=12, request_id="keep"))
    engine.add(Request(prompts[1], max_tokens=12, request_id="drop"))
    outputs = collections.defaultdict(list)
    for _ in range(4):
        for out in engine.step():
            outputs[out.request_id].append(out)
    used_by_both = engine.allocators[0].stats().used
    engine.abort("drop")
    assert engine.allocators[0].stats().used < used_by_both
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert outputs["drop"][-1].finish_reason == "abort"
    assert tokens_of(outputs["keep"]) == alone[0]
    assert engine.allocators[0].stats().used == 0


@pytest.mark.slow
def test_seeded_sampling_logprobs_stops_and_no_compiles_after_warmup(llm, prompts):
    engine = Engine(llm, **GEOMETRY)
    engine.warmup()
    compiled = engine.executables.count
    sampled = SamplingParams(temperature=0.8, top_k=40, seed=3)
    solo = run(engine, [Request(prompts[2], sampled, max_tokens=10, logprobs=True, request_id="solo")])["solo"]
    crowd = run(engine, [Request(prompts[2], sampled, max_tokens=10, logprobs=True, request_id="again")] +
                [Request(p, SamplingParams(temperature=1.0, seed=i), max_tokens=10) for i, p in enumerate(prompts)])
    assert tokens_of(crowd["again"]) == tokens_of(solo)  # the seed, not the batch, decides
    assert engine.executables.count == compiled  # no compilation after warm-up

    ids = prompts[2] + tokens_of(solo)
    logits, _ = forward(llm.config, llm.params, jnp.asarray([ids]), KVCache.init(llm.config, 1, len(ids)))
    want = jax.nn.log_softmax(logits[0, len(prompts[2]) - 1:-1])[np.arange(10), np.asarray(tokens_of(solo))]
    np.testing.assert_allclose([lp for o in solo for lp in o.logprobs], want, atol=2e-3)

    text = llm.tokenizer.decode(tokens_of(solo))
    stop = text[3:6]
    stopped = run(engine, [Request(prompts[2], sampled, max_tokens=10, stop=(stop,), request_id="stop")])["stop"]
    assert stopped[-1].finish_reason == "stop"
    assert "".join(o.text for o in stopped) == text[:text.find(stop)]


SMALL_CFG = ModelConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                        max_seq_len=32)
BAD_REQUESTS = [  # (request, the field at fault, words of the message)
    (Request([], max_tokens=4), "prompt", "empty"), (Request([1] * 32, max_tokens=1), "prompt", "at most 31"),
    (Request([1] * 8, max_tokens=0), "max_tokens", "positive"),
    (Request([1] * 8, max_tokens=30), "max_tokens", "context is 32"),
    (Request([1] * 8, max_tokens=2.0), "max_tokens", "positive integer"),
    (Request([300], max_tokens=2), "prompt", "token ids"), (Request(["1"], max_tokens=2), "prompt", "token ids"),
    (Request([1], SamplingParams(temperature=0.7, top_k=259)), "top_k", "vocabulary size \\(258\\)"),
    (Request([1], stop=("a", "b", "c")), "stop", "at most 2 stop strings"),
    (Request([1], stop=("123456",)), "stop", "at most 5 characters"),
    (Request([1], stop=("ok", "\ud800")), "stop", "lone surrogate"), (Request([1], stop=("",)), "stop", "empty"),
    (Request([1], stop="ab"), "stop", "list of strings"), (Request([1], logprobs=1), "logprobs", "true or false"),
    (Request([1], sampling={"temperature": 1}), "sampling", "SamplingParams"),
]


@pytest.fixture(scope="module")
def limited_engine(byte_tokenizer):
    """One engine for every bad request: each refusal must leave it as empty as it found it."""
    return Engine(LLM(SMALL_CFG, byte_tokenizer, init_params(SMALL_CFG, jax.random.PRNGKey(0))), max_batch=2,
                  page_size=8, limits=Limits(max_stop_strings=2, max_stop_chars=5))


@pytest.mark.parametrize("request_, param, message", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (_, p, _) in
                                                                       enumerate(BAD_REQUESTS)])
def test_bad_requests_are_refused_naming_the_field_and_leave_nothing_behind(limited_engine, request_, param,
                                                                           message):
    engine = limited_engine
    with pytest.raises(InvalidRequest, match=message) as e:
        engine.add(request_)
    assert e.value.param == param
    assert not engine.has_work() and not engine.waiting


def test_a_full_queue_refuses_until_it_drains(byte_tokenizer):
    engine = Engine(LLM(SMALL_CFG, byte_tokenizer, init_params(SMALL_CFG, jax.random.PRNGKey(0))), max_batch=1,
                    page_size=8, limits=Limits(max_waiting=2))
    engine.add(Request([1, 2], max_tokens=3, request_id="a"))
    engine.add(Request([3, 4], max_tokens=3, request_id="b"))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.add(Request([5], max_tokens=3, request_id="c"))
    engine.step()  # "a" takes the one slot: one request waits
    engine.add(Request([5], max_tokens=3, request_id="c"))
    assert [s.request.request_id for s in engine.waiting] == ["b", "c"]
    assert engine.metrics()["queue_full_total"] == 1


FAIL_CFG = ModelConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                       max_seq_len=64)


def small_engine(params, byte_tokenizer, **options) -> Engine:
    """An engine of FAIL_CFG in the one geometry of the tests below (8 rows, pages of 8, chunks of 16, 24 prompt
    tokens a step), so that they run the same compiled steps."""
    return Engine(LLM(FAIL_CFG, byte_tokenizer, params), max_batch=8, page_size=8, prefill_chunk=16,
                  prefill_budget=24, **options)


def test_a_request_past_its_deadline_ends_and_others_go_on(byte_tokenizer, monkeypatch):
    """With a fake clock: "late" (deadline 10 s) ends at 11 s with DeadlineExceeded after the tokens it had,
    its pages freed; "on-time", added at 5 s, runs to the end with its greedy tokens."""
    import time

    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    params = init_params(FAIL_CFG, jax.random.PRNGKey(0))
    engine = small_engine(params, byte_tokenizer, limits=Limits(request_timeout_s=10))
    engine.add(Request([1, 2, 3], max_tokens=20, request_id="late"))
    outputs = collections.defaultdict(list)
    for _ in range(3):
        for out in engine.step():
            outputs[out.request_id].append(out)
    had = tokens_of(outputs["late"])
    clock[0] = 5.0
    engine.add(Request([4, 5], max_tokens=12, request_id="on-time"))
    clock[0] = 11.0
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    late = outputs["late"]
    check_finished_once(late)
    assert late[-1].finish_reason == "error" and isinstance(late[-1].error, DeadlineExceeded)
    assert "10 s" in str(late[-1].error) and tokens_of(late) == had and 0 < len(had) < 20
    assert tokens_of(outputs["on-time"]) == dense_greedy(FAIL_CFG, params, [4, 5], 12, byte_tokenizer.eos_ids)
    m = engine.metrics()
    assert (m["requests_timed_out_total"], m["kv_pages_used"]) == (1, 0)


@pytest.mark.parametrize("consume", [False, True], ids=["pools-kept", "pools-consumed"])
def test_a_transient_device_failure_loses_no_request_and_no_token(byte_tokenizer, monkeypatch, consume):
    """The third device call raises once: its requests are retried alone (on fresh pools, recomputed, if the
    failed call consumed them), no step raises, and every client still gets exactly the greedy tokens."""
    params = init_params(FAIL_CFG, jax.random.PRNGKey(5))
    engine = small_engine(params, byte_tokenizer)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [100] * 12]
    failing_device(engine, monkeypatch, lambda name, args, n: n == 3, consume)
    outputs = run(engine, [Request(prompt, max_tokens=10, request_id=str(i)) for i, prompt in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert tokens_of(outputs[str(i)]) == dense_greedy(FAIL_CFG, params, prompt, 10, byte_tokenizer.eos_ids)
        check_finished_once(outputs[str(i)])
    m = engine.metrics()
    assert (m["step_failures_total"], m["requests_failed_total"], m["kv_pages_used"]) == (1, 0, 0)


@pytest.mark.parametrize("how", ["pools-kept", "pools-consumed", "host-side"])
def test_a_request_that_breaks_the_device_fails_alone(byte_tokenizer, monkeypatch, how):
    """Every device call holding one request past its third token raises (before the call, after it consumed
    the pools, or while its host arrays are built, as an int32 overflow once did). That request alone ends,
    with the error, after the tokens it had; the others (greedy and seeded, sharing its decode batches)
    produce exactly what they produce in a run without it, and the pool ends idle."""
    params = init_params(FAIL_CFG, jax.random.PRNGKey(7))

    def requests(with_poison: bool):
        out = [Request([5, 6, 7, 8, 9], max_tokens=12, request_id="a"),
               Request([40, 41, 42], SamplingParams(temperature=0.9, seed=3), max_tokens=9, request_id="b"),
               Request([100] * 12, SamplingParams(temperature=0.7, top_k=20, seed=4), max_tokens=11, request_id="c")]
        if with_poison:
            out.insert(1, Request([7, 8, 9, 10], SamplingParams(seed=POISON_SEED), max_tokens=12, request_id="bad"))
        for request in out:  # no early end of text: every request runs into the failures
            request.ignore_eos = True
        return out

    engine = small_engine(params, byte_tokenizer, prefix_caching=False)  # all four requests in one batch
    want = run(engine, requests(False))
    alone = run(engine, [requests(True)[1]])["bad"]
    if how == "host-side":
        real = engine._arguments

        def overflowing(rows, *shape):
            if any(s.request.sampling.seed == POISON_SEED and s.generated >= 3 for s, _ in rows):
                raise OverflowError("device lost: Python integer out of bounds for int32")
            return real(rows, *shape)

        monkeypatch.setattr(engine, "_arguments", overflowing)
    else:
        failing_device(engine, monkeypatch, poisoned, consume=how == "pools-consumed")
    got = run(engine, requests(True))
    for rid in "abc":
        assert tokens_of(got[rid]) == tokens_of(want[rid]), rid
        assert "".join(o.text for o in got[rid]) == "".join(o.text for o in want[rid]), rid
        check_finished_once(got[rid])
    bad = got["bad"]
    check_finished_once(bad)
    assert bad[-1].finish_reason == "error" and isinstance(bad[-1].error, EngineStepError)
    assert "device lost" in str(bad[-1].error)
    assert tokens_of(bad) == tokens_of(alone)[:3]  # what it had before the failure, delivered
    m = engine.metrics()
    assert m["requests_failed_total"] == 1 and m["step_failures_total"] >= 2 and m["kv_pages_used"] == 0
    assert not engine.has_work()


def test_one_call_per_step_mixes_decode_rows_and_chunks_within_the_budget(byte_tokenizer, monkeypatch):
    """Each step is one device call: the decode row of every generating request plus prompt chunks of several
    requests up to `prefill_budget` tokens. Decode-only steps take the smallest row bucket that holds them;
    every step the narrowest table width that holds its positions."""
    params = init_params(FAIL_CFG, jax.random.PRNGKey(6))
    engine = small_engine(params, byte_tokenizer)
    shapes = engine._shapes()
    assert shapes == ([4, 8], [2, 4, 6, 8], [16, 32], [4, 8])
    run_once, calls = engine.executables.run, []

    def record(fn, donate, *args, **static):
        meta = args[3]
        cu, kv_lens = np.asarray(meta.rows.cu_q_lens), np.asarray(meta.rows.kv_lens)
        q_lens = np.diff(cu)
        calls.append((args[2].shape[0], len(kv_lens), meta.rows.block_tables.shape[1], q_lens, kv_lens))
        return run_once(fn, donate, *args, **static)

    monkeypatch.setattr(engine.executables, "run", record)
    prompts = [[i + 1] * 20 for i in range(6)]
    got = run(engine, [Request(p, max_tokens=3 + 4 * i, request_id=str(i), ignore_eos=True)
                       for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert tokens_of(got[str(i)]) == dense_greedy(FAIL_CFG, params, prompt, 3 + 4 * i), f"request {i}"
    assert len(calls) == engine.metrics()["steps_total"]  # one call per step
    mixed = 0
    for n_tokens, n_rows, width, q_lens, kv_lens in calls:
        chunks = q_lens[q_lens > 1]
        assert chunks.sum() <= 24 and (chunks <= 16).all()
        if len(chunks) == 0:
            assert n_tokens == n_rows == min(r for r in shapes.decode_rows if r >= (q_lens > 0).sum())
            assert width == min(w for w in shapes.decode_widths if w >= -(-kv_lens.max() // 8))
        else:
            assert n_tokens == min(t for t in shapes.tokens if t >= q_lens.sum()) and n_rows == 8
            assert width == min(w for w in shapes.widths if w >= -(-kv_lens.max() // 8))
            mixed += (q_lens == 1).any()
    assert mixed > 0  # decode rows rode along with prompt chunks
    assert {n for n, r, *_ in calls if n == r} == {4, 8}  # the batch shrank as requests finished
    assert engine.metrics()["prefilled_tokens_total"] == sum(map(len, prompts))


def test_lckv_chunks_run_only_as_many_passes_as_they_need(byte_tokenizer, monkeypatch):
    """A chunk of c tokens is exact after c passes: chunks of 4 on an LCKV model with m + b = 13 run 4 passes,
    and the tokens equal exact (token-by-token) decoding."""
    cfg = ModelConfig(vocab_size=258, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                      max_seq_len=64, kv_sources=lckv(4, 2), upward_passes_no_grad=12)
    params = init_params(cfg, jax.random.PRNGKey(9))
    engine = Engine(LLM(cfg, byte_tokenizer, params), max_batch=2, page_size=8, prefill_chunk=4)
    run_once, passes = engine.executables.run, []
    monkeypatch.setattr(engine.executables, "run",
                        lambda fn, donate, *args, **static: passes.append(int(args[-1])) or run_once(fn, donate, *args,
                                                                                                   **static))
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 11)]
    got = run(engine, [Request(prompt, max_tokens=6, ignore_eos=True, request_id="x")])
    assert tokens_of(got["x"]) == dense_greedy(cfg, params, prompt, 6)
    assert passes[:3] == [4, 4, 3] and set(passes[3:]) == {1}
