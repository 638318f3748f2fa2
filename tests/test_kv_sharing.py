"""Cross-layer KV sharing in the decoder: every map, LCKV's iterative forward, sliding windows."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import relative_error
from jaxkv.api import LLM
from jaxkv.cache.dense import KVCache, kv_bytes_per_token
from jaxkv.checkpoints.hf_layout import hf_to_param
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.generate.sampling import SamplingParams
from jaxkv.model.attention import cached_attention
from jaxkv.model.decoder import Decoder, forward, init_params, sequence_logits
from jaxkv.model.uptrain import share_kv
from jaxkv.plan import parameter_count
from jaxkv.sharing import PARTITIONS, TARGETS, cla, lckv, systematic, to_string, yoco

NINE = list(itertools.product(PARTITIONS, TARGETS))


def _tiny(sources, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=len(sources), n_heads=4, n_kv_heads=2, head_dim=8,
                       mlp_dim=64, kv_sources=sources, **kw)


def _tokens(batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=(batch, length)))


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(cfg, params, tokens, cache):
    return forward(cfg, params, tokens, cache)


def _token_by_token(cfg, params, tokens, cache_len):
    cache, steps = KVCache.init(cfg, tokens.shape[0], cache_len), []
    for t in range(tokens.shape[1]):
        logits, cache = _forward(cfg, params, tokens[:, t:t + 1], cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


# --- the maps -----------------------------------------------------------------------------
def test_nine_configurations_include_the_published_ones():
    assert systematic(22, 3, "sandwich", "top") == lckv(22, 2)  # LCKV = sandwich-top
    assert systematic(22, 12, "pizza", "bottom") == yoco(22)  # YOCO = pizza-bottom
    assert to_string(systematic(7, 4, "lasagna", "bottom")) == "0_1_1_3_3_5_5"  # CLA-like groups
    assert to_string(systematic(7, 4, "lasagna", "top")) == "0_2_2_4_4_6_6"
    assert to_string(systematic(8, 3, "pizza", "middle")) == "0_1_4_4_4_4_4_4"
    assert to_string(systematic(8, 4, "sandwich", "middle")) == "0_1_4_4_4_4_4_7"


@settings(deadline=None, max_examples=60)
@given(st.integers(2, 40), st.data())
def test_every_configuration_has_the_asked_kv_layers(n_layers, data):
    n_kv = data.draw(st.integers(2, n_layers))
    partition, target = data.draw(st.sampled_from(NINE))
    sources = systematic(n_layers, n_kv, partition, target)
    cfg = _tiny(sources)  # validates: every source is a KV layer
    assert cfg.n_kv_layers == n_kv and sources[0] == 0
    if target == "bottom":
        assert not cfg.has_upward_sources()
    if target == "top" and n_kv < n_layers:  # some group has two or more layers
        assert cfg.has_upward_sources()


# --- cache and parameters follow the map -------------------------------------------------
@pytest.mark.parametrize("partition, target", NINE)
def test_cache_and_parameters_follow_the_map(partition, target):
    cfg = _tiny(systematic(6, 3, partition, target))
    params = init_params(cfg, jax.random.PRNGKey(0))
    owners = [i for i in range(6) if "k_proj" in params[f"layers_{i}"]["attn"]]
    assert tuple(owners) == cfg.kv_layers
    assert KVCache.init(cfg, 2, 16).k.shape == (3, 2, 16, 2, 8)
    assert kv_bytes_per_token(cfg) == 2 * 3 * 2 * 8 * 4  # K and V x 3 KV layers x 2 heads x 8 dims x fp32
    standard = _tiny(tuple(range(6)))
    assert parameter_count(standard) - parameter_count(cfg) == 3 * 2 * 32 * 2 * 8  # 3 layers lose K, V


# --- LCKV's iterative forward ------------------------------------------------------------
@pytest.mark.parametrize("partition, target", NINE)
def test_token_by_token_equals_the_converged_parallel_forward(partition, target):
    """After k passes the first k tokens are exact: with passes >= length both agree to float error."""
    cfg = _tiny(systematic(6, 3, partition, target), upward_passes_no_grad=10, upward_passes_grad=2)
    params = init_params(cfg, jax.random.PRNGKey(1))
    tokens = _tokens(2, 12)
    parallel, _ = _forward(cfg, params, tokens, KVCache.init(cfg, 2, 16))
    stepwise = _token_by_token(cfg, params, tokens, 16)
    assert relative_error(parallel, stepwise) < 1e-5
    if cfg.has_upward_sources():  # too few passes have not converged: the iteration is what makes it right
        few = cfg.replace(upward_passes_no_grad=0, upward_passes_grad=2)
        assert relative_error(_forward(few, params, tokens, KVCache.init(cfg, 2, 16))[0], stepwise) > 1e-3


def test_first_token_of_an_upward_layer_attends_to_nothing():
    """The diagonal is masked: token 0 gets a zero output, token 1 sees only token 0."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 4))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 1, 4))
    v = jax.random.normal(jax.random.PRNGKey(2), (1, 3, 1, 4))
    out = cached_attention(q, k, v, jnp.arange(3)[None], strict=True)
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_allclose(out[0, 1], np.broadcast_to(v[0, 0], (2, 4)), rtol=1e-6)


