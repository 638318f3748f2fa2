"""The OpenAI-compatible server (`jaxkv.serve.server`) on SmolLM2's first 4 layers, driven over HTTP.

The server runs in this process (uvicorn on a background thread, a free port on 127.0.0.1) and is
driven by the official `openai` client and by raw httpx. The model keeps SmolLM2's weights, tokenizer and
chat template but only 4 of its 30 layers, so warm-up compiles in a fraction of the time; `jaxkv serve` on the
whole model runs in `test_serve_command_serves_until_interrupted`. Expected values come from elsewhere: the
Python API's `llm.generate` (no HTTP, no OpenAI layer), a dense forward pass for logprobs, and the OpenAI wire
format itself. The AsyncEngine's own contract (errors before output, failing steps, aborts, no busy loop) is
checked on a scripted fake engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

import jaxkv
from conftest import first_layers
from jaxkv.cache.dense import KVCache
from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import forward
from jaxkv.serve.async_engine import AsyncEngine, EngineStepError
from jaxkv.serve.server import create_app

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CHAT = "What is the capital of France?"
MAX = 8
CONTEXT = 2048


# --- the server ------------------------------------------------------------------------------------
@dataclass
class Served:
    base: str
    app: object
    startup_compilations: int

    @property
    def engine(self):  # the AsyncEngine
        return self.app.state.engine


def wait_healthy(base: str, timeout_s: float, proc=None) -> None:
    """Poll /health until it answers 200 (a server process that dies fails at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc is None or proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the server at {base} did not come up"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint):
    llm = first_layers(jaxkv.load(str(smollm2_checkpoint)), 4)
    # The Python API keeps its engine while calls fit and builds (and compiles) a larger one when one does not.
    # The largest call below (the chat prompt with a system turn) wants chunks of 64 and 128 positions: sized so
    # from the start, every call runs on that one engine.
    llm.generate_ids([[0] * 33], MAX, SamplingParams())
    return llm


@pytest.fixture(scope="module")
def served(llm):
    # Requests capped at CONTEXT tokens: on CPU the engine's decode step costs in proportion to its
    # block-table width (max_context / page_size), and this keeps the file fast. Chunks of 16, one a step (the
    # longest prompt here is about 60 tokens): warm-up compiles 8 executables, not the default's 16.
    app = create_app(llm, model_name=MODEL, max_batch=4, page_size=16, max_context=CONTEXT, prefill_chunk=16,
                     prefill_budget=16)
    assert app.state.engine.max_context == CONTEXT
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, 60)
    yield Served(base, app, app.state.engine.metrics()["compilations"])
    server.should_exit = True
    thread.join(60)
    sock.close()
    assert not thread.is_alive()
    assert not app.state.engine.alive  # the app's shutdown stopped the engine thread


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base, timeout=300) as c:
        yield c


def wait_idle(served, timeout: float = 60.0) -> dict:
    """Metrics once nothing runs or waits and no KV page is referenced."""
    deadline = time.monotonic() + timeout
    while True:
        m = served.engine.metrics()
        if m["running"] == 0 and m["waiting"] == 0 and m["kv_pages_used"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def chat_ids(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(text), add_special_tokens=False)


@jax.jit
def _forward_logprobs(params, tokens):
    cfg = _forward_logprobs.cfg
    logits, _ = forward(cfg, params, tokens, KVCache.init(cfg, tokens.shape[0], tokens.shape[1]))
    return jax.nn.log_softmax(logits, axis=-1)


def reference_logprobs(llm, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
    """log p(completion token | everything before it) from one plain forward pass (right-padded to 128:
    causal attention keeps the padding out of earlier positions, and one shape compiles once)."""
    ids = prompt_ids + completion_ids
    assert len(ids) <= 128
    tokens = np.zeros((1, 128), np.int32)
    tokens[0, :len(ids)] = ids
    _forward_logprobs.cfg = llm.config
    logp = np.asarray(_forward_logprobs(llm.params, jnp.asarray(tokens))[0], np.float64)
    return np.array([logp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(completion_ids)])


# --- outputs equal the Python API ---------------------------------------------------------------------
def test_completion_greedy_equals_python_api(client, llm):
    want = llm.generate(PROMPT, max_new_tokens=MAX, temperature=0)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.model == MODEL
    (choice,) = resp.choices
    assert choice.text == want.text
    assert choice.finish_reason == want.finish_reason
    assert resp.usage.prompt_tokens == want.prompt_tokens == len(llm.encode(PROMPT))
    assert resp.usage.completion_tokens == len(want.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert isinstance(resp.usage.prompt_tokens_details.cached_tokens, int)


def test_prompt_as_list_of_one_string(client, llm):
    resp = client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=4, temperature=0)
    assert resp.choices[0].text == llm.generate(PROMPT, max_new_tokens=4, temperature=0).text


def test_chat_greedy_equals_python_api(client, llm):
    want = llm.generate(CHAT, max_new_tokens=MAX, temperature=0, chat=True)
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT}],
                                          max_tokens=MAX, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert resp.usage.prompt_tokens == len(chat_ids(llm, CHAT))
    assert resp.usage.completion_tokens == len(want.token_ids)


