"""The real SmolLM2-135M-Instruct (Q4_1 GGUF) in jaxkv against HF transformers reading the same GGUF.

The truth here is transformers' own GGUF loader (dequantisation, Q/K un-permutation, Llama forward
and greedy search): jaxkv's logits and greedy continuations must match it on the same token ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxkv
from conftest import relative_error
from jaxkv.cache.dense import KVCache
from jaxkv.model.decoder import forward

pytestmark = pytest.mark.slow

LOGIT_PROMPTS = {
    "short": "The capital of France is",
    "medium": "Here is a short recipe for pancakes. First, mix two cups of flour with a pinch of salt and",
    "long": ("In 1969 the Apollo 11 mission landed the first humans on the Moon. Neil Armstrong and Buzz Aldrin "
             "spent about two and a half hours outside the lunar module, collecting 21.5 kg of samples, while "
             "Michael Collins orbited above in the command module Columbia. The crew returned to Earth on "
             "July 24 and splashed down in the Pacific Ocean, where they were recovered by the USS Hornet. "
             "Afterwards the astronauts"),
}

# Three plain prompts and one chat prompt, all completed together in one batched call.
PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea, there lived",
]
CHAT_PROMPT = "What is 2+2? Answer briefly."
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint):
    return jaxkv.load(str(smollm2_checkpoint))


def hf_greedy(model, ids: list[int], max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """HF greedy search on one unpadded prompt; only the new ids (stops after EOS if it comes)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


def eos_ids_of(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


@pytest.fixture(scope="module")
def prompt_ids(llm):
    """Token ids of each prompt as jaxkv encodes them; the chat prompt through the chat template."""
    return [llm.encode(p) for p in PLAIN_PROMPTS] + [llm.encode(CHAT_PROMPT, chat=True)]


@pytest.fixture(scope="module")
def hf_continuations(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids) for ids in prompt_ids]


@pytest.fixture(scope="module")
def batched(llm):
    """All four prompts in ONE generate call: the chat prompt is passed as its rendered template text."""
    chat_text = llm.tokenizer.apply_chat_template(CHAT_PROMPT)
    return llm.generate(PLAIN_PROMPTS + [chat_text], max_new_tokens=NEW_TOKENS, temperature=0)


def test_config_matches_hf(llm, hf_model):
    c = hf_model.config
    cfg = llm.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_dim) == (
        c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
        c.intermediate_size)
    assert cfg.head_dim == c.hidden_size // c.num_attention_heads
    assert cfg.rope_theta == pytest.approx(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None)
                                           else c.rope_theta)
    assert cfg.norm_eps == pytest.approx(c.rms_norm_eps)
    assert cfg.tie_embeddings == bool(c.tie_word_embeddings)


def test_gguf_path_loads_same_params_as_checkpoint(llm, smollm2_gguf):
    """jaxkv.load(<file.gguf>) dequantises on the fly; it must equal the converted checkpoint."""
    direct = jaxkv.load(str(smollm2_gguf))
    assert direct.config.replace(name=llm.config.name) == llm.config
    got = jax.tree_util.tree_flatten_with_path(direct.params)[0]
    want = jax.tree_util.tree_flatten_with_path(llm.params)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert direct.tokenizer.encode(CHAT_PROMPT) == llm.tokenizer.encode(CHAT_PROMPT)
    assert direct.tokenizer.eos_ids == llm.tokenizer.eos_ids


def test_embedding_matches_hf(llm, hf_model):
    """The dequantised token embedding equals transformers' (same GGUF, independent dequantiser)."""
    want = hf_model.get_input_embeddings().weight.detach().numpy()
    got = np.asarray(llm.params["embed"]["embedding"])
    assert got.shape == want.shape
    assert relative_error(got, want) < 1e-6


