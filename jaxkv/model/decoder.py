"""Llama-family decoder as functional Flax Linen modules.

`Decoder.apply({"params": p}, tokens, cache)` appends `tokens` to each sequence in the
explicit `cache` and returns logits and the new cache. Parameters carry logical axis
names (see `param_logical_axes`), so one rules table can shard them later.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkv.cache.dense import KVCache
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.attention import cached_attention
from jaxkv.model.rope import apply_rope, inverse_frequencies

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
    """Self-attention of one layer; it writes K/V only if it is its own KV source."""

    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, k_all, v_all):
        cfg = self.cfg
        inv_freq = inverse_frequencies(cfg)
        q = _dense(cfg, (cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), "q_proj")(x)
        q = apply_rope(q, positions, inv_freq)
        slot = cfg.kv_slot(self.layer)
        if cfg.kv_sources[self.layer] == self.layer:
            kv_shape, kv_axes = (cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim")
            k = apply_rope(_dense(cfg, kv_shape, kv_axes, "k_proj")(x), positions, inv_freq)
            v = _dense(cfg, kv_shape, kv_axes, "v_proj")(x)
            rows = jnp.arange(x.shape[0])[:, None]
            # Positions past the cache's end (bucket padding) are dropped, never clamped.
            k_all = k_all.at[slot, rows, positions].set(k.astype(k_all.dtype), mode="drop")
            v_all = v_all.at[slot, rows, positions].set(v.astype(v_all.dtype), mode="drop")
        out = cached_attention(q, k_all[slot].astype(q.dtype), v_all[slot].astype(q.dtype), positions)
        out = _dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1))(out)
        return out, k_all, v_all


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
        up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up_proj")(x)
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, k_all, v_all):
        cfg = self.cfg
        h, k_all, v_all = Attention(cfg, self.layer, name="attn")(
            RMSNorm(cfg.norm_eps, cfg.param_dtype, name="attn_norm")(x), positions, k_all, v_all)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.param_dtype, name="mlp_norm")(x))
        return x, k_all, v_all


class Decoder(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, cache: KVCache, n_new=None, all_logits: bool = False):
        """Append tokens [B, T] at each sequence's cache length; n_new [B] counts the real
        (non-padding) tokens per row. Returns float32 logits, [B, T, V] if all_logits else
        [B, 1, V] at each row's last real token, and the cache with lengths advanced by n_new."""
        cfg = self.cfg
        if cfg.has_upward_sources() and not self.is_initializing():  # parameters are well defined
            raise JaxkvError("upward KV sources (a layer reading a later layer's KV) need LCKV's "
                             "iterative forward, which this version does not implement yet")
        B, T = tokens.shape
        n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype), name="embed",
                         embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
        x = embed(tokens)
        k_all, v_all = cache.k, cache.v
        for layer in range(cfg.n_layers):
            x, k_all, v_all = Block(cfg, layer, name=f"layers_{layer}")(x, positions, k_all, v_all)
        x = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x)
        if not all_logits:
            x = x[jnp.arange(B), jnp.maximum(n_new - 1, 0)][:, None, :]
        if cfg.tie_embeddings:
            # E [V, D] @ x^T, not x @ E^T: XLA CPU would otherwise copy E transposed every step.
            logits = jnp.einsum("vd,btd->btv", embed.embedding.astype(x.dtype), x)
        else:
            logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(x)
        return logits.astype(jnp.float32), KVCache(k_all, v_all, cache.lengths + n_new)


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