def test_chat_system_message_and_content_parts(client, llm):
    """A system turn goes through the template; list-of-text content equals the plain string."""
    messages = [{"role": "system", "content": "You are a concise assistant. You answer every question in one "
                                              "short sentence."}, {"role": "user", "content": CHAT}]
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = llm.generate_ids([ids], MAX, SamplingParams())[0].text
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": CHAT[:10]},
                                                       {"type": "text", "text": CHAT[10:]}]}]
    resp = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=MAX, temperature=0)
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == want


# --- streaming -----------------------------------------------------------------------------------------
def test_completion_stream_equals_non_streamed(client, llm):
    want = llm.generate(PROMPT, max_new_tokens=MAX, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.text
    assert len(texts) > 1  # it did stream
    with_reason = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(with_reason) == 1 and with_reason[0].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_equals_non_streamed(client, llm):
    want = llm.generate(CHAT, max_new_tokens=MAX, temperature=0, chat=True)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT}],
                                                 max_tokens=MAX, temperature=0, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_raw_stream_is_server_sent_events_ending_in_done(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-1] == ""  # every event ends in a blank line
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}


# --- logprobs -------------------------------------------------------------------------------------------
def test_completion_logprobs_match_a_forward_pass(client, llm):
    want = llm.generate(PROMPT, max_new_tokens=MAX, temperature=0)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX, temperature=0, logprobs=1)
    lp = resp.choices[0].logprobs
    assert lp.tokens == [llm.tokenizer.decode([t]) for t in want.token_ids]  # ASCII text: one string a token
    assert lp.top_logprobs is None
    assert lp.text_offset == [len(llm.tokenizer.decode(want.token_ids[:i])) for i in range(len(want.token_ids))]
    ref = reference_logprobs(llm, llm.encode(PROMPT), want.token_ids)
    np.testing.assert_allclose(lp.token_logprobs, ref, atol=1e-3)

    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX, temperature=0,
                                              logprobs=True, stream=True))
    values = [v for c in streamed for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    np.testing.assert_allclose(values, ref, atol=1e-3)


def test_chat_logprobs_match_a_forward_pass(client, llm):
    want = llm.generate(CHAT, max_new_tokens=MAX, temperature=0, chat=True)
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT}],
                                          max_tokens=MAX, temperature=0, logprobs=True)
    content = resp.choices[0].logprobs.content
    ids = [t for t in want.token_ids if t not in llm.tokenizer.eos_ids]  # the end token is not listed
    assert len(content) == len(ids)
    assert b"".join(bytes(c.bytes) for c in content).decode() == resp.choices[0].message.content == want.text
    assert all(c.top_logprobs == [] for c in content)
    ref = reference_logprobs(llm, chat_ids(llm, CHAT), want.token_ids)[:len(ids)]
    np.testing.assert_allclose([c.logprob for c in content], ref, atol=1e-3)