def test_prefill_then_decode_equals_the_parallel_forward_of_the_whole_text():
    cfg = _tiny(lckv(6, 2), upward_passes_no_grad=14, upward_passes_grad=2)
    params = init_params(cfg, jax.random.PRNGKey(2))
    tokens = _tokens(2, 14, seed=3)
    whole, _ = _forward(cfg, params, tokens, KVCache.init(cfg, 2, 16))
    _, cache = _forward(cfg, params, tokens[:, :10], KVCache.init(cfg, 2, 16))
    for t in range(10, 14):
        logits, cache = _forward(cfg, params, tokens[:, t:t + 1], cache)
        assert relative_error(logits[:, 0], whole[:, t]) < 1e-5


def test_default_passes_converge_on_a_trained_like_model_to_a_stated_tolerance():
    """With the defaults (m=7, b=2) a 32-token text is within 2% of the fixed point even for a
    random model; the error shrinks as m grows (the method's premise)."""
    params_cfg = _tiny(lckv(6, 2))
    params = init_params(params_cfg, jax.random.PRNGKey(4))
    tokens = _tokens(1, 32, seed=5)
    truth = _token_by_token(params_cfg, params, tokens, 32)
    errors = [relative_error(_forward(params_cfg.replace(upward_passes_no_grad=m), params, tokens,
                                      KVCache.init(params_cfg, 1, 32))[0], truth) for m in (0, 3, 7, 31)]
    assert errors[2] < 2e-2 and errors[3] < 1e-5
    assert errors[0] > errors[1] > errors[2] > errors[3]


# --- gradients -----------------------------------------------------------------------------
def _loss(cfg, params, tokens):
    return _nll(sequence_logits(cfg, params, tokens[:, :-1]), tokens)


def _nll(logits, tokens):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def _grad(cfg, params, tokens):
    return jax.jit(jax.grad(functools.partial(_loss, cfg)))(params, tokens)


def test_gradient_reaches_the_kv_layer_through_its_readers_only_with_b_at_least_2():
    cfg = _tiny(lckv(4, 2), upward_passes_no_grad=3)
    params = init_params(cfg, jax.random.PRNGKey(6))
    tokens = _tokens(2, 9, seed=7)
    target = f"layers_{cfg.upward_targets[0]}"
    g1 = _grad(cfg.replace(upward_passes_grad=1), params, tokens)[target]["attn"]["k_proj"]["kernel"]
    g2 = _grad(cfg.replace(upward_passes_grad=2), params, tokens)[target]["attn"]["k_proj"]["kernel"]

    # b=1: the readers see constant KV, so the KV layer learns only from its own attention.
    def own_only(p):
        cache = jax.tree.map(jax.lax.stop_gradient, _kv_after(cfg, p, tokens[:, :-1], cfg.upward_passes_no_grad))
        return _pass_loss(cfg, p, tokens, cache)

    g_own = jax.grad(own_only)(params)[target]["attn"]["k_proj"]["kernel"]
    assert relative_error(g1, g_own) < 1e-5
    assert relative_error(g2, g1) > 1e-2  # b=2: the readers' gradient reaches the KV layer too


