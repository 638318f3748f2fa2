"""Llama-family decoder as functional Flax Linen modules.

`forward(cfg, params, tokens, cache)` appends `tokens` to each sequence in the explicit
`cache` (dense `KVCache` or `PagedKVCache`: both write and read K/V by slot) and returns
logits and the new cache; `sequence_logits` is the training forward.
`Decoder` is one pass over the layers; models whose layers read the KV of a later layer
(LCKV) need several, which `forward` runs. Parameters carry logical axis names (see
`param_logical_axes`), so one rules table can shard them later.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkv.cache.dense import KVCache
from jaxkv.cache.paged import PagedKVCache
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.attention import cached_attention
from jaxkv.model.rope import apply_rope, inverse_frequencies
from jaxkv.parallel.rules import constrain
from pallas_kernels import paged_attention

_init = nn.initializers.normal(stddev=0.02)


def _dense(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, axis=-1) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=False, name=name,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(_init, axes),
    )


class RMSNorm(nn.Module):
    eps: float
    param_dtype: str

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.dtype(self.param_dtype))
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


class Attention(nn.Module):
    """Self-attention of one layer; it writes K/V only if it is its own KV source.

    A layer below its source reads the source's KV of earlier tokens only: within a pass
    that KV still holds the previous pass's values, which is what LCKV iterates on.
    """

    cfg: ModelConfig
    layer: int
    remat: bool = False

    @nn.compact
    def __call__(self, x, positions, n_new, cache):
        cfg = self.cfg
        inv_freq = inverse_frequencies(cfg)
        q = _dense(cfg, (cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), "q_proj")(x)
        q = constrain(apply_rope(q, positions, inv_freq), "batch", "seq", "heads")
        slot = cfg.kv_slot(self.layer)
        if cfg.kv_sources[self.layer] == self.layer:
            kv_shape, kv_axes = (cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim")
            k = apply_rope(_dense(cfg, kv_shape, kv_axes, "k_proj")(x), positions, inv_freq)
            v = _dense(cfg, kv_shape, kv_axes, "v_proj")(x)
            cache = cache.write(slot, k, v, positions, n_new)
        strict, window, sinks = cfg.kv_sources[self.layer] > self.layer, cfg.window(self.layer), cfg.attention_sinks
        if isinstance(cache, PagedKVCache) and q.shape[1] == 1:
            out = paged_attention(  # decode: the kernel reads only the pages it needs
                # an upward source (strict) is read up to the previous token: one position less, in the window too
                q[:, 0], cache.k_pages[slot], cache.v_pages[slot], cache.block_tables,
                positions[:, 0] + (0 if strict else 1), sinks=sinks, window=None if window is None else window - strict,
                backend=cfg.attention_backend,
                k_scales=None if cache.k_scales is None else cache.k_scales[slot],
                v_scales=None if cache.v_scales is None else cache.v_scales[slot])[:, None]
        else:
            attend = functools.partial(cached_attention, strict=strict, window=window, sinks=sinks)
            attend = jax.checkpoint(attend) if self.remat else attend
            # every query block sees every key: with a "seq" axis this is the all-gather of K/V per layer
            k_src, v_src = (constrain(a.astype(q.dtype), "batch", None, "kv_heads") for a in cache.read(slot))
            out = attend(q, k_src, v_src, positions)
        out = _dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1))(out)
        return out, cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
        up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up_proj")(x)
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), "down_proj")(
            constrain(nn.silu(gate) * up, "batch", "seq", "mlp"))


class Block(nn.Module):
    """remat recomputes the attention probabilities and the MLP in the backward pass instead
    of storing them; the cache itself is never saved per layer."""

    cfg: ModelConfig
    layer: int
    remat: bool = False

    @nn.compact
    def __call__(self, x, positions, n_new, cache):
        cfg = self.cfg
        h, cache = Attention(cfg, self.layer, self.remat, name="attn")(
            RMSNorm(cfg.norm_eps, cfg.param_dtype, name="attn_norm")(x), positions, n_new, cache)
        x = x + h
        mlp = nn.remat(MLP) if self.remat else MLP
        x = x + mlp(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.param_dtype, name="mlp_norm")(x))
        return constrain(x, "batch", "seq"), cache


class Decoder(nn.Module):
    cfg: ModelConfig
    remat: bool = False

    @nn.compact
    def __call__(self, tokens, cache: KVCache, n_new=None, all_logits: bool = False, kv_only: bool = False,
                 single_pass: bool = False):
        """One pass: append tokens [B, T] at each sequence's cache length; n_new [B] counts the
        real (non-padding) tokens per row. Returns float32 logits, [B, T, V] if all_logits else
        [B, 1, V] at each row's last real token, and the cache with lengths advanced by n_new.
        kv_only: run the layers up to the last upward KV source and return just the cache with
        its KV refreshed (lengths unchanged): one iteration of LCKV's parallel forward."""
        cfg = self.cfg
        B, T = tokens.shape
        if cfg.has_upward_sources() and T > 1 and not (kv_only or single_pass or self.is_initializing()):
            raise JaxkvError("this model has layers that read a later layer's KV: run several tokens "
                             "through jaxkv.model.decoder.forward, which iterates to LCKV's fixed point")
        n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        if cfg.streaming_window is not None and not self.is_initializing():
            cache = _slide_sinks(cfg, cache, n_new)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype), name="embed",
                         embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
        x = constrain(embed(tokens), "batch", "seq")
        n_run = cfg.upward_targets[-1] + 1 if kv_only else cfg.n_layers
        for layer in range(n_run):
            x, cache = Block(cfg, layer, self.remat, name=f"layers_{layer}")(x, positions, n_new, cache)
        if kv_only:
            return cache
        x = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x)
        if not all_logits:
            x = x[jnp.arange(B), jnp.maximum(n_new - 1, 0)][:, None, :]
        if cfg.tie_embeddings:
            # E [V, D] @ x^T, not x @ E^T: XLA CPU would otherwise copy E transposed every step.
            logits = jnp.einsum("vd,btd->btv", embed.embedding.astype(x.dtype), x)
        else:
            logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(x)
        logits = constrain(logits.astype(jnp.float32), "batch", "seq", "vocab")
        return logits, cache.replace(lengths=cache.lengths + n_new)