# --- batching, stopping, sampling --------------------------------------------------------------------
CONCURRENT = [("Once upon a time", 12), ("The quick brown fox", 5), ("def fibonacci(n):", 10),
              ("My favourite food is", 7), ("1, 2, 3, 4,", 12), ("Water boils at", 9)]


def test_concurrent_requests_each_equal_their_own_greedy_result(client, llm, served):
    wants = [llm.generate(p, max_new_tokens=n, temperature=0) for p, n in CONCURRENT]  # one at a time

    def one(case):
        prompt, n = case
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)

    with ThreadPoolExecutor(len(CONCURRENT)) as pool:  # 6 requests on a batch of 4: some wait
        got = list(pool.map(one, CONCURRENT))
    for (prompt, n), want, resp in zip(CONCURRENT, wants, got):
        assert resp.choices[0].text == want.text, prompt
        assert resp.choices[0].finish_reason == want.finish_reason, prompt
        assert resp.usage.completion_tokens == len(want.token_ids), prompt
    wait_idle(served)


def test_stop_strings(client, llm):
    full = llm.generate(PROMPT, max_new_tokens=12, temperature=0).text
    stop = full[full.index(".") + 1:][:2] if "." in full[:-3] else full[3:5]
    want = full[:full.index(stop)]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                     stop=["never appears", stop])
    assert resp.choices[0].text == want
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want  # no piece of the stop string leaks out
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_max_tokens_finishes_with_length(client):
    resp = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=3, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_sampling_is_reproducible_per_seed(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX, temperature=0.8, top_p=0.95,
                                         seed=seed, extra_body={"top_k": 50}).choices[0].text

    alone = sample(3)  # alone in the batch, then alongside others: the same draw
    with ThreadPoolExecutor(3) as pool:
        again, four, five = pool.map(sample, [3, 4, 5])
    assert again == alone
    assert len({alone, four, five}) > 1


def test_the_python_api_and_cli_sample_what_the_server_samples(client, llm):
    """One runtime, one sampling rule: the request's seed and each token's index decide the draw, so
    `jaxkv generate --seed 3 --temperature 0.8` (LLM.generate) and the server give the same text."""
    for seed in (3, 11):
        want = llm.generate(PROMPT, max_new_tokens=MAX, temperature=0.8, top_p=0.95, top_k=50, seed=seed)
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX, temperature=0.8, top_p=0.95,
                                        seed=seed, extra_body={"top_k": 50}).choices[0]
        assert got.text == want.text and got.finish_reason == want.finish_reason, f"seed {seed}"


