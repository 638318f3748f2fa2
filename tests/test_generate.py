"""LLM.generate (on the engine) with a tiny model: bucketing and compile counts, batching, seeds, stops, limits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import monitoring

from conftest import byte_tokenizer_files, dense_greedy
from jaxkv.api import LLM
from jaxkv.config import ModelConfig
from jaxkv.errors import InvalidRequest, JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import init_params
from jaxkv.serve.engine import Engine, Request
from jaxkv.tokenizer import Tokenizer

CFG = ModelConfig(vocab_size=258, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
                  max_seq_len=128, tie_embeddings=True)


def _tiny_llm(tmp_path_factory) -> LLM:
    directory = tmp_path_factory.mktemp("byte_tok")
    byte_tokenizer_files(directory)
    params = init_params(CFG, jax.random.PRNGKey(0))
    # Sharpen the logits (random init is near-uniform) so greedy choices are far from ties.
    params["embed"]["embedding"] = params["embed"]["embedding"] * 40
    return LLM(CFG, Tokenizer.load(directory), params)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> LLM:
    return _tiny_llm(tmp_path_factory)


class CompileCounter:
    """Counts XLA backend compilations through JAX's own monitoring events."""

    def __init__(self):
        self.count = 0
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, _secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COUNTER = CompileCounter()


def _compiles(fn) -> int:
    before = _COUNTER.count
    fn()
    return _COUNTER.count - before


def test_compilations_are_bounded_by_the_buckets(tmp_path_factory):
    """Prompts of many lengths within a bucket compile at most the engine's shape set (prompt steps, decode steps at
    the widths they reach), and sampling values, being arrays, compile nothing."""
    llm = _tiny_llm(tmp_path_factory)  # fresh executables
    for prompt in ["abc", "abcdefg", "x" * 12, "y" * 14, "z", "q" * 9, "r" * 13, "abc"]:  # <= 16 tokens
        llm.generate(prompt, max_new_tokens=6)
    shapes = llm._engine._shapes()
    bound = 2 * len(shapes.decode_rows) * len(shapes.decode_widths) + len(shapes.tokens) * len(shapes.widths)
    assert 2 <= llm.executables.count <= bound
    assert _compiles(lambda: llm.generate("abc", max_new_tokens=6, temperature=0.5, seed=1)) == 0
    assert _compiles(lambda: llm.generate("abd", max_new_tokens=6, temperature=0.9, top_k=5, seed=2)) == 0
    assert _compiles(lambda: llm.generate(["a", "bb", "ccc"], max_new_tokens=6)) > 0  # 4 rows: a new engine


def test_batched_prompts_match_each_alone(llm):
    prompts = ["a", "hello world", "The quick brown fox jumps", "x" * 40, "tail"]
    batched = llm.generate(prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, batched):
        alone = llm.generate(prompt, max_new_tokens=12)
        assert alone.token_ids == out.token_ids
        assert out.prompt_tokens == len(llm.tokenizer.encode(prompt))


def test_stream_yields_generates_text_and_an_early_stop_leaves_the_engine_clean(llm):
    """LLM.stream runs generate's engine loop, yielding as steps return: its pieces join into generate's text, in
    more than one piece, with stats set; a caller that stops after the first piece aborts its request, so the next
    call on the same engine starts clean and gives the same tokens."""
    kw = dict(max_new_tokens=20, ignore_eos=True)
    want = llm.generate("stream me", **kw)
    pieces = list(llm.stream("stream me", **kw))
    assert "".join(pieces) == want.text
    assert len(pieces) > 1, "stream delivered the whole text at once"
    assert llm.stats.new_tokens == 20
    early = llm.stream("stream me", **kw)
    next(early)
    early.close()
    assert not llm._engine.has_work()
    assert llm.generate("stream me", **kw).token_ids == want.token_ids


def test_seed_reproducible_and_varied(llm):
    kw = dict(max_new_tokens=16, temperature=20.0, top_p=0.95)  # the sharpened model needs heat to vary
    a = llm.generate("seed test", seed=7, **kw).token_ids
    assert llm.generate("seed test", seed=7, **kw).token_ids == a
    others = [llm.generate("seed test", seed=s, **kw).token_ids for s in (8, 9, 10)]
    assert any(o != a for o in others)


