"""Scoring through the engine (forced tokens) and `jaxkv perplexity`, against the dense forward's log-softmax:
the same log-probabilities token by token, the perplexity of every window computed literally, KV bytes held
equal to the pages allocated, KL and top-1 agreement against a reference run, and one-line errors."""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest

import jaxkv
from conftest import write_tiny_hf_model
from jaxkv.api import LLM
from jaxkv.cache.dense import KVCache
from jaxkv.cache.paged import streaming_pages
from jaxkv.cli import main
from jaxkv.errors import InvalidRequest, JaxkvError
from jaxkv.eval import perplexity, record
from jaxkv.model.decoder import forward
from jaxkv.serve.engine import Engine, Request

TEXT = [int(t) for t in np.random.default_rng(0).integers(0, 256, 100)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_hf_model(directory, "llama-bias")
    return directory


@pytest.fixture(scope="module")
def llm(model_dir):
    return jaxkv.load(str(model_dir))


def dense_log_probs(llm, ids) -> np.ndarray:
    logits, _ = forward(llm.config, llm.params, np.array([ids]), KVCache.init(llm.config, 1, len(ids)))
    return np.asarray(jax.nn.log_softmax(logits[0], -1))


def test_forced_tokens_are_scored_as_the_dense_forward(llm):
    """Forced tokens are fed instead of sampled ones (several per call with decode_iters), beside an ordinary
    request; their logprobs and full distributions are the dense forward's; EOS among them does not stop."""
    eos = next(iter(llm.tokenizer.eos_ids))
    text = TEXT[:20] + [eos] + TEXT[21:40]
    engine = Engine(llm, max_batch=2, prefill_chunk=16, decode_iters=4, max_context=64)
    engine.add(Request(text[:10], max_tokens=30, forced_ids=text[10:], logprobs=True, distributions=True,
                       request_id="scored"))
    engine.add(Request(TEXT[50:55], max_tokens=8, request_id="sampled"))
    fed, logprobs, dists, held = [], [], [], 0
    while engine.has_work():
        for out in engine.step():
            if out.request_id == "scored":
                fed += out.token_ids
                logprobs += out.logprobs
                dists.append(out.distributions)
                held = out.kv_bytes
    assert fed == text[10:]
    want = dense_log_probs(llm, text)[9:39]
    np.testing.assert_allclose(logprobs, want[np.arange(30), text[10:]], atol=1e-4)
    np.testing.assert_allclose(np.concatenate(dists), want, atol=1e-4)
    # 40 tokens in pages of 16: 3 pages of every KV layer, K and V, float32
    assert held == 3 * engine.page_size * llm.kv_bytes_per_token


def test_forced_ids_are_validated(llm):
    engine = Engine(llm, max_batch=1, max_context=64)
    with pytest.raises(InvalidRequest, match=r"max_tokens \(3\) must equal the number of forced_ids \(2\)"):
        engine.add(Request([1, 2], max_tokens=3, forced_ids=[4, 5]))
    with pytest.raises(InvalidRequest, match=r"forced_ids must be a list of token ids in \[0, 260\)"):
        engine.add(Request([1, 2], max_tokens=1, forced_ids=[260]))
    assert not engine.has_work()


def literal_perplexity(llm, windows, prefill: int) -> float:
    """exp of the mean negative log-probability of every window's tokens after `prefill`, by the dense forward."""
    nll, n = 0.0, 0
    for window in windows:
        log_probs = dense_log_probs(llm, window)
        nll -= sum(log_probs[j - 1, window[j]] for j in range(prefill, len(window)))
        n += len(window) - prefill
    return math.exp(nll / n)


def test_perplexity_equals_the_literal_computation(llm):
    """Three windows of 32, 8 prefilled, int8 KV against the float32 reference: the reference's perplexity is the
    literal one; int8's is close, its KL small and positive, and the bytes it held its pages' (scales included)."""
    want = literal_perplexity(llm, [TEXT[0:32], TEXT[32:64], TEXT[64:96]], 8)
    int8 = LLM(llm.config, llm.tokenizer, llm.params, kv_dtype="int8")
    reference = LLM(llm.config, llm.tokenizer, llm.params, kv_dtype="float32")
    got = perplexity(int8, TEXT, context=32, prefill=8, batch=2, reference=reference, progress=False)
    assert (got.tokens, got.windows, got.context, got.prefill) == (72, 3, 32, 8)
    assert got.reference_ppl == pytest.approx(want, rel=1e-4)
    assert got.ppl == pytest.approx(want, rel=2e-2) and got.ppl != got.reference_ppl
    assert 0 < got.mean_kl < 1e-2 and got.top1_agreement > 0.9
    assert got.kv_bytes_held == 2 * 16 * int8.kv_bytes_per_token  # 32 tokens: 2 pages


def test_a_recorded_reference_gives_what_the_lockstep_one_gives(llm):
    """The reference recorded once (as the benchmark compares many configurations with it) yields the same
    perplexity, agreement and KL as running it beside the model; windows it was not recorded on are refused."""
    int8 = LLM(llm.config, llm.tokenizer, llm.params, kv_dtype="int8")
    reference = LLM(llm.config, llm.tokenizer, llm.params, kv_dtype="float32")
    lockstep = perplexity(int8, TEXT, context=32, prefill=8, batch=2, reference=reference, progress=False)
    recorded = record(reference, TEXT, context=32, prefill=8, batch=2, progress=False)
    assert len(recorded.distributions) == 72
    got = perplexity(int8, TEXT, context=32, prefill=8, batch=3, reference=recorded, progress=False)
    assert got.reference_ppl == pytest.approx(lockstep.reference_ppl, rel=1e-6)
    assert got.top1_agreement == lockstep.top1_agreement
    assert got.mean_kl == pytest.approx(lockstep.mean_kl, rel=1e-5) and got.mean_kl > 0
    with pytest.raises(JaxkvError, match=r"the recorded reference ran \(windows, context, prefill\) = "
                                         r"\(3, 32, 8\), not \(3, 32, 16\)"):
        perplexity(int8, TEXT, context=32, prefill=16, reference=recorded, progress=False)


def test_cli_perplexity_json(model_dir, llm, tmp_path, capsys):
    """`jaxkv perplexity --json` over a text file, in process: one JSON object with the literal perplexity of
    the file's windows of 64 tokens, the second half of each scored."""
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3)
    assert main(["perplexity", "--model", str(model_dir), "--file", str(text), "--context", "64", "--kv-rotate",
                 "--json"]) == 0  # rotating K and Q changes no score with float32 KV
    out = json.loads(capsys.readouterr().out)
    ids = llm.tokenizer.encode(text.read_text())
    windows = [ids[i:i + 64] for i in range(0, len(ids) - 63, 64)]
    assert out["ppl"] == pytest.approx(literal_perplexity(llm, windows, 32), rel=1e-4)
    assert {k: out[k] for k in ("tokens", "windows", "context", "prefill", "kv_dtype", "kv_bytes_per_token")} == {
        "tokens": 32 * len(windows), "windows": len(windows), "context": 64, "prefill": 32, "kv_dtype": "float32",
        "kv_bytes_per_token": llm.kv_bytes_per_token}
    assert out["reference_ppl"] is None and out["mean_kl"] is None and out["eviction"] is None


