"""A hostile client against the real server on 127.0.0.1 (uvicorn, the jaxkv app, a tiny random model).

Named regression tests for what a hostile client once broke (issue 12), then a fuzz suite: schemathesis
generates requests from the server's own OpenAPI schema, valid and invalid, and none may get a 5xx; every
4xx carries OpenAI's error body; the server is healthy with an idle KV pool after. The tiny model keeps
every request cheap, so the suite bounds time by request count.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import numpy as np
import pytest
import uvicorn

from conftest import POISON_SEED, byte_tokenizer_files, failing_device, poisoned
from jaxkv.api import LLM
from jaxkv.config import ModelConfig
from jaxkv.model.decoder import init_params
from jaxkv.serve.guard import LOOPBACK_HOSTS, IdleTimeoutH11
from jaxkv.serve.requests import Limits
from jaxkv.serve.server import create_app

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CFG = ModelConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=128)
LIMITS = Limits(max_body_bytes=64 * 1024, max_messages=8, max_stop_strings=4, max_stop_chars=64, max_waiting=3,
                request_timeout_s=30)
KEEP_ALIVE_S = 2
# Every client shares one TLS context (never used: the server is plain HTTP): httpx would otherwise load the CA
# bundle for each of the hundreds of clients made below, tens of milliseconds each.
TLS = ssl.create_default_context()


@dataclasses.dataclass
class Served:
    base: str
    port: int
    app: object

    @property
    def engine(self):  # the Engine behind the AsyncEngine
        return self.app.state.engine.engine

    def client(self, **headers) -> httpx.Client:
        # One connection per request: the server closes idle ones after KEEP_ALIVE_S
        return httpx.Client(base_url=self.base, timeout=60, headers={**AUTH, **headers}, verify=TLS,
                            limits=httpx.Limits(max_keepalive_connections=0))


@pytest.fixture(scope="module")
def served(byte_tokenizer_dir):
    from jaxkv.tokenizer import Tokenizer

    llm = LLM(CFG, Tokenizer.load(byte_tokenizer_dir), init_params(CFG, jax.random.PRNGKey(0)))
    # one chunk of 16 a step: warm-up compiles 8 executables (4 with prompt chunks, not 8 for budgets up to 64)
    app = create_app(llm, model_name="tiny", max_batch=2, page_size=8, prefill_chunk=16, prefill_budget=16,
                     limits=LIMITS, api_key=KEY, allowed_hosts=LOOPBACK_HOSTS)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=IdleTimeoutH11,
                                           timeout_keep_alive=KEEP_ALIVE_S))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not _healthy(base):
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)
    yield Served(base, port, app)
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def byte_tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bytes")
    byte_tokenizer_files(directory)
    return directory


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_idle(served: Served, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = served.app.state.engine.metrics()
        if m["running"] == 0 and m["waiting"] == 0 and m["kv_pages_used"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def assert_openai_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def completion(served: Served, **body) -> httpx.Response:
    with served.client() as c:
        return c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, **body})


def stream_text(served: Served, body: dict) -> tuple[str, list[dict]]:
    """The text of a streamed completion and its events (an in-band error is one of them)."""
    with served.client() as c, c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices")), events


# --- 1. nothing a client sends raises inside a step --------------------------------------------------
def test_an_out_of_range_top_k_is_refused_and_others_stream_on(served):
    """top_k 2**31 once overflowed inside the engine step, failing every request in flight."""
    body = {"prompt": "abc", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    want, _ = stream_text(served, body)
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(stream_text, served, body)
        time.sleep(0.2)
        bad = completion(served, top_k=2147483648, temperature=0.7)
        got, _ = other.result()
    assert_openai_error(bad, 400, "top_k")
    assert_openai_error(completion(served, top_k=259, temperature=0.7), 400, "top_k")  # > the vocabulary
    assert got == want
    wait_idle(served)


def test_a_request_that_breaks_the_device_fails_alone_among_streams(served, monkeypatch):
    """Every device call holding one request (seed 666) past its third token raises: that stream ends with an
    in-band server_error; three others streaming beside it get exactly the text they get without it."""
    bodies = [{"prompt": p, "max_tokens": 20, "temperature": t, "seed": s, "ignore_eos": True}
              for p, t, s in [("one", 0, 1), ("two two", 0.8, 2), ("three", 0.5, 3)]]
    want = [stream_text(served, b)[0] for b in bodies]
    # four at once on two rows: on a loaded machine all four may wait before the first is admitted
    monkeypatch.setattr(served.engine, "limits", dataclasses.replace(LIMITS, max_waiting=4))
    failing_device(served.engine, monkeypatch, poisoned, consume=True)
    bad = {"prompt": "bad", "max_tokens": 20, "temperature": 0, "seed": POISON_SEED, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: stream_text(served, b), [bodies[0], bad, *bodies[1:]]))
    assert [text for text, _ in results[:1] + results[2:]] == want
    text, events = results[1]
    error = events[-1]["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error" and "device lost" in error["message"]
    assert len(text) > 0  # it streamed its first tokens before the failures
    m = wait_idle(served)
    assert m["requests_failed_total"] >= 1
    monkeypatch.undo()
    with served.client() as c:
        assert "jaxkv_requests_failed_total" in c.get("/metrics").text


# --- 2. bounded cost per request ----------------------------------------------------------------------
def test_a_huge_body_is_refused_before_it_is_read_and_others_are_not_held_up(served):
    huge = b'{"prompt": "' + b"x" * (20 * 2**20) + b'"}'
    with ThreadPoolExecutor(2) as pool:
        start = time.monotonic()
        refused = pool.submit(lambda: served.client().post("/v1/completions", content=huge,
                                                           headers={"content-type": "application/json"}))
        small = completion(served, max_tokens=3)
        small_s = time.monotonic() - start
        error = assert_openai_error(refused.result(), 413, code="request_too_large")
    assert small.status_code == 200 and small_s < 10
    assert str(LIMITS.max_body_bytes) in error["message"]


def test_a_chunked_body_past_the_limit_is_refused(served):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    with served.client() as c:
        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")


def test_prompt_characters_are_checked_before_tokenizing(served, monkeypatch):
    encoded = []
    tokenizer = served.app.state.server.llm.tokenizer
    real = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: encoded.append(a) or real(*a, **k))
    limit = served.app.state.server.max_prompt_chars
    assert limit == 32 * 127  # 32 characters per token of the longest prompt
    r = completion(served, prompt="x" * (limit + 1))
    assert_openai_error(r, 400, "prompt", "string_above_max_length")
    r = served.client().post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "y" * (limit // 2 + 1)}] * 2})
    assert_openai_error(r, 400, "messages", "string_above_max_length")
    assert encoded == []  # neither reached the tokenizer


@pytest.mark.parametrize("body, param, code", [
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, "messages", "array_above_max_length"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop",
     "array_above_max_length"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": "s" * 65}, "stop", "string_above_max_length"),
    ({"messages": [{"role": "user", "content": "hi"}], "user": "u" * 1025}, "user", "string_above_max_length"),
    ({"messages": [{"role": "user", "content": "hi"}], "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata",
     "array_above_max_length"),
])
def test_request_sizes_are_bounded(served, body, param, code):
    with served.client() as c:
        assert_openai_error(c.post("/v1/chat/completions", json=body), 400, param, code)


def test_a_full_queue_answers_429_with_retry_after(served, monkeypatch):
    """Two slots busy, three waiting (the limit): the next request gets 429 and Retry-After, the others finish.
    The two are running before the three are sent, and steps are slowed to 20 ms meanwhile, so that no running
    request can finish (and admit a waiting one) before the sixth arrives, however fast or loaded the machine."""
    long = {"prompt": "a", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    step = served.engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    def until(what: str, n: int) -> None:
        deadline = time.monotonic() + 30
        while served.app.state.engine.metrics()[what] < n:
            assert time.monotonic() < deadline, f"{what} never reached {n}"
            time.sleep(0.01)

    monkeypatch.setattr(served.engine, "step", slow_step)
    with ThreadPoolExecutor(5) as pool:
        running = [pool.submit(completion, served, **long) for _ in range(2)]
        until("running", 2)
        running += [pool.submit(completion, served, **long) for _ in range(3)]
        until("waiting", 3)
        r = completion(served)
        assert_openai_error(r, 429, code="queue_full")
        assert int(r.headers["retry-after"]) >= 1
        assert all(f.result().status_code == 200 for f in running)
    wait_idle(served)


def test_a_request_past_the_deadline_ends_with_408_and_frees_its_pages(served, monkeypatch):
    monkeypatch.setattr(served.engine, "limits", dataclasses.replace(LIMITS, request_timeout_s=0.02))
    r = completion(served, max_tokens=120, ignore_eos=True, prompt="slow")
    assert_openai_error(r, 408, code="request_timeout")
    _, events = stream_text(served, {"prompt": "slow", "max_tokens": 120, "ignore_eos": True})
    assert events[-1]["error"]["code"] == "request_timeout"
    assert wait_idle(served)["requests_timed_out_total"] >= 2


# --- 4. text that cannot be encoded, degenerate sampling ------------------------------------------------
SURROGATE = '"\\ud800"'  # a JSON escape of a lone surrogate
SURROGATES = {
    "/v1/completions": [('{"prompt": %s}', "prompt"), ('{"prompt": "hi", "model": %s}', "model"),
                        ('{"prompt": "hi", "stop": [%s]}', "stop[0]"), ('{"prompt": "hi", "user": %s}', "user"),
                        ('{"prompt": [%s]}', "prompt[0]")],
    "/v1/chat/completions": [('{"messages": [{"role": "user", "content": %s}]}', "messages[0].content"),
                             ('{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
                              "messages[0].content[0].text"),
                             ('{"messages": [{"role": "user", "content": "hi", "name": %s}]}', "messages[0].name")],
}


@pytest.mark.parametrize("path, template, param", [(p, t, q) for p, cases in SURROGATES.items() for t, q in cases])
def test_a_lone_surrogate_is_a_400_naming_the_field(served, path, template, param):
    with served.client() as c:
        r = c.post(path, content=(template % SURROGATE).encode(), headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param, "invalid_encoding")


def test_a_lone_surrogate_anywhere_else_is_a_4xx(served):
    with served.client() as c:
        r = c.post("/v1/completions", content=b'{"prompt": "hi", "\\ud800": 1}',
                   headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
        assert_openai_error(c.get("/v1/models/%ED%A0%80"), 404, "model")


@pytest.mark.parametrize("raw, param", [
    ('"top_p": 1e-50', "top_p"), ('"temperature": Infinity', "temperature"), ('"temperature": 1e308', "temperature"),
    ('"temperature": NaN', "temperature"), ('"top_p": 0', "top_p"), ('"top_k": -2', "top_k"),
    ('"seed": 4294967296', "seed"), ('"max_tokens": 1e3', "max_tokens"),
])
def test_degenerate_sampling_is_refused_with_a_clear_message(served, raw, param):
    with served.client() as c:
        r = c.post("/v1/completions", content=f'{{"prompt": "hi", {raw}}}'.encode(),
                   headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param)


# --- 6. keys, hosts, idle sockets -----------------------------------------------------------------------
def test_the_api_key_is_required_on_v1_and_health_stays_open(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        with httpx.Client(base_url=served.base, timeout=30, headers=headers) as c:
            for r in (c.get("/v1/models"), c.post("/v1/completions", json={"prompt": "hi"})):
                assert_openai_error(r, 401, code="invalid_api_key")
                assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/health").status_code == 200
    with served.client() as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_only_loopback_host_names_are_answered(served):
    for host in (f"localhost:{served.port}", f"127.0.0.1:{served.port}", "[::1]", "LOCALHOST."):
        with served.client(host=host) as c:
            assert c.get("/v1/models").status_code == 200, host
    for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.1.evil.example", ""):
        with served.client(host=host) as c:
            assert_openai_error(c.get("/v1/models"), 400, code="invalid_host")
            assert_openai_error(c.get("/health"), 400, code="invalid_host")  # DNS rebinding reaches nothing


def test_idle_and_slow_connections_are_closed(served):
    def closed_after(send: bytes | None) -> float:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
            try:
                for byte in send or b"":  # one byte every 0.25 s: the headers never complete in time
                    s.send(bytes([byte]))
                    time.sleep(0.25)
                assert s.recv(100) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed while we were still sending
        return time.monotonic() - start

    assert KEEP_ALIVE_S - 0.5 < closed_after(None) < KEEP_ALIVE_S + 3
    assert closed_after(b"GET /health HTTP/1.1\r\nHost: localhost\r\n") < KEEP_ALIVE_S + 3


# --- 5. the fuzz suite -----------------------------------------------------------------------------------
def test_fuzz_from_the_openapi_schema(served):
    """Requests generated from /openapi.json (schema-valid and schema-breaking), against the real server."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{served.base}/openapi.json")
    statuses = []

    def check(r) -> None:
        statuses.append(r.status_code)
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text[:500]

    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        strategy = schema.as_strategy(mode)

        @settings(max_examples=120, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data):
            case = data.draw(strategy)
            check(case.call(base_url=served.base, headers=AUTH, timeout=60))

        fuzz()
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)  # both sides were reached
    assert _healthy(served.base)
    m = wait_idle(served)
    assert m["step_errors"] == 0
    body = completion(served, prompt="after the fuzz", temperature=0).json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert np.isfinite(m["tokens_per_s"])


