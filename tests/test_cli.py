"""The `jaxkv` console script against the real default model: as real subprocesses, and through its entry point.

Expected values come from outside the CLI: the checkpoint's tokenizer and config files, the Python
API (a separate code path in this process), and for sampling a forward pass that ranks each drawn
token. Each subprocess pays JAX's start-up and a model load, so they are the runs whose point is a real process:
greedy, StreamingLLM, a seed twice (the same draw in two processes), a conversion and a generate from it, argparse's
exit and argv bytes that are not UTF-8. They run one at a time on a worker thread from the start of the module,
on one of the two cores, while this process calls the same entry point, `jaxkv.cli.main`, for the other runs on
the other: every bad input (its exit code, and its one line on stderr captured at the file descriptor) and the
chat and other seeds' generate runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxkv
from conftest import dense_greedy
from jaxkv.api import LLM
from jaxkv.cache.dense import KVCache
from jaxkv.cli import main as cli_main
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


def call_main(args: list[str]) -> int:
    """The console script's entry point (`sys.exit(main())`) in this process: its exit code."""
    try:
        return cli_main(list(args))
    except SystemExit as e:  # argparse's exit
        return e.code


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """`jaxkv ARGS` through `call_main`, with what it printed to stdout and stderr (JAXKV_DEBUG unset)."""
    out, err = io.StringIO(), io.StringIO()
    debug = os.environ.pop("JAXKV_DEBUG", None)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = call_main(list(args))
    finally:
        if debug is not None:
            os.environ["JAXKV_DEBUG"] = debug
    return subprocess.CompletedProcess(["jaxkv", *args], code, out.getvalue(), err.getvalue())


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


# --- every subprocess of the module -------------------------------------------------------------
SUBPROCESS_RUNS = {  # in this order: greedy before the sampled runs, which load its executables from the cache
    "greedy": gen_args(),
    "streaming": gen_args(PROMPT, "--streaming-window", "64", "--sinks", "4"),
    "seed3": gen_args(PROMPT, *SAMPLING, "--seed", "3"),
    "seed3-again": gen_args(PROMPT, *SAMPLING, "--seed", "3"),
}
IN_PROCESS_RUNS = {
    "chat": gen_args(CHAT_PROMPT, "--chat"),
    "seed4": gen_args(PROMPT, *SAMPLING, "--seed", "4"),
    "seed5": gen_args(PROMPT, *SAMPLING, "--seed", "5"),
    "seed-2**31": gen_args(PROMPT, *SAMPLING, "--seed", str(2**31)),
    "text": ["generate", "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW)],  # no --json: streamed
}
# Bad inputs also run as subprocesses of the console script: argparse's exit, and argv bytes that are not UTF-8
# as the OS passes them (an error after JAX started and the model loaded: nothing else may reach stderr)
SUBPROCESS_BAD = ("non-numeric-top-k", "prompt-not-utf8")


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, smollm2_gguf, smollm2_checkpoint) -> Path:
    """The scratch dir of the bad inputs: a corrupt and a truncated GGUF, an empty dir, a damaged checkpoint and
    an unsupported architecture."""
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
    return tmp


