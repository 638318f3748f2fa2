"""The decoder against HF transformers on the same weights (tiny random Llamas written by HF)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import relative_error, write_tiny_hf_llama
from jaxkv.cache.dense import KVCache
from jaxkv.checkpoints.hf import HFCheckpoint
from jaxkv.checkpoints.store import assemble_params
from jaxkv.model.decoder import forward

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "gqa-untied": dict(tie=False, n_kv_heads=2),
    "gqa-tied": dict(tie=True, n_kv_heads=2),
    "mqa-llama3-rope": dict(tie=False, n_kv_heads=1, rope_parameters=LLAMA3_ROPE),
    "mha": dict(tie=True, n_kv_heads=4),
}


def _load_both(tmp_path, **kw):
    hf_model = write_tiny_hf_llama(tmp_path, **kw)
    source = HFCheckpoint(tmp_path)
    cfg = source.model_config()
    params = jax.tree.map(jnp.asarray, assemble_params(cfg, source, "float32"))
    return hf_model, cfg, params


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf_model, cfg, params = _load_both(tmp_path, **CASES[case])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40))
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got, _ = forward(cfg, params, jnp.asarray(tokens), KVCache.init(cfg, 2, 64))
    assert relative_error(got, want) < 1e-4


def test_config_read_from_hf(tmp_path):
    hf_model, cfg, _ = _load_both(tmp_path, tie=False, n_kv_heads=1, rope_parameters=LLAMA3_ROPE)
    c = hf_model.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_dim, cfg.vocab_size) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0 and not cfg.tie_embeddings


def test_incremental_decode_equals_full_forward(tmp_path):
    """Prefill a prefix, then feed tokens one at a time: logits equal one full forward."""
    _, cfg, params = _load_both(tmp_path, tie=False, n_kv_heads=2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 24)))
    full, _ = forward(cfg, params, tokens, KVCache.init(cfg, 2, 32))
    step_logits, cache = forward(cfg, params, tokens[:, :10], KVCache.init(cfg, 2, 32))
    steps = [step_logits]
    for t in range(10, 24):
        logits, cache = forward(cfg, params, tokens[:, t:t + 1], cache)
        steps.append(logits)
    assert relative_error(jnp.concatenate(steps, axis=1), full) < 1e-5
    assert list(np.asarray(cache.lengths)) == [24, 24]
