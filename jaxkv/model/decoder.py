"""Llama-family decoder as functional Flax Linen modules.

`forward(cfg, params, tokens, kv)` appends `tokens` to the explicit KV state `kv` and returns logits and
the new state. The state is a dense `KVCache` (training, the LCKV parallel forward, the tests' oracle) or a
`PagedKV` (a page pool and one ragged step's metadata: serving); both offer positions, write, attend and
advance, so the layers never ask which. `sequence_logits` is the training forward. `Decoder` is one pass
over the layers; models whose layers read the KV of a later layer (LCKV) need several, which `forward`
runs. Parameters carry logical axis names (see `param_logical_axes`), so one rules table can shard them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxkv.cache.dense import KVCache
from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError
from jaxkv.model.rope import apply_rope, hadamard, inverse_frequencies
from jaxkv.parallel.logical import constrain
from jaxkv.parallel.rules import tree_shardings

_init = nn.initializers.normal(stddev=0.02)


def _dense(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, axis=-1, bias: bool = False):
    n_in = 1 if isinstance(axis, int) else len(axis)
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=bias, name=name,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[n_in:]),
    )


class RMSNorm(nn.Module):
    """Over the last axis, times (offset + scale): Gemma stores w for a factor of 1 + w (offset 1)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        offset = self.cfg.norm_offset
        init = nn.initializers.ones if offset == 0 else nn.initializers.zeros
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],),
                           jnp.dtype(self.cfg.param_dtype))
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return normed.astype(x.dtype) * (offset + scale.astype(jnp.float32)).astype(x.dtype)


class Attention(nn.Module):
    """Self-attention of one layer; it writes K/V only if it is its own KV source.

    A layer below its source reads the source's KV of earlier tokens only: within a pass
    that KV still holds the previous pass's values, which is what LCKV iterates on.
    """

    cfg: ModelConfig
    layer: int
    remat: bool = False

    @nn.compact
    def __call__(self, x, positions, n_new, kv):
        cfg = self.cfg
        inv_freq = inverse_frequencies(cfg, self.layer)
        q = _dense(cfg, (cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), "q_proj", bias=cfg.qkv_bias)(x)
        if cfg.qk_norm:
            q = RMSNorm(cfg, name="q_norm")(q)
        q = apply_rope(q, positions, inv_freq)
        if cfg.query_scale is not None:  # attention scales by head_dim ** -0.5: fold the difference into q
            q = q * jnp.asarray((cfg.head_dim / cfg.query_scale) ** 0.5, q.dtype)
        if cfg.kv_rotate:  # q H (k H)^T = q k^T: the scores stay, the stored keys lose their outlier channels
            q = _rotate(q)
        q = constrain(q, "batch", "seq", "heads")
        kv_layer = cfg.kv_index(self.layer)
        if cfg.kv_sources[self.layer] == self.layer:
            kv_shape, kv_axes = (cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim")
            k = _dense(cfg, kv_shape, kv_axes, "k_proj", bias=cfg.qkv_bias)(x)
            if cfg.qk_norm:
                k = RMSNorm(cfg, name="k_norm")(k)
            k = apply_rope(k, positions, inv_freq)
            if cfg.kv_rotate:
                k = _rotate(k)
            v = _dense(cfg, kv_shape, kv_axes, "v_proj", bias=cfg.qkv_bias)(x)
            kv = kv.write(kv_layer, k, v, positions, n_new)
        out, kv = kv.attend(kv_layer, q, positions, strict=cfg.kv_sources[self.layer] > self.layer,
                            window=cfg.window(self.layer), sinks=cfg.attention_sinks, softcap=cfg.attn_softcap,
                            backend=cfg.attention_backend, remat=self.remat, inv_freq=inv_freq)
        out = _dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "o_proj", axis=(-2, -1), bias=cfg.o_bias)(out)
        return out, kv