# --- bad input ---------------------------------------------------------------------------------------
LONG = "hello " * (CONTEXT + 10)
BAD = {
    # case: (path, raw body or JSON value, status, param)
    "malformed-json": ("/v1/completions", b'{"prompt": "hi", ', 400, None),
    "body-not-an-object": ("/v1/completions", [1, 2], 400, None),
    "missing-prompt": ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    "prompt-wrong-type": ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    "max-tokens-wrong-type": ("/v1/completions", {"prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
    "unknown-field": ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    "max-tokens-zero": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "max-tokens-negative": ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    "max-tokens-beyond-context": ("/v1/completions", {"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
    "prompt-too-long": ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    "empty-prompt-list": ("/v1/completions", {"prompt": []}, 400, "prompt"),
    "two-prompts": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    "unknown-model": ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    "n-2": ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    "echo": ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    "negative-temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    "top-p-zero": ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    "seed-negative": ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    "empty-stop": ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    "stop-wrong-type": ("/v1/completions", {"prompt": "hi", "stop": 3}, 400, "stop"),
    "speculative-on-a-plain-server": ("/v1/completions", {"prompt": "hi", "num_speculative_tokens": 2}, 400,
                                      "num_speculative_tokens"),
    "speculative-negative": ("/v1/completions", {"prompt": "hi", "num_speculative_tokens": -1}, 400,
                             "num_speculative_tokens"),
    "chat-missing-messages": ("/v1/chat/completions", {"max_tokens": 2}, 400, "messages"),
    "chat-no-messages": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "chat-bad-role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
                      "messages[0].role"),
    "chat-unknown-message-field": ("/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, 400,
                                   "messages[0].mood"),
    "chat-logprobs-wrong-type": ("/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, 400,
                                 "logprobs"),
    "chat-n-3": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    "chat-prompt-too-long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
                             "messages"),
    "chat-unknown-model": ("/v1/chat/completions",
                           {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_an_openai_error(http, case):
    path, body, status, param = BAD[case]
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


def test_errors_through_the_openai_client_and_serving_goes_on(client, served, llm):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    m = wait_idle(served)  # nothing was half-added
    assert m["running"] == 0 and m["waiting"] == 0
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert resp.choices[0].text == llm.generate(PROMPT, max_new_tokens=4, temperature=0).text


def test_unknown_route_gets_an_openai_error(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture
def failing_step(served):
    """engine.step raises on its next call (once)."""
    engine = served.engine.engine
    real = engine.step

    def step():
        engine.step = real
        raise RuntimeError("simulated device failure")

    engine.step = step
    yield
    engine.step = real


def test_an_engine_failure_is_a_500_and_serving_goes_on(http, served, failing_step, llm):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "simulated device failure" in error["message"]
    wait_idle(served)  # the failed request was aborted: its pages are back
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == llm.generate(PROMPT, max_new_tokens=4, temperature=0).text


def test_an_engine_failure_mid_stream_is_an_error_event(http, served, failing_step):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                "stream": True})
    assert r.status_code == 200
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    wait_idle(served)


# --- clients that leave ------------------------------------------------------------------------------
@pytest.fixture
def abort_spy(served):
    """Records each engine.abort with the engine's running count and used pages before and after it."""
    engine = served.engine.engine
    calls, real = [], engine.abort

    def spy(request_id):
        before = engine.metrics()
        real(request_id)
        calls.append((request_id, before, engine.metrics()))

    engine.abort = spy
    yield calls
    engine.abort = real


def _assert_aborted_while_running(calls, request_id):
    hits = [(before, after) for rid, before, after in calls if rid == request_id]
    assert hits, f"{request_id} was never aborted"
    before, after = hits[0]
    assert before["running"] == 1 and before["kv_pages_used"] > 0  # it was still generating
    assert after["running"] == 0 and after["kv_pages_used"] == 0  # and its pages came back at once


def test_client_disconnect_mid_stream_aborts_the_request(http, served, abort_spy):
    start = wait_idle(served)
    body = {"prompt": "1, 2, 3, 4,", "max_tokens": 1000, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        request_id = json.loads(first[len("data: "):])["id"]
    # the connection is closed here, mid-stream
    end = wait_idle(served, timeout=30)
    _assert_aborted_while_running(abort_spy, request_id)
    assert end["generation_tokens_total"] - start["generation_tokens_total"] < 1000


def test_client_timeout_on_a_non_streamed_request_aborts_it(served, abort_spy):
    wait_idle(served)
    with httpx.Client(base_url=served.base, timeout=httpx.Timeout(300, read=1)) as c:  # 1000 tokens take longer
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"prompt": "1, 2, 3, 4,", "max_tokens": 1000, "temperature": 0})
    wait_idle(served, timeout=30)
    assert len(abort_spy) == 1
    _assert_aborted_while_running(abort_spy, abort_spy[0][0])


# --- models, health, metrics -------------------------------------------------------------------------
def test_models_and_health(client, http, served):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


METRICS = ["jaxkv_requests_running", "jaxkv_requests_waiting", "jaxkv_kv_pages_used", "jaxkv_kv_pages_free",
           "jaxkv_prefix_cache_hit_rate", "jaxkv_tokens_per_second", "jaxkv_prompt_tokens_total",
           "jaxkv_generation_tokens_total", "jaxkv_compilations_total", "jaxkv_preemptions_total",
           "jaxkv_engine_step_failures_total", "jaxkv_requests_failed_total", "jaxkv_requests_timed_out_total"]
REJECTED = re.compile(r'jaxkv_requests_rejected_total\{reason="([a-z_]+)"\} ([0-9]+)')


def rejected(http) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in REJECTED.finditer(http.get("/metrics").text)}


def test_metrics_in_prometheus_text_format(client, http, served):
    before = rejected(http)
    for _ in range(2):
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0}).status_code == 400
    assert http.post("/v1/completions", json={"prompt": "hi", "top_p": 2}).status_code == 400
    after = rejected(http)
    assert after.get("integer_below_min_value", 0) - before.get("integer_below_min_value", 0) == 2
    assert after.get("invalid_value", 0) - before.get("invalid_value", 0) == 1
    for _ in range(2):  # the second one's chat-template prefix (two full pages) comes from the prefix cache
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CHAT}], max_tokens=2,
                                       temperature=0)
    wait_idle(served)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    values = {}
    lines = r.text.splitlines()
    for name in METRICS:
        kind = "counter" if name.endswith("_total") else "gauge"
        assert f"# TYPE {name} {kind}" in lines
        assert any(line.startswith(f"# HELP {name} ") for line in lines)
        (sample,) = [line for line in lines if line.startswith(f"{name} ")]
        values[name] = float(sample.split()[1])
    for line in lines:
        assert (line.startswith("#") or re.fullmatch(r"jaxkv_[a-z_]+ -?[0-9.e+-]+", line)
                or REJECTED.fullmatch(line)), line
    assert values["jaxkv_requests_running"] == 0 and values["jaxkv_requests_waiting"] == 0
    assert values["jaxkv_kv_pages_used"] == 0 and values["jaxkv_kv_pages_free"] > 0
    assert values["jaxkv_prompt_tokens_total"] > 0 and values["jaxkv_generation_tokens_total"] > 0
    assert 0 < values["jaxkv_prefix_cache_hit_rate"] <= 1
    assert values["jaxkv_tokens_per_second"] >= 0
    # Warm-up compiled every shape the engine runs: serving compiled nothing more.
    assert values["jaxkv_compilations_total"] == served.startup_compilations