def _pass_loss(cfg, params, tokens, cache):
    """The loss of one last pass over `cache` (the iteration's final, cache-writing pass)."""
    model, inputs = Decoder(cfg), tokens[:, :-1]
    hidden, _ = model.apply({"params": params}, inputs, cache, jnp.full(inputs.shape[:1], inputs.shape[1]))
    return _nll(model.apply({"params": params}, hidden, method=Decoder.logits), tokens)


def _kv_after(cfg, params, tokens, passes):
    """The cache after `passes` kv-only passes from zeros, computed without any gradient."""
    cache = KVCache.init(cfg, tokens.shape[0], tokens.shape[1])
    for _ in range(passes):
        cache = _refine(cfg, params, tokens, cache)
    return cache


def _refine(cfg, params, tokens, cache):
    """One pass of the layers up to the last upward KV source: the sources' KV of `tokens` refreshed."""
    n_new, model = jnp.full(tokens.shape[:1], tokens.shape[1]), Decoder(cfg)
    x = model.apply({"params": params}, tokens, method=Decoder.embed_tokens)
    return model.apply({"params": params}, x, cache.positions(tokens), n_new, cache, 0, cfg.upward_targets[-1] + 1,
                       method=Decoder.layers_from)[1]


def test_no_gradient_flows_through_the_no_grad_passes():
    """grad with (m, b) equals grad of the b passes started from the m passes' KV held constant."""
    cfg = _tiny(lckv(4, 2), upward_passes_no_grad=4, upward_passes_grad=2)
    params = init_params(cfg, jax.random.PRNGKey(8))
    tokens = _tokens(2, 9, seed=9)
    got = _grad(cfg, params, tokens)
    start = jax.tree.map(jax.lax.stop_gradient, _kv_after(cfg, params, tokens[:, :-1], 4))

    def from_start(p):
        return _pass_loss(cfg, p, tokens, _refine(cfg, p, tokens[:, :-1], start))

    want = jax.grad(from_start)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert relative_error(a, b) < 1e-5


