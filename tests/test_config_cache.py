"""ModelConfig round trips and validation; cache storage follows the KV-producing layers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxkv.cache.dense import KVCache, kv_bytes_per_token
from jaxkv.checkpoints.registry import preset, preset_files
from jaxkv.config import ModelConfig, RopeScaling
from jaxkv.errors import JaxkvError
from jaxkv.model.decoder import init_params, param_logical_axes

TINY = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    cfg = ModelConfig(**TINY, rope_scaling=RopeScaling(factor=4.0), kv_sources=(0, 0, 2, 2),
                      dtype="bfloat16", tie_embeddings=True, name="tiny")
    cfg.save(tmp_path / f"cfg{suffix}")
    assert ModelConfig.load(tmp_path / f"cfg{suffix}") == cfg


@pytest.mark.parametrize("bad, message", [
    (dict(kv_sources=(0, 1, 2)), "3 entries for 4 layers"),
    (dict(kv_sources=(0, 0, 1, 3)), "does not produce KV"),
    (dict(kv_sources=(0, 5, 2, 3)), "not a layer index"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(dtype="float64"), "dtype"),
    (dict(d_model=0), "positive"),
])
def test_invalid_configs(bad, message):
    with pytest.raises(JaxkvError, match=message):
        ModelConfig(**{**TINY, **bad})


def test_unknown_field_rejected():
    with pytest.raises(JaxkvError, match="unknown ModelConfig fields: colour"):
        ModelConfig.from_dict({**TINY, "colour": "red"})


def test_presets_load():
    assert {"smollm2-135m", "tinyllama-1.1b", "llama-2-7b", "llama-3-8b"} <= set(preset_files())
    llama2, weights = preset("llama-2-7b")
    assert weights is None
    # methods.md: Llama-2-7B at fp16 holds 524,288 B of KV per token, 2 GiB at 4096 tokens.
    assert kv_bytes_per_token(llama2) == 524_288
    assert kv_bytes_per_token(llama2) * 4096 == 2 * 1024**3


@pytest.mark.parametrize("kv_sources", [None, (0, 0, 2, 2), (0, 0, 0, 0)])
def test_cache_bytes_follow_kv_layers(kv_sources):
    cfg = ModelConfig(**TINY, kv_sources=kv_sources)
    n_kv = len(set(cfg.kv_sources))
    assert kv_bytes_per_token(cfg) == 2 * n_kv * 2 * 8 * 4
    cache = KVCache.init(cfg, batch=3, max_len=16)
    assert cache.k.shape == (n_kv, 3, 16, 2, 8)
    assert cache.kv_nbytes == kv_bytes_per_token(cfg) * 3 * 16
    assert KVCache.init(cfg, 3, 16, "bfloat16").kv_nbytes == kv_bytes_per_token(cfg, "bfloat16") * 3 * 16


def test_only_kv_layers_own_kv_projections():
    cfg = ModelConfig(**TINY, kv_sources=(0, 0, 2, 2))
    params = init_params(cfg, jax.random.PRNGKey(0))
    owners = [i for i in range(4) if "k_proj" in params[f"layers_{i}"]["attn"]]
    assert owners == [0, 2]
    assert all(("v_proj" in params[f"layers_{i}"]["attn"]) == (i in owners) for i in range(4))
    full = init_params(ModelConfig(**TINY), jax.random.PRNGKey(0))
    n = lambda p: sum(np.size(x) for x in jax.tree.leaves(p))  # noqa: E731
    assert n(full) - n(params) == 2 * 2 * (32 * 2 * 8)  # two layers x (K and V) x [d_model, kv_heads, head_dim]


def test_params_carry_logical_axes():
    axes = param_logical_axes(ModelConfig(**TINY))
    assert tuple(axes["layers_0"]["attn"]["q_proj"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(axes["layers_0"]["attn"]["k_proj"]["kernel"]) == ("embed", "kv_heads", "head_dim")
    assert tuple(axes["layers_0"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["embed"]["embedding"]) == ("vocab", "embed")


def test_cli_offers_exactly_the_config_dtypes():
    from jaxkv.cli import _DTYPES
    from jaxkv.config import DTYPES

    assert _DTYPES == DTYPES