def _rotate(x):
    """x [..., head_dim] times the orthonormal Hadamard matrix (`ModelConfig.kv_rotate`), in float32."""
    h = jnp.asarray(hadamard(x.shape[-1]))
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), h).astype(x.dtype)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
        up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "up_proj")(x)
        act = nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), "down_proj")(constrain(act * up, "batch", "seq", "mlp"))


class Block(nn.Module):
    """Pre-norm residual attention then MLP; with sandwich norms (Gemma) each output is normed too. remat
    recomputes the attention probabilities and the MLP in the backward pass instead of storing them; the KV
    itself is never saved per layer."""

    cfg: ModelConfig
    layer: int
    remat: bool = False

    @nn.compact
    def __call__(self, x, positions, n_new, kv):
        cfg = self.cfg
        h, kv = Attention(cfg, self.layer, self.remat, name="attn")(
            RMSNorm(cfg, name="attn_norm")(x), positions, n_new, kv)
        if cfg.sandwich_norms:
            h = RMSNorm(cfg, name="attn_post_norm")(h)
        x = x + h
        mlp = nn.remat(MLP) if self.remat else MLP
        h = mlp(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
        if cfg.sandwich_norms:
            h = RMSNorm(cfg, name="mlp_post_norm")(h)
        return constrain(x + h, "batch", "seq"), kv


class Decoder(nn.Module):
    """The layers (`__call__`) and the head (`logits`), apart: LCKV's iterations run only the layers up to the
    last upward KV source, and a step needs logits only where it samples."""

    cfg: ModelConfig
    remat: bool = False

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype),
                              embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
        self.layers = [Block(cfg, layer, self.remat) for layer in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")

    def __call__(self, tokens, kv, n_new):
        """Hidden states [B, T, D] of tokens [B, T] after every layer, and kv with their K/V written where
        `kv.positions` puts them; n_new [B] counts each row's real tokens (dense KV)."""
        return self.layers_from(self.embed_tokens(tokens), kv.positions(tokens), n_new, kv, 0, self.cfg.n_layers)

    def embed_tokens(self, tokens):
        x = self.embed(tokens)
        if self.cfg.embed_scale:  # Gemma: by sqrt(d_model), rounded to the activations' dtype as HF does
            x = x * jnp.asarray(self.cfg.d_model ** 0.5, x.dtype)
        return constrain(x, "batch", "seq")

    def layers_from(self, x, positions, n_new, kv, start: int, stop: int):
        """Hidden states x [B, T, D] entering layer `start`, through layers [start, stop): LCKV iterates a run."""
        for block in self.layers[start:stop]:
            x, kv = block(x, positions, n_new, kv)
        return x, kv

    def logits(self, x):
        """Float32 logits of hidden states [B, T, D]."""
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            # E [V, D] @ x^T, not x @ E^T: XLA CPU would otherwise copy E transposed every step.
            logits = jnp.einsum("vd,btd->btv", self.embed.embedding.astype(x.dtype), x)
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if self.cfg.final_softcap is not None:
            logits = jnp.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return constrain(logits, "batch", "seq", "vocab")


def forward(cfg: ModelConfig, params, tokens, kv, n_new=None, logits_at=None, passes=None, remat: bool = False):
    """The model on `tokens` [B, T] appended to `kv` (a dense `KVCache`, or a `PagedKV`: a page pool and one
    ragged step's metadata); returns (float32 logits, kv). n_new [B]: each row's real tokens (dense; default T).
    logits_at int [B, R]: the tokens whose logits are wanted ([B, R, V]); default every token ([B, T, V]).

    With upward KV sources (LCKV) this is the parallel forward: the sources' KV of the new tokens starts at
    zeros and passes over the layers that read it (`cfg.upward_segments`) refine it. After k passes the first
    k tokens are exact, so it converges to what token-by-token decoding gives. passes: that number per run
    (a traced value is fine: a chunk of c tokens is exact after c); default `upward_passes_no_grad` passes
    without gradient and `upward_passes_grad` with it (training).
    """
    model = Decoder(cfg, remat=remat)
    B, T = tokens.shape
    n_new = jnp.full((B,), T, jnp.int32) if n_new is None else n_new
    if cfg.streaming_window is not None:
        if not hasattr(kv, "slide_sinks"):
            raise JaxkvError("StreamingLLM (streaming_window) runs on the paged cache: give a page_size")
        kv = kv.slide_sinks(cfg)
    if cfg.has_upward_sources() and T > 1:
        x, kv = _iterated_layers(model, cfg, params, tokens, kv, n_new, passes)
    else:
        x, kv = model.apply({"params": params}, tokens, kv, n_new)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return model.apply({"params": params}, x, method=Decoder.logits), kv.advance(n_new)


def _iterated_layers(model: Decoder, cfg: ModelConfig, params, tokens, kv, n_new, passes):
    """The parallel forward of a model with upward KV sources: each iterated run of `cfg.upward_segments`
    starts its sources' KV of the new tokens at zeros and refines it by passes over the run from the hidden
    state below it (without gradient, then with it); the other runs go once."""
    B, T = tokens.shape
    positions = kv.positions(tokens)
    zeros = jnp.zeros((B, T, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    for kv_layer in (cfg.kv_index(t) for t in cfg.upward_targets):
        kv = kv.write(kv_layer, zeros, zeros, positions, n_new)
    frozen = jax.lax.stop_gradient(params)
    x = model.apply({"params": params}, tokens, method=Decoder.embed_tokens)
    for start, stop, iterated in cfg.upward_segments:
        if iterated:
            def refine(kv, p, x=x, start=start, stop=stop):
                return model.apply({"params": p}, x, positions, n_new, kv, start, stop, method=Decoder.layers_from)[1]

            free = cfg.upward_passes_no_grad if passes is None else passes - 1
            x_free = jax.lax.stop_gradient(x)
            kv, resume = kv.without_votes()  # eviction's votes count the last pass only: the run as it is
            kv = jax.lax.fori_loop(0, free, lambda _, kv, x_free=x_free: refine(kv, frozen, x_free),
                                   jax.tree.map(jax.lax.stop_gradient, kv))
            for _ in range(cfg.upward_passes_grad - 1 if passes is None else 0):
                kv = refine(kv, params)
            kv = resume(kv)
        x, kv = model.apply({"params": params}, x, positions, n_new, kv, start, stop, method=Decoder.layers_from)
    return x, kv


def sequence_logits(cfg: ModelConfig, params, tokens, remat: bool = False) -> jax.Array:
    """Float32 logits [B, T, V] of every position: the causal forward that training differentiates."""
    return forward(cfg, params, tokens, KVCache.init(cfg, tokens.shape[0], tokens.shape[1]), remat=remat)[0]


def _init_variables(cfg: ModelConfig, rng: jax.Array) -> dict:
    def everything(model, tokens, kv):
        return model.logits(model(tokens, kv, jnp.ones((1,), jnp.int32))[0])
    return Decoder(cfg).init(rng, jnp.zeros((1, 1), jnp.int32), KVCache.init(cfg, 1, 1), method=everything)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (a plain pytree of arrays) for a config."""
    return nn.unbox(_init_variables(cfg, rng)["params"])


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, computed without allocating."""
    return nn.unbox(_abstract_boxed(cfg))


def param_logical_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a pytree of PartitionSpecs."""
    return nn.get_partition_spec(_abstract_boxed(cfg))


def param_shardings(cfg: ModelConfig, mesh):
    """NamedShardings for the parameter tree of `cfg` from its logical axes and abstract shapes (nothing is
    allocated): the one rules table decides."""
    return tree_shardings(param_logical_axes(cfg), abstract_params(cfg), mesh)


def shard_params(params, cfg: ModelConfig, mesh):
    """`params` placed on the mesh as `param_shardings` says (each device receives only its shards)."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def _abstract_boxed(cfg: ModelConfig) -> dict:
    return jax.eval_shape(functools.partial(_init_variables, cfg), jax.random.PRNGKey(0))["params"]