# --- sliding windows ----------------------------------------------------------------------
def test_sliding_window_matches_transformers_mistral():
    """Mistral is Llama with a sliding window: same weights, same logits."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=5, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
        attn_implementation="eager")).eval()
    cfg = _tiny((0, 1), window_layers=(0, 1), sliding_window=5)
    params = jax.tree.map(np.zeros_like, init_params(cfg, jax.random.PRNGKey(0)))
    for name, w in hf.state_dict().items():
        placed = hf_to_param(name, w.numpy(), cfg)
        if placed:
            path, value = placed
            node = params
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
    tokens = _tokens(2, 16, seed=10)
    with torch.no_grad():
        want = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
    got, _ = _forward(cfg, params, tokens, KVCache.init(cfg, 2, 16))
    assert relative_error(got, want) < 1e-4
    unwindowed, _ = _forward(cfg.replace(window_layers=()), params, tokens, KVCache.init(cfg, 2, 16))
    assert relative_error(unwindowed, want) > 1e-3


def test_windowed_sharing_decodes_like_its_parallel_forward():
    cfg = _tiny(systematic(6, 3, "sandwich", "middle"), window_layers=(0, 1, 5), sliding_window=4,
                upward_passes_no_grad=12)
    params = init_params(cfg, jax.random.PRNGKey(11))
    tokens = _tokens(2, 12, seed=12)
    parallel, _ = _forward(cfg, params, tokens, KVCache.init(cfg, 2, 16))
    assert relative_error(parallel, _token_by_token(cfg, params, tokens, 16)) < 1e-5


# --- uptraining -----------------------------------------------------------------------------
def test_uptraining_averages_the_projections_of_sharing_layers():
    base = _tiny(tuple(range(4)))
    params = init_params(base, jax.random.PRNGKey(13))
    cfg, shared = share_kv(base, params, cla(4, 2))
    assert cfg.kv_layers == (0, 2)
    for kv_layer, readers in ((0, (0, 1)), (2, (2, 3))):
        for proj in ("k_proj", "v_proj"):
            want = np.mean([params[f"layers_{i}"]["attn"][proj]["kernel"] for i in readers], axis=0)
            np.testing.assert_allclose(shared[f"layers_{kv_layer}"]["attn"][proj]["kernel"], want, rtol=1e-6)
    assert "k_proj" not in shared["layers_1"]["attn"] and "k_proj" in params["layers_1"]["attn"]
    np.testing.assert_array_equal(shared["layers_1"]["mlp"]["up_proj"]["kernel"], params["layers_1"]["mlp"]["up_proj"]["kernel"])
    # From a model that already shares: each reader brings the projection it used before.
    lckv_cfg, again = share_kv(cfg, shared, lckv(4, 2))
    k = {i: shared[f"layers_{i}"]["attn"]["k_proj"]["kernel"] for i in (0, 2)}
    np.testing.assert_allclose(again["layers_2"]["attn"]["k_proj"]["kernel"], (k[0] + k[2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(again["layers_3"]["attn"]["k_proj"]["kernel"], k[2], rtol=1e-6)
    logits, _ = _forward(lckv_cfg, again, _tokens(1, 8), KVCache.init(lckv_cfg, 1, 8))
    assert np.isfinite(np.asarray(logits)).all()


def test_generate_serves_an_lckv_model_like_token_by_token_greedy(byte_tokenizer):
    """Chunked iterative prefill and multi-token decode calls give the greedy continuation of exact decoding."""
    cfg = _tiny(lckv(6, 2), upward_passes_no_grad=16, max_seq_len=64)
    params = init_params(cfg, jax.random.PRNGKey(14))
    prompt = [int(t) for t in _tokens(1, 11, seed=15)[0]]
    got = LLM(cfg, byte_tokenizer, params).generate_ids([prompt], 6, SamplingParams())[0].token_ids
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(jnp.argmax(_token_by_token(cfg, params, jnp.asarray([ids]), 32)[0, -1])))
    assert got == ids[len(prompt):]


# --- shipped configs ------------------------------------------------------------------------
def _committed_sharing_configs():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_sharing_configs", root / "scripts" / "make_sharing_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sharing_maps, sorted((root / "configs" / "kv_sharing").glob("*/*.yaml"))


def test_shipped_sharing_configs_round_trip_to_their_constructors():
    from jaxkv.sharing import from_string, parse_spec

    sharing_maps, files = _committed_sharing_configs()
    assert {f.parent.name for f in files} >= {"tiny", "smollm2-135m"} and len(files) >= 26
    for path in files:
        cfg = ModelConfig.load(path)
        spec, sources = sharing_maps(cfg.n_layers)[path.stem]
        assert cfg.kv_sources == sources == parse_spec(spec, cfg.n_layers).sources, path
        assert from_string(to_string(cfg.kv_sources)).sources == cfg.kv_sources


def test_kv_sources_strings_in_config_files(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model: {vocab_size: 8, d_model: 8, n_layers: 4, n_heads: 1, n_kv_heads: 1, head_dim: 8,\n"
                    "        mlp_dim: 8, kv_sources: '0s_0s_2_2', sliding_window: 16}\n")
    cfg = ModelConfig.load(path)
    assert cfg.kv_sources == (0, 0, 2, 2) and cfg.window_layers == (0, 1)
    path.write_text(path.read_text().replace("'0s_0s_2_2'", "0_0_2_2"))  # YAML reads this as an integer
    with pytest.raises(JaxkvError, match="quote it"):
        ModelConfig.load(path)