def bad_argv(case: str, tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in BAD[case][0]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """Where the convert subprocess writes the default model's GGUF as a jaxkv checkpoint."""
    return tmp_path_factory.mktemp("convert") / "ckpt"


@pytest.fixture(scope="module", autouse=True)
def subprocesses(smollm2_gguf, smollm2_checkpoint, bad_dir, converted) -> dict[str, Future]:
    """Every subprocess of this module, started with the module (the preset converted before any starts), one at
    a time on a worker thread: they keep one core busy while this process runs its own checks on the other. A
    test waits for the results it reads."""
    cases = {**{f"bad {case}": bad_argv(case, bad_dir) for case in SUBPROCESS_BAD},  # quick: read first
             **SUBPROCESS_RUNS,
             "convert": ["convert", "--gguf", str(smollm2_gguf), "--out", str(converted)],
             "from-converted": gen_args(model=str(converted))}  # after "convert": one worker, in order
    pool = ThreadPoolExecutor(max_workers=1)
    yield {key: pool.submit(run_cli, *args) for key, args in cases.items()}
    pool.shutdown(cancel_futures=True)


# --- bad input: a non-zero exit, one line on stderr, nothing on stdout ---------------------------
def check_one_line_failure(proc: subprocess.CompletedProcess, case: str, tmp: Path) -> None:
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


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_with_one_line(bad_dir, case, capfd, monkeypatch):
    """Through the entry point in this process; stdout and stderr captured at the file descriptors, so that
    whatever JAX or a library printed would count too."""
    monkeypatch.delenv("JAXKV_DEBUG", raising=False)  # errors must be one line without it
    capfd.readouterr()
    code = call_main(bad_argv(case, bad_dir))
    out, err = capfd.readouterr()
    check_one_line_failure(subprocess.CompletedProcess(BAD[case][0], code, out, err), case, bad_dir)


@pytest.mark.parametrize("case", SUBPROCESS_BAD)
def test_bad_input_fails_with_one_line_from_the_console_script(subprocesses, bad_dir, case):
    check_one_line_failure(subprocesses[f"bad {case}"].result(), case, bad_dir)


# --- the real model, through the CLI and through the Python API ---------------------------------
@pytest.fixture(scope="module")
def runs(subprocesses) -> dict[str, subprocess.CompletedProcess]:
    """The successful generate runs: those in this process first (while the subprocesses run), then the
    subprocesses' results."""
    runs = {key: run_in_process(*args) for key, args in IN_PROCESS_RUNS.items()}
    runs.update({key: subprocesses[key].result() for key in SUBPROCESS_RUNS})
    return runs


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


def test_generate_without_json_prints_the_text_as_it_comes_and_counts_on_stderr(runs, llm):
    """Without --json, stdout is the text (written piece by piece by LLM.stream) and a newline, the same as
    LLM.generate's; the token counts and speed go to stderr."""
    proc = runs["text"]
    assert proc.returncode == 0, proc.stderr
    want = llm.generate(PROMPT, max_new_tokens=MAX_NEW)
    assert proc.stdout == want.text + "\n"
    assert re.search(rf"^\[{want.prompt_tokens} prompt tokens, {len(want.token_ids)} generated, [\d.]+ tok/s",
                     proc.stderr, re.M), proc.stderr


def test_streaming_before_any_eviction_generates_like_the_full_cache(runs):
    """Prompt + new tokens fit in sinks + window: nothing is evicted, so StreamingLLM changes nothing."""
    assert parse_json_stdout(runs["streaming"])["token_ids"] == parse_json_stdout(runs["greedy"])["token_ids"]


def test_generate_chat_uses_template(runs, tokenizer, llm):
    out = parse_json_stdout(runs["chat"])
    templated = tokenizer.encode(tokenizer.apply_chat_template(CHAT_PROMPT), add_special_tokens=False)
    assert out["prompt_tokens"] == len(templated)
    assert out["prompt_tokens"] > len(tokenizer.encode(CHAT_PROMPT))
    # a model of its own, as the CLI's: `llm` keeps the engine of the shorter plain prompt the other tests use
    chat = LLM(llm.config, llm.tokenizer, llm.params).generate(CHAT_PROMPT, max_new_tokens=MAX_NEW, temperature=0,
                                                               chat=True)
    assert out["token_ids"] == chat.token_ids
    assert out["text"] == tokenizer.decode(out["token_ids"])


def test_sampled_cli_equals_python_api(runs, llm):
    """One sampling rule: the seed and the token's index decide, so the CLI draws what LLM.generate draws
    (and what the server does: tests/test_server.py)."""
    out = parse_json_stdout(runs["seed3"])
    want = llm.generate(PROMPT, max_new_tokens=MAX_NEW, temperature=0.8, top_k=40, top_p=0.9, seed=3)
    assert out["token_ids"] == want.token_ids and out["text"] == want.text


def test_sampling_is_reproducible_per_seed(runs):
    """The same seed draws the same tokens in two processes; other seeds draw others."""
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


def test_convert_round_trip(subprocesses, converted, runs):
    conv = subprocesses["convert"].result()
    assert conv.returncode == 0, conv.stderr
    assert conv.stdout == ""
    assert "Traceback" not in conv.stderr
    assert (converted / "config.json").is_file() and (converted / "params").is_dir()
    out = parse_json_stdout(subprocesses["from-converted"].result())
    assert out["token_ids"] == parse_json_stdout(runs["greedy"])["token_ids"]