def test_max_new_tokens_and_length_finish(llm):
    out = llm.generate("count", max_new_tokens=5, ignore_eos=True)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_eos_stops_generation(llm):
    free = llm.generate_ids([[1, 2, 3]], 20, SamplingParams(), ignore_eos=True)[0].token_ids
    eos = free[6]
    engine = Engine(llm, max_batch=1)
    engine.eos_ids = frozenset([eos])
    engine.add(Request([1, 2, 3], max_tokens=20, request_id="x"))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    first = free.index(eos)
    assert [t for out in outputs for t in out.token_ids] == free[:first + 1]
    assert outputs[-1].finish_reason == "stop"


def test_stop_string_truncates_text(llm):
    free = llm.generate("stop here", max_new_tokens=24)
    printable = [i for i, t in enumerate(free.token_ids) if 33 <= t < 127]  # one byte -> one ASCII char
    assert printable, "the tiny model produced no ASCII character to stop on"
    stop = llm.tokenizer.decode([free.token_ids[printable[-1]]])
    out = llm.generate("stop here", max_new_tokens=24, stop=[stop, "\x00never"])
    assert out.text == free.text[:free.text.index(stop)]
    assert out.finish_reason == "stop"
    assert free.token_ids[:len(out.token_ids)] == out.token_ids


@pytest.mark.parametrize("call, param, message", [
    (dict(prompts="p" * 128, max_new_tokens=1), "prompt", "at most 127"),
    (dict(prompts="q" * 120, max_new_tokens=50), "max_tokens", "context is 128"),  # an error, never clamped
    (dict(prompts="", max_new_tokens=4), "prompt", "empty"),
    (dict(prompts="ok", max_new_tokens=0), "max_tokens", "max_new_tokens"),
    (dict(prompts="ok", max_new_tokens=2.5), "max_tokens", "max_new_tokens"),
    (dict(prompts=["ok", 3], max_new_tokens=2), "prompt", "must be a string"),
    (dict(prompts="ok", temperature=-1), "temperature", "temperature"),
    (dict(prompts="ok", temperature=0.5, top_k=999), "top_k", "vocabulary size"),
    (dict(prompts="ok", stop=[""]), "stop", "empty"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_out_of_range_is_an_error_naming_the_parameter(llm, call, param, message):
    """The engine's one check, from the Python API: what the server answers 400 to raises here."""
    with pytest.raises(InvalidRequest, match=message) as e:
        llm.generate(**call)
    assert e.value.param == param
    assert isinstance(e.value, JaxkvError)


def test_decode_past_a_request_end_never_writes_into_pages_of_others(tmp_path_factory):
    """Multi-token decode calls run past a request's last token (the extra tokens are dropped). Those writes land
    in its own pages or the scratch page: never in page 0, here the cached prefix a later prompt reuses."""
    from jaxkv.cache.pages import prefix_hashes

    llm = _tiny_llm(tmp_path_factory)
    shared = llm.encode("A preamble long enough to fill whole pages of the prefix cache. one")
    first = llm.generate_ids([shared], 5, SamplingParams(), ignore_eos=True)[0]  # its prefix stays cached
    engine = llm._engine
    cached = engine.allocators[0].cached_prefix(prefix_hashes(shared[:-1], engine.page_size))
    assert cached[0] == 0
    before = np.asarray(engine.pools[0].k_pages[:, :, cached])
    for prompt in ["x" * 11, "y" * 12, "z" * 13]:  # each ends inside a call of 8 decode steps, whose extra
        llm.generate(prompt, max_new_tokens=3, ignore_eos=True)  # tokens cross into an unreserved page
    np.testing.assert_array_equal(np.asarray(llm._engine.pools[0].k_pages[:, :, cached]), before)
    again = llm.generate_ids([shared], 5, SamplingParams(), ignore_eos=True)[0]
    assert again.token_ids == first.token_ids == dense_greedy(CFG, llm.params, shared, 5)


def test_chat_template_applied(llm):
    out = llm.generate("hi", max_new_tokens=2, chat=True)
    assert out.prompt_tokens == len(llm.tokenizer.encode("<s>user: hi\nassistant:", add_special_tokens=False))