@pytest.fixture(scope="module")
def last_logits(llm) -> dict[str, tuple[np.ndarray, int]]:
    """jaxkv's logits at the last position of each LOGIT_PROMPTS prompt and the length its cache row holds after,
    from ONE forward of the three prompts right-padded to the longest (each row's n_new its own length, so the
    padding is neither written to the cache nor seen by a real position): one shape to compile, not three."""
    cfg = llm.config
    names = sorted(LOGIT_PROMPTS)
    ids = [llm.tokenizer.encode(LOGIT_PROMPTS[name]) for name in names]
    lengths = np.asarray([len(i) for i in ids], np.int32)
    tokens = np.zeros((len(ids), lengths.max()), np.int32)
    for row, i in enumerate(ids):
        tokens[row, :len(i)] = i
    got, cache = forward(cfg, llm.params, jnp.asarray(tokens), KVCache.init(cfg, len(ids), tokens.shape[1]),
                         n_new=jnp.asarray(lengths), logits_at=jnp.asarray(lengths - 1)[:, None])
    got, held = np.asarray(got)[:, 0], np.asarray(cache.lengths)
    return {name: (got[row:row + 1], int(held[row])) for row, name in enumerate(names)}


@pytest.mark.parametrize("name", sorted(LOGIT_PROMPTS))
def test_last_position_logits_match_hf(llm, hf_model, last_logits, name):
    ids = llm.tokenizer.encode(LOGIT_PROMPTS[name])
    got, held = last_logits[name]
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[:, -1].numpy()
    assert got.shape == want.shape == (1, llm.config.vocab_size)
    assert relative_error(got, want) < 1e-3
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert held == len(ids)


def test_chat_template_text_encodes_like_chat_mode(llm):
    """Precondition of the batched test: the rendered template encodes to the chat-mode ids."""
    text = llm.tokenizer.apply_chat_template(CHAT_PROMPT)
    assert llm.encode(text) == llm.encode(CHAT_PROMPT, chat=True)
    assert "<|im_start|>" in text and CHAT_PROMPT in text


def _assert_matches_hf(got: list[int], want: list[int], eos: set[int], what: str):
    if want and want[-1] in eos:  # HF stopped at EOS: jaxkv must stop there too, EOS included
        assert got == want, what
    else:
        assert len(want) == NEW_TOKENS, what
        assert got == want, what


@pytest.mark.parametrize("index", range(len(PLAIN_PROMPTS) + 1))
def test_batched_greedy_matches_hf(batched, hf_continuations, prompt_ids, hf_model, llm, index):
    completion = batched[index]
    want = hf_continuations[index]
    _assert_matches_hf(completion.token_ids, want, eos_ids_of(hf_model), f"prompt {index}")
    assert completion.prompt_tokens == len(prompt_ids[index])
    assert completion.finish_reason == ("stop" if want[-1] in eos_ids_of(hf_model) else "length")
    assert completion.text == llm.tokenizer.decode(completion.token_ids)


@pytest.mark.parametrize("index", range(len(PLAIN_PROMPTS) + 1))
def test_alone_equals_batched(llm, batched, hf_continuations, hf_model, index):
    if index < len(PLAIN_PROMPTS):
        alone = llm.generate(PLAIN_PROMPTS[index], max_new_tokens=NEW_TOKENS, temperature=0)
    else:
        alone = llm.generate(CHAT_PROMPT, max_new_tokens=NEW_TOKENS, temperature=0, chat=True)
    assert alone.token_ids == batched[index].token_ids
    assert alone.prompt_tokens == batched[index].prompt_tokens
    _assert_matches_hf(alone.token_ids, hf_continuations[index], eos_ids_of(hf_model), f"prompt {index} alone")


def test_bfloat16_first_tokens_match_hf_fp32(smollm2_checkpoint, hf_model, llm):
    prompt = "The capital of France is"
    bf16 = jaxkv.load(str(smollm2_checkpoint), dtype="bfloat16")
    assert bf16.config.dtype == bf16.config.param_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
    assert bf16.kv_bytes_per_token == llm.kv_bytes_per_token // 2
    got = bf16.generate(prompt, max_new_tokens=4, temperature=0).token_ids
    want = hf_greedy(hf_model, bf16.tokenizer.encode(prompt), max_new_tokens=4)
    assert got == want