def _slide_sinks(cfg: ModelConfig, cache, n_new):
    """StreamingLLM's positions in the cache: once tokens between the sinks and the window are gone,
    the sinks must sit right before the window, so their keys are rotated on by the number evicted.
    Window keys keep their own rotation: a query's distance to them is the same either way."""
    if not isinstance(cache, PagedKVCache):
        raise JaxkvError("StreamingLLM (streaming_window) runs on the paged cache: give a page_size")
    sinks = cache.sinks
    if not sinks:
        return cache
    B = n_new.shape[0]
    evicted = jnp.maximum(cache.lengths + n_new - cfg.streaming_window - sinks, 0)  # [B], after these tokens
    where = jnp.broadcast_to(jnp.arange(sinks, dtype=jnp.int32), (B, sinks))
    inv_freq = inverse_frequencies(cfg)
    for slot in range(cfg.n_kv_layers):
        rotated = apply_rope(cache.sink_keys[slot], jnp.broadcast_to(evicted[:, None], (B, sinks)), inv_freq)
        cache = cache.put(slot, where, jnp.where(n_new > 0, sinks, 0), k=rotated)  # idle rows write nothing
    return cache


def forward(cfg: ModelConfig, params, tokens, cache: KVCache, n_new=None, all_logits: bool = False,
            remat: bool = False):
    """The model on `tokens` [B, T] appended to `cache`: (float32 logits, new cache), as `Decoder`.

    With upward KV sources and T > 1 this is LCKV's parallel forward: the sources' KV of
    the new tokens starts at zeros, `upward_passes_no_grad` passes refine it without
    gradient (and without building a backward pass), `upward_passes_grad - 1` more with
    gradient, and a last pass writes the cache and gives logits. After k passes the first
    k tokens are exact, so it converges to what token-by-token decoding gives.
    """
    model = Decoder(cfg, remat=remat)
    B, T = tokens.shape
    if cfg.has_upward_sources() and T > 1:
        n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        zeros = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
        for slot in (cfg.kv_slot(t) for t in cfg.upward_targets):
            cache = cache.write(slot, zeros, zeros, positions, n_new)
        cache = jax.tree.map(jax.lax.stop_gradient, cache)
        frozen = jax.lax.stop_gradient(params)
        cache = jax.lax.fori_loop(
            0, cfg.upward_passes_no_grad,
            lambda _, c: model.apply({"params": frozen}, tokens, c, n_new, kv_only=True), cache)
        for _ in range(cfg.upward_passes_grad - 1):
            cache = model.apply({"params": params}, tokens, cache, n_new, kv_only=True)
    return model.apply({"params": params}, tokens, cache, n_new, all_logits, single_pass=True)


def sequence_logits(cfg: ModelConfig, params, tokens, remat: bool = False) -> jax.Array:
    """Float32 logits [B, T, V] of every position: the causal forward that training differentiates."""
    cache = KVCache.init(cfg, tokens.shape[0], tokens.shape[1])
    return forward(cfg, params, tokens, cache, all_logits=True, remat=remat)[0]


def _init_variables(cfg: ModelConfig, rng: jax.Array) -> dict:
    return Decoder(cfg).init(rng, jnp.zeros((1, 1), jnp.int32), KVCache.init(cfg, 1, 1))


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (a plain pytree of arrays) for a config."""
    return nn.unbox(_init_variables(cfg, rng)["params"])


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, computed without allocating."""
    return nn.unbox(_abstract_boxed(cfg))


def param_logical_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    return nn.get_partition_spec(_abstract_boxed(cfg))


def _abstract_boxed(cfg: ModelConfig) -> dict:
    return jax.eval_shape(functools.partial(_init_variables, cfg), jax.random.PRNGKey(0))["params"]
