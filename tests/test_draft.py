"""Speculative decoding with a draft model (`jaxkv.serve.draft`): the draft's proposals are its own greedy
continuation (against a dense forward of the draft, after every rollback), a draft equal to the target has every
proposal kept, the output is plain decoding's token for token on every model kind, and a draft that cannot serve the
target is refused in one line."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import jaxkv
from conftest import dense_greedy, write_tiny_hf_model
from jaxkv.api import LLM, draft_model
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.decoder import init_params
from jaxkv.serve.engine import Engine, Request
from jaxkv.serve.speculative import Speculation, speculation
from jaxkv.sharing import cla, lckv
from test_engine import run, tokens_of

BASE = dict(vocab_size=258, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=256)
KINDS = {"standard": dict(n_layers=2, n_kv_heads=4), "gqa": dict(n_layers=2),
         "cla2": dict(n_layers=4, kv_sources=cla(4, 2)),
         "lckv": dict(n_layers=4, kv_sources=lckv(4, 2), upward_passes_no_grad=8),
         "window": dict(n_layers=2, window_layers=(0,), sliding_window=8), "int8": dict(n_layers=2)}


def drafting(llm, draft, k: int = 4) -> Speculation:
    """Verify a draft's k proposals at every step that can (no payoff)."""
    return Speculation("draft", k, adaptive=False, source="test", draft=draft)


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = [int(t) for t in rng.integers(0, 256, 16)]  # two requests share a cached prefix page
    return [shared + [int(t) for t in rng.integers(0, 256, 8)], shared + [3, 4, 5], [5, 6, 7] * 8]


def test_a_draft_equal_to_the_target_has_every_proposal_kept(byte_tokenizer):
    """Greedy, with the target as its own draft: every proposal is kept, so the draft's KV was right at every step
    (prompts caught up in chunks, a prefix from the cache, preemption-free rows of several lengths)."""
    cfg = ModelConfig(**BASE, n_layers=2)
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(3)))
    engine = Engine(llm, max_batch=2, page_size=8, prefill_chunk=8, speculative=drafting(llm, llm))
    got = run(engine, [Request(p, max_tokens=20, request_id=str(i), ignore_eos=True)
                       for i, p in enumerate(prompts())])
    for i, prompt in enumerate(prompts()):
        assert tokens_of(got[str(i)]) == dense_greedy(cfg, llm.params, prompt, 20), f"request {i}"
    m = engine.metrics()
    assert m["speculative_proposed_total"] > 0 and m["speculative_accepted_total"] == m["speculative_proposed_total"]
    assert m["kv_pages_used"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_draft_gives_the_tokens_of_plain_decoding(byte_tokenizer, kind):
    """A one-layer draft (the target's first layer; for LCKV, whose first layer reads the top one, a model of its
    own): greedy and sampled requests give plain decoding's tokens, and every proposal is the draft's own greedy
    continuation of the sequence as it stood (a dense forward of the draft), so rejected proposals were rolled
    back from the draft's KV too."""
    cfg = ModelConfig(**{**BASE, **KINDS[kind]})
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(1)),
              kv_dtype="int8" if kind == "int8" else None)
    if kind == "lckv":
        small = ModelConfig(**BASE, n_layers=1)
        draft = LLM(small, byte_tokenizer, init_params(small, jax.random.PRNGKey(9)))
    else:
        draft = draft_model("first-1", llm)
    sampling = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3), SamplingParams()]

    def generate(spec):
        engine = Engine(llm, max_batch=2, page_size=8, prefill_chunk=16, kv_dtype=llm.kv_dtype, speculative=spec)
        proposed = []
        if spec is not None:
            propose = engine.draft.propose

            def recorded(rows, *args):
                out = propose(rows, *args)
                proposed.extend((list(seq.tokens), p) for (seq, _), p in zip(rows, out))
                return out

            engine.draft.propose = recorded
        got = run(engine, [Request(p, s, max_tokens=16, request_id=str(i), ignore_eos=True)
                           for i, (p, s) in enumerate(zip(prompts(1), sampling))])
        return got, engine.metrics(), proposed

    plain, _, _ = generate(None)
    spec, metrics, proposed = generate(drafting(llm, draft))
    for i in map(str, range(3)):
        assert tokens_of(spec[i]) == tokens_of(plain[i]), f"request {i}"
    assert metrics["speculative_verified_rows_total"] > 0 and metrics["kv_pages_used"] == 0
    assert proposed
    for tokens, proposal in proposed:
        assert proposal == dense_greedy(draft.config, draft.params, tokens, len(proposal)), len(tokens)


def test_draft_specs_and_bad_drafts_are_one_line(byte_tokenizer, tmp_path):
    """draft:MODEL:K parses; a draft with another vocabulary or tokenizer, a shorter context, an unloaded model, or
    first-N out of range each give one clear line."""
    assert speculation("draft:org/name@main:3") == Speculation("draft", 3, source="org/name@main")
    assert speculation("draft:first-2:4").source == "first-2"
    for spec, message in (("draft:4", "speculative draft needs a model"), ("draft:x:0", "needs K"),
                          ("draft:first-1", "needs K")):
        with pytest.raises(JaxkvError, match=message):
            speculation(spec)
    cfg = ModelConfig(**BASE, n_layers=2)
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(0)))
    other = ModelConfig(**{**BASE, "vocab_size": 300}, n_layers=1)
    with pytest.raises(JaxkvError, match="the draft model's vocabulary has 300 tokens, the target's 258"):
        Engine(llm, speculative=drafting(llm, LLM(other, byte_tokenizer, init_params(other, jax.random.PRNGKey(0)))))
    short = ModelConfig(**{**BASE, "max_seq_len": 64}, n_layers=1)
    with pytest.raises(JaxkvError, match="the draft model's context is 64 tokens, shorter than the 256 this engine"):
        Engine(llm, speculative=drafting(llm, LLM(short, byte_tokenizer, init_params(short, jax.random.PRNGKey(0)))))
    assert Engine(llm, max_context=64, speculative=drafting(llm, LLM(short, byte_tokenizer, llm.params))).draft
    with pytest.raises(JaxkvError, match="speculative draft needs its model loaded"):
        Engine(llm, speculative=dataclasses.replace(drafting(llm, llm), draft=None))
    with pytest.raises(JaxkvError, match=r"draft first-N takes N in \[1, 1\]"):
        draft_model("first-2", llm)
    write_tiny_hf_model(tmp_path, "llama-bias")
    with pytest.raises(JaxkvError, match="unknown model '/nonexistent/draft'"):
        jaxkv.load(str(tmp_path), speculative="draft:/nonexistent/draft:4")
    assert jaxkv.load(str(tmp_path), speculative="draft:first-1:4").speculative.draft.config.n_layers == 1


def test_a_draft_with_another_tokenizer_is_refused(byte_tokenizer):
    """A draft whose vocabulary has the target's size but whose tokenizer numbers two bytes the other way round."""
    import tokenizers

    from jaxkv.tokenizer import Tokenizer

    cfg = ModelConfig(**BASE, n_layers=2)
    llm = LLM(cfg, byte_tokenizer, init_params(cfg, jax.random.PRNGKey(0)))
    spec = json.loads(byte_tokenizer.hf.to_str())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[65:67]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), byte_tokenizer.bos_id,
                        byte_tokenizer.eos_ids)
    with pytest.raises(JaxkvError, match="the draft model's tokenizer differs from the target's"):
        Engine(llm, speculative=drafting(llm, LLM(cfg, swapped, llm.params)))
