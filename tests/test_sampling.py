"""Sampling filters against HF transformers' logits warpers, and the draws against their distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from jaxkv.errors import InvalidRequest
from jaxkv.generate.sampling import MIN_TOP_P, SamplingParams, filter_logits, sample


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 10, 0.8), (1.0, 1, 1.0), (2.0, 50, 0.3), (1.0, 3, 0.05),
])
def test_filter_matches_hf_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(logits))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = scores.numpy()
    b = logits.shape[0]
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.full((b,), temperature), jnp.full((b,), top_k),
                                   jnp.full((b,), top_p)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)


def test_draws_follow_filtered_distribution():
    """Empirical frequencies of 20k draws match softmax(filtered logits) (chi-square bound)."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    n = 20_000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    args = dict(temperature=jnp.full((n,), 0.8), top_k=jnp.full((n,), 4), top_p=jnp.full((n,), 1.0))
    draws = np.asarray(sample(jnp.repeat(logits, n, axis=0), keys, greedy=False, **args))
    probs = np.asarray(jax.nn.softmax(filter_logits(logits, jnp.array([0.8]), jnp.array([4]), jnp.array([1.0]))))[0]
    counts = np.bincount(draws, minlength=6)
    assert counts[4:].sum() == 0  # outside top-4: never drawn
    expected = probs[:4] * n
    chi2 = float((((counts[:4] - expected) ** 2) / expected).sum())
    assert chi2 < 16.3  # 99.9% quantile of chi-square with 3 degrees of freedom


def test_zero_temperature_rows_are_greedy_in_a_sampling_batch():
    logits = jax.random.normal(jax.random.PRNGKey(1), (3, 40))
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    out = sample(logits, keys, jnp.array([0.0, 1.0, 0.0]), jnp.zeros(3, jnp.int32), jnp.ones(3), greedy=False)
    argmax = np.asarray(jnp.argmax(logits, -1))
    assert out[0] == argmax[0] and out[2] == argmax[2]


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(seed=1.5), "seed"),
    (dict(seed=-1), "seed"), (dict(seed=2**32), "seed"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=1e308), "temperature"),
    (dict(temperature=True), "temperature"), (dict(top_k=2**31), "top_k"), (dict(top_p=1e-50), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_invalid_sampling_values(bad, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        SamplingParams(**bad)
    assert e.value.param == message  # the field at fault, as the HTTP API names it


def test_the_most_likely_token_survives_the_smallest_top_p():
    """top_p at its documented minimum keeps exactly the top token, and so does the filter given a top_p that
    rounds to 0 in float32 (it never masks everything)."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (2, 50))
    for p in (SamplingParams(top_p=MIN_TOP_P).top_p, 1e-50):
        top_p = jnp.full(2, p, jnp.float32)
        filtered = np.asarray(filter_logits(logits, jnp.ones(2), jnp.zeros(2, jnp.int32), top_p))
        assert (np.isfinite(filtered).sum(-1) == 1).all(), p
        assert (filtered.argmax(-1) == np.asarray(logits).argmax(-1)).all(), p