# --- the command line --------------------------------------------------------------------------------
def test_serve_command_line():
    from jaxkv.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "9000", "--max-batch", "2", "--page-size", "32",
                                      "--num-pages", "64", "--kv-dtype", "int8", "--streaming-window", "128",
                                      "--sinks", "2", "--no-prefix-caching", "--max-context", "1024"])
    assert (args.model, args.host, args.port, args.max_batch, args.page_size, args.num_pages, args.kv_dtype,
            args.streaming_window, args.sinks, args.no_prefix_caching, args.max_context) == \
        (MODEL, "127.0.0.1", 9000, 2, 32, 64, "int8", 128, 2, True, 1024)
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.port, defaults.max_batch, defaults.page_size, defaults.num_pages, defaults.no_prefix_caching,
            defaults.max_context) == (8000, 8, None, None, False, None)  # page size: jaxkv.load's (16, KIVI 32)


def test_serve_fails_in_one_line_on_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([str(Path(sys.executable).parent / "jaxkv"), "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen" in lines[0] and str(port) in lines[0], proc.stderr


def test_serve_command_serves_until_interrupted(smollm2_checkpoint):
    """`jaxkv serve` on the whole SmolLM2 in a subprocess: it comes up, requires the key from $JAXKV_API_KEY,
    answers under its served name, ends a chat answer at the end of turn, and a Ctrl-C stops it without a
    traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "jaxkv"), "serve", "--port", str(port),
                             "--max-batch", "1", "--prefill-chunk", "16", "--prefill-budget", "16",
                             "--page-size", "64", "--max-context", "64",  # warm-up compiles 3 executables
                             "--served-model-name", "tiny-test",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAXKV_API_KEY": "k-123"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 420, proc)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny-test"]
        resp = client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=2, temperature=0)
        assert resp.usage.completion_tokens == 2 and resp.choices[0].text
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 256},
                       headers={"Authorization": "Bearer k-123"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # --max-context took effect
        # Without max_tokens a chat answer ends at the model's end-of-turn token (OpenAI's default) ...
        say_hi = [{"role": "user", "content": "Say hi."}]
        resp = client.chat.completions.create(model="tiny-test", messages=say_hi, temperature=0)
        assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.content
        # ... and ignore_eos (an extension, as vLLM's) runs past it to max_tokens.
        n = resp.usage.completion_tokens + 3
        longer = client.chat.completions.create(model="tiny-test", messages=say_hi, temperature=0, max_tokens=n,
                                                extra_body={"ignore_eos": True})
        assert longer.choices[0].finish_reason == "length" and longer.usage.completion_tokens == n
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err, err
    assert f"serving tiny-test at http://127.0.0.1:{port}/v1" in err


# --- the AsyncEngine on a scripted engine ---------------------------------------------------------------
@dataclass
class FakeOutput:
    request_id: str
    text: str
    finished: bool
    finish_reason: str | None = None


class FakeEngine:
    """Each request emits "a", "b", ... one per step up to max_tokens; `fail_next` makes step() raise."""

    max_context = 100

    def __init__(self):
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.fail_next = False
        self.has_work_calls = 0
        self.thread_ids: set[int] = set()

    def add(self, request):
        self.thread_ids.add(threading.get_ident())
        if request.max_tokens < 1:
            raise JaxkvError("max_tokens must be a positive integer")
        self.requests[request.request_id] = [request, 0]

    def abort(self, request_id):
        self.thread_ids.add(threading.get_ident())
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_work(self):
        self.has_work_calls += 1
        return bool(self.requests)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device fell over")
        outs = []
        for rid, entry in list(self.requests.items()):
            entry[1] += 1
            done = entry[1] >= entry[0].max_tokens
            outs.append(FakeOutput(rid, "abcdefghijklmnopqrstuvwxyz"[entry[1] - 1], done, "length" if done else None))
            if done:
                del self.requests[rid]
        time.sleep(0.005)
        return outs

    def metrics(self):
        return {"running": len(self.requests), "waiting": 0}


@dataclass
class FakeRequest:
    request_id: str
    max_tokens: int


def test_async_engine_streams_fails_aborts_and_sleeps():
    fake = FakeEngine()
    engine = AsyncEngine(fake)

    async def collect(request):
        return "".join([out.text async for out in engine.generate(request)])

    async def scenario():
        # Concurrent requests each get their own outputs.
        texts = await asyncio.gather(collect(FakeRequest("a", 3)), collect(FakeRequest("b", 5)))
        assert texts == ["abc", "abcde"]
        # A validation error is raised before any output, and nothing is added.
        with pytest.raises(JaxkvError):
            await collect(FakeRequest("bad", 0))
        assert "bad" not in fake.requests
        # A consumer that stops early aborts its request.
        gen = engine.generate(FakeRequest("early", 50))
        assert (await gen.__anext__()).text == "a"
        await gen.aclose()
        # Cancelling a consumer aborts too.
        task = asyncio.ensure_future(collect(FakeRequest("cancelled", 10_000)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A failing step fails the requests in flight, and the loop serves the next one.
        fake.fail_next = True
        with pytest.raises(EngineStepError, match="device fell over"):
            await collect(FakeRequest("victim", 5))
        assert await collect(FakeRequest("after", 2)) == "ab"

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while not {"early", "cancelled", "victim"} <= set(fake.aborted) or fake.requests:
        assert time.monotonic() < deadline, (fake.aborted, fake.requests)
        time.sleep(0.01)
    assert engine.metrics()["step_errors"] == 1
    # Idle: the thread sleeps instead of polling has_work.
    calls = fake.has_work_calls
    time.sleep(0.3)
    assert fake.has_work_calls - calls <= 2
    assert len(fake.thread_ids) == 1 and threading.get_ident() not in fake.thread_ids  # one engine thread
    engine.shutdown()
    assert not engine.alive