def test_fuzz_valid_requests_with_extreme_values(served):
    """Hypothesis over the request bodies: a valid request with a few fields swapped for extreme values
    (huge, negative, NaN, infinite, lone surrogates, long lists), so the values reach the engine's checks
    and the sampler rather than stopping at a type error. No 5xx, and no server_error inside a stream."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 127, 128, 258, 259, 2**31 - 1, 2**31,
                                                                  2**32, 2**63]))
    floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1e-50, 5e-324, 1e-6, 1.0, 2.0, 100.0, 1e308]))
    text = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates included
    fields = {"max_tokens": ints, "temperature": floats, "top_p": floats, "top_k": ints, "seed": ints,
              "stop": st.one_of(text, st.lists(text, max_size=6)), "logprobs": st.one_of(st.booleans(), ints),
              "n": ints, "stream": st.booleans(), "ignore_eos": st.booleans(), "user": text}
    bodies = st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), text,
                       st.fixed_dictionaries({}, optional=fields))
    outcomes, before = collections.Counter(), wait_idle(served)

    @settings(max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def fuzz(case):
        path, prompt, extreme = case
        body = {"prompt": prompt or "hi"} if path == "/v1/completions" else {
            "messages": [{"role": "user", "content": prompt or "hi"}]}
        body.update({"max_tokens": 8, "temperature": 0.7, **extreme})
        if path.endswith("chat/completions") and "logprobs" in body:
            body["logprobs"] = bool(body["logprobs"])
        with served.client() as c:
            r = c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        outcomes[r.status_code] += 1
        assert r.status_code < 500, (body, r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text[:300]
        elif body.get("stream"):
            errors = [line for line in r.text.splitlines() if line.startswith('data: {"error"')]
            assert not errors, (body, errors)

    fuzz()
    assert outcomes[200] > 30 and sum(n for s, n in outcomes.items() if s >= 400) > 30, outcomes
    m = wait_idle(served)
    assert (m["requests_failed_total"], m["step_errors"]) == (before["requests_failed_total"], before["step_errors"])


@pytest.mark.parametrize("host, env, key, hosts, warns", [
    ("127.0.0.1", None, None, LOOPBACK_HOSTS, False), ("localhost", None, None, LOOPBACK_HOSTS, False),
    ("::1", None, None, LOOPBACK_HOSTS, False), ("0.0.0.0", None, None, None, True),
    ("0.0.0.0", "from-env", "from-env", None, False), ("192.168.1.5", None, None, None, True),
])
def test_serve_access_defaults(monkeypatch, host, env, key, hosts, warns):
    """The key comes from $JAXKV_API_KEY when not given; loopback binds answer loopback names only; a server
    reachable from elsewhere without a key says so."""
    from jaxkv.serve.server import access

    monkeypatch.delenv("JAXKV_API_KEY", raising=False)
    if env:
        monkeypatch.setenv("JAXKV_API_KEY", env)
    got_key, got_hosts, warning = access(host, None, None)
    assert (got_key, got_hosts, warning is not None) == (key, hosts, warns)
    assert access(host, "given", ("a.example",))[:2] == ("given", ("a.example",))