def test_cli_perplexity_with_eviction(model_dir, llm, tmp_path, capsys):
    """--eviction h2o --kv-budget 16 on windows of 64: the JSON names the policy, and each window ends holding its
    budget (2 pages of 8), not its 64 tokens (8 pages)."""
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3)
    assert main(["perplexity", "--model", str(model_dir), "--file", str(text), "--context", "64", "--page-size", "8",
                 "--eviction", "h2o", "--kv-budget", "16", "--reference", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eviction"] == "h2o budget 16 window 8"
    assert out["kv_bytes_held"] == 2 * 8 * llm.kv_bytes_per_token
    assert out["ppl"] != out["reference_ppl"] and 0 < out["top1_agreement"] <= 1


def test_cli_perplexity_streaming_prefills_at_most_its_window(model_dir, llm, tmp_path, capsys):
    """--streaming-window 16 (4 sinks) on windows of 64: 20 tokens prefilled by default, the other 44 fed one by
    one (the window's default half, 32, would not fit the ring); the bytes held are the ring's pages, not the
    window's; an explicit longer prefill is one line."""
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 3)
    argv = ["perplexity", "--model", str(model_dir), "--file", str(text), "--context", "64", "--page-size", "8",
            "--streaming-window", "16", "--reference", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["prefill"], out["tokens"] // out["windows"]) == (20, 44)
    ring = streaming_pages(llm.config.replace(streaming_window=16, streaming_sinks=4), 8)
    assert out["kv_bytes_held"] == ring * 8 * llm.kv_bytes_per_token < 64 * llm.kv_bytes_per_token
    assert out["ppl"] != out["reference_ppl"]  # past 20 tokens the window drops some
    assert main([*argv, "--prefill", "32"]) == 1
    assert "at most 20 tokens are prefilled (the rest are fed one by one), got prefill 32" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--file", "/nonexistent.txt"], "cannot read text file /nonexistent.txt"),
    (["--context", "1"], "context must be at least 2 tokens, got 1"),
    (["--context", "4096"], "context 4096 is longer than the model's 256 tokens"),
    (["--context", "32", "--prefill", "32"], r"prefill must be in \[1, 31\] for windows of 32 tokens, got 32"),
    (["--eviction", "h2o"], r"eviction h2o needs a KV budget \(--kv-budget N tokens\)"),
    (["--eviction", "snapkv", "--kv-budget", "8", "--eviction-window", "8"],
     r"the eviction window must be at least 1 and below the KV budget \(8\), got 8"),
    (["--eviction", "h2o", "--kv-budget", "8", "--eviction-window", "4", "--eviction-sinks", "4"],
     r"the KV budget \(8\) must exceed the eviction sinks \(4\) plus the eviction window \(4\)"),
])
def test_cli_perplexity_bad_input_is_one_line(model_dir, tmp_path, capsys, args, message):
    text = tmp_path / "text.txt"
    text.write_text("a short text, long enough for a window or two of tokens " * 2)
    argv = ["perplexity", "--model", str(model_dir), "--file", str(text), *args]
    if "--file" in args:
        argv = ["perplexity", "--model", str(model_dir), *args]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("jaxkv")]
    assert len(err) == 1 and err[0].startswith("jaxkv: error: ")
    assert re.search(message, err[0]), err[0]


def test_windows_refuse_a_text_of_one_token(llm):
    with pytest.raises(JaxkvError, match=r"the text has 1 token\(s\); perplexity needs at least 2"):
        perplexity(llm, [5], context=8, progress=False)
