"""The `jaxkv` console script, run as a real subprocess against the real default model.

Expected values come from outside the CLI: the checkpoint's tokenizer and config files, the Python
API (a separate code path in this process), and for sampling a forward pass that ranks each drawn
token. Subprocesses run two at a time (the machine has two cores; each pays JAX's start-up).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from conftest import dense_greedy
from jaxkv.cache.dense import KVCache
from jaxkv.model.decoder import forward
from jaxkv.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

JAXKV = str(Path(sys.executable).parent / "jaxkv")
PROMPT = "The capital of France is"
CHAT_PROMPT = "What is the capital of France?"
SAMPLING = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9"]
MAX_NEW = 8


def _env() -> dict[str, str]:
    env = dict(os.environ)  # JAXKV_HOME is inherited
    env.pop("JAXKV_DEBUG", None)  # errors must be one line without it
    env["JAXKV_COMPILATION_CACHE"] = "1"  # runs load what an earlier one compiled, as a user's repeated commands do
    return env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([JAXKV, *args], capture_output=True, text=True, env=_env(), timeout=timeout)


def run_many(cases: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(run_cli, *args) for key, args in cases.items()}
        return {key: f.result() for key, f in futures.items()}


def parse_json_stdout(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    out = json.loads(proc.stdout)
    assert isinstance(out, dict)
    return out


def gen_args(prompt: str = PROMPT, *extra: str, model: str | None = None) -> list[str]:
    args = ["generate", "--prompt", prompt, "--max-new-tokens", str(MAX_NEW), "--json", *extra]
    return args + (["--model", model] if model else [])


# --- the real model, through the CLI and through the Python API ---------------------------------
@pytest.fixture(scope="module")
def runs(smollm2_checkpoint) -> dict[str, subprocess.CompletedProcess]:
    """The successful generate runs of this module (the preset is converted before any starts)."""
    return run_many({
        "greedy": gen_args(),
        "chat": gen_args(CHAT_PROMPT, "--chat"),
        "seed3": gen_args(PROMPT, *SAMPLING, "--seed", "3"),
        "seed3-again": gen_args(PROMPT, *SAMPLING, "--seed", "3"),
        "seed4": gen_args(PROMPT, *SAMPLING, "--seed", "4"),
        "seed5": gen_args(PROMPT, *SAMPLING, "--seed", "5"),
        "seed-2**31": gen_args(PROMPT, *SAMPLING, "--seed", str(2**31)),
        "streaming": gen_args(PROMPT, "--streaming-window", "64", "--sinks", "4"),
    })


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint) -> Tokenizer:
    return Tokenizer.load(smollm2_checkpoint)


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint):
    return jaxkv.load(str(smollm2_checkpoint))


def test_generate_json(runs, tokenizer, smollm2_checkpoint, llm):
    out = parse_json_stdout(runs["greedy"])
    assert {"text", "token_ids", "prompt_tokens", "tokens_per_s", "kv_bytes_per_token"} <= set(out)
    ids = out["token_ids"]
    assert ids == dense_greedy(llm.config, llm.params, tokenizer.encode(PROMPT), MAX_NEW, tokenizer.eos_ids)
    assert out["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    assert out["text"] == tokenizer.decode(ids)
    assert isinstance(out["tokens_per_s"], (int, float)) and out["tokens_per_s"] > 0

    config = json.loads((smollm2_checkpoint / "config.json").read_text())
    sources = config.get("kv_sources") or list(range(config["n_layers"]))
    kv_layers = sum(1 for layer, src in enumerate(sources) if src == layer)
    itemsize = np.dtype(config["dtype"]).itemsize
    assert out["kv_bytes_per_token"] == 2 * kv_layers * config["n_kv_heads"] * config["head_dim"] * itemsize
    assert out["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4


def test_generate_json_equals_python_api(runs, llm):
    out = parse_json_stdout(runs["greedy"])
    want = llm.generate(PROMPT, max_new_tokens=MAX_NEW, temperature=0)
    assert out["token_ids"] == want.token_ids
    assert out["text"] == want.text
    assert out["prompt_tokens"] == want.prompt_tokens


def test_streaming_before_any_eviction_generates_like_the_full_cache(runs):
    """Prompt + new tokens fit in sinks + window: nothing is evicted, so StreamingLLM changes nothing."""
    assert parse_json_stdout(runs["streaming"])["token_ids"] == parse_json_stdout(runs["greedy"])["token_ids"]


def test_generate_chat_uses_template(runs, tokenizer, llm):
    out = parse_json_stdout(runs["chat"])
    templated = tokenizer.encode(tokenizer.apply_chat_template(CHAT_PROMPT), add_special_tokens=False)
    assert out["prompt_tokens"] == len(templated)
    assert out["prompt_tokens"] > len(tokenizer.encode(CHAT_PROMPT))
    assert out["token_ids"] == llm.generate(CHAT_PROMPT, max_new_tokens=MAX_NEW, temperature=0, chat=True).token_ids
    assert out["text"] == tokenizer.decode(out["token_ids"])


def test_sampled_cli_equals_python_api(runs, llm):
    """One sampling rule: the seed and the token's index decide, so the CLI draws what LLM.generate draws
    (and what the server does: tests/test_server.py)."""
    out = parse_json_stdout(runs["seed3"])
    want = llm.generate(PROMPT, max_new_tokens=MAX_NEW, temperature=0.8, top_k=40, top_p=0.9, seed=3)
    assert out["token_ids"] == want.token_ids and out["text"] == want.text


def test_sampling_is_reproducible_per_seed(runs):
    first, again = parse_json_stdout(runs["seed3"]), parse_json_stdout(runs["seed3-again"])
    assert first["token_ids"] == again["token_ids"] and first["text"] == again["text"]
    seqs = [tuple(parse_json_stdout(runs[k])["token_ids"]) for k in ("seed3", "seed4", "seed5")]
    assert len(set(seqs)) > 1, seqs


def test_seed_above_int32_is_used(runs):
    """Seeds cover [0, 2**32): 2**31 samples normally."""
    assert len(parse_json_stdout(runs["seed-2**31"])["token_ids"]) >= 1


@pytest.mark.parametrize("seed", ["seed3", "seed4", "seed5"])
def test_sampled_tokens_respect_top_k_and_top_p(runs, llm, seed):
    """Each drawn token lies in the top 40 and in the 0.9 nucleus of the temperature-0.8 distribution
    (HF's order: temperature, then top-k, then top-p on the renormalised survivors)."""
    out = parse_json_stdout(runs[seed])
    prompt_ids = llm.encode(PROMPT)
    ids = prompt_ids + out["token_ids"]
    cfg = llm.config
    logits, _ = forward(cfg, llm.params, jnp.asarray([ids]), KVCache.init(cfg, 1, len(ids)))
    logits = np.asarray(logits[0], np.float64) / 0.8
    for pos, token in enumerate(out["token_ids"]):
        row = logits[len(prompt_ids) - 1 + pos]
        order = np.argsort(-row)
        rank = int(np.nonzero(order == token)[0][0])
        assert rank < 40, (pos, rank)
        top = row[order[:40]]
        probs = np.exp(top - top.max())
        probs /= probs.sum()
        mass_before = probs[:rank].sum()
        assert mass_before < 0.9 + 1e-4, (pos, rank, mass_before)


def test_convert_round_trip(tmp_path, runs, smollm2_gguf):
    out_dir = tmp_path / "ckpt"
    conv = run_cli("convert", "--gguf", str(smollm2_gguf), "--out", str(out_dir))
    assert conv.returncode == 0, conv.stderr
    assert conv.stdout == ""
    assert "Traceback" not in conv.stderr
    assert (out_dir / "config.json").is_file() and (out_dir / "params").is_dir()
    out = parse_json_stdout(run_cli(*gen_args(model=str(out_dir))))
    assert out["token_ids"] == parse_json_stdout(runs["greedy"])["token_ids"]


# --- bad input: a non-zero exit, one line on stderr, nothing on stdout ---------------------------
BAD = {
    # case: (argv with {tmp} for the scratch dir, expected exit code or None for any non-zero,
    #        regex the one-line message must match)
    "unknown-model": (gen_args(model="no-such-model"), 1, r"no-such-model"),
    "missing-path": (gen_args(model="/tmp/does/not/exist.gguf"), 1, r"/tmp/does/not/exist\.gguf"),
    "corrupt-gguf": (gen_args(model="{tmp}/bad.gguf"), 1, r"bad\.gguf"),
    "truncated-gguf": (gen_args(model="{tmp}/truncated.gguf"), 1, r"truncated\.gguf"),
    "not-a-checkpoint": (gen_args(model="{tmp}/empty"), 1, r"empty"),
    "damaged-checkpoint": (gen_args(model="{tmp}/damaged"), 1, r"damaged"),
    "geometry-only-preset": (gen_args(model="llama-2-7b"), 1, r"llama-2-7b.*weights|weights.*llama-2-7b"),
    "unsupported-architecture": (gen_args(model="{tmp}/gpt2"), 1, r"GPT2LMHeadModel"),
    "negative-temperature": (gen_args(PROMPT, "--temperature", "-1"), 1, r"temperature"),
    "top-p-zero": (gen_args(PROMPT, "--top-p", "0"), 1, r"top[_-]p"),
    "top-p-above-one": (gen_args(PROMPT, "--top-p", "1.5"), 1, r"top[_-]p"),
    "negative-top-k": (gen_args(PROMPT, "--top-k", "-3"), 1, r"top[_-]k"),
    "seed-out-of-range": (gen_args(PROMPT, "--seed", str(2**32)), 1, r"seed"),
    "zero-new-tokens": (["generate", "--prompt", PROMPT, "--max-new-tokens", "0", "--json"], 1,
                        r"max[_-]new[_-]tokens"),
    "non-numeric-top-k": (gen_args(PROMPT, "--top-k", "abc"), 2, r"top-k.*abc"),
    "missing-prompt": (["generate", "--json"], 2, r"--prompt"),
    "no-command": ([], 2, r"command|required"),
    "prompt-too-long": (gen_args("hello " * 9000), 1, r"context"),
    "prompt-not-utf8": (gen_args("hi \udcff"), 1, r"prompt contains a lone surrogate"),  # argv byte 0xff
    "mesh-of-other-devices": (gen_args(PROMPT, "--mesh", "data=3"), 1, r"mesh spec 'data=3' uses 3 devices"),
    "mesh-unknown-axis": (gen_args(PROMPT, "--mesh", "tensor=1"), 1, r"unknown axis 'tensor'"),
    "convert-corrupt-gguf": (["convert", "--gguf", "{tmp}/bad.gguf", "--out", "{tmp}/out-gguf"], 1, r"bad\.gguf"),
    "convert-missing-hf": (["convert", "--hf", "{tmp}/missing_dir", "--out", "{tmp}/out-hf"], 1, r"missing_dir"),
}


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory, smollm2_gguf, smollm2_checkpoint):
    from safetensors.numpy import save_file

    tmp = tmp_path_factory.mktemp("cli_bad")
    (tmp / "bad.gguf").write_bytes(np.random.default_rng(0).bytes(1 << 16))
    with open(smollm2_gguf, "rb") as f:  # a real GGUF cut short: valid header, tensors missing
        (tmp / "truncated.gguf").write_bytes(f.read(1 << 20))
    (tmp / "empty").mkdir()
    damaged = tmp / "damaged"  # a jaxkv checkpoint whose params/ is empty
    damaged.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_checkpoint / name, damaged / name)
    (damaged / "params").mkdir()
    gpt2 = tmp / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 16, "n_embd": 8,
        "n_layer": 1, "n_head": 2, "n_positions": 32}))
    save_file({"transformer.wte.weight": np.zeros((16, 8), np.float32),
               "transformer.wpe.weight": np.zeros((32, 8), np.float32)}, str(gpt2 / "model.safetensors"))
    cases = {key: [a.replace("{tmp}", str(tmp)) for a in argv] for key, (argv, _, _) in BAD.items()}
    return tmp, run_many(cases)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_with_one_line(bad_results, case):
    tmp, results = bad_results
    proc = results[case]
    _, code, pattern = BAD[case]
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert "internal error" not in lines[0], lines[0]  # a known failure, not a caught crash
    assert re.search(pattern, lines[0], re.IGNORECASE), lines[0]
    if case.startswith("convert"):
        assert not (tmp / "out-gguf").exists() and not (tmp / "out-hf").exists()
