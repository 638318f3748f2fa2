"""Map HF tensor names and layouts (Llama, Mistral, Qwen2/3, Gemma 2/3) onto jaxkv's parameter tree and back.

Every checkpoint format (HF safetensors, GGUF) is first read as HF-named tensors in PyTorch's [out, in]
layout; this one table then places them, and export (`params_to_hf`) reads it backwards, so the formats
and the two directions cannot drift apart.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator

import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


@functools.lru_cache(maxsize=8)
def _table(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
    """HF name -> (param path, layout, param shape). Layout n >= 1: a Linear weight [out, in] whose kernel has n
    input axes first; 0: the same array reshaped (norms, biases); None: the same array (the embedding)."""
    H, K, Dh, D, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.mlp_dim
    table = {"model.embed_tokens.weight": (("embed", "embedding"), None, (cfg.vocab_size, D)),
             "model.norm.weight": (("final_norm", "scale"), 0, (D,))}
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = (("lm_head", "kernel"), 1, (D, cfg.vocab_size))
    for layer in range(cfg.n_layers):
        attn = {"q_proj.weight": (("q_proj", "kernel"), 1, (D, H, Dh)),
                "o_proj.weight": (("o_proj", "kernel"), 2, (H, Dh, D))}
        kv = {"k_proj.weight": (("k_proj", "kernel"), 1, (D, K, Dh)),
              "v_proj.weight": (("v_proj", "kernel"), 1, (D, K, Dh))}
        if cfg.qkv_bias:
            attn["q_proj.bias"] = (("q_proj", "bias"), 0, (H, Dh))
            kv.update({"k_proj.bias": (("k_proj", "bias"), 0, (K, Dh)),
                       "v_proj.bias": (("v_proj", "bias"), 0, (K, Dh))})
        if cfg.o_bias:
            attn["o_proj.bias"] = (("o_proj", "bias"), 0, (D,))
        if cfg.qk_norm:
            attn["q_norm.weight"] = (("q_norm", "scale"), 0, (Dh,))
            kv["k_norm.weight"] = (("k_norm", "scale"), 0, (Dh,))
        if cfg.kv_sources[layer] == layer:
            attn.update(kv)
        block = {f"self_attn.{name}": (("attn", *path), layout, shape) for name, (path, layout, shape) in attn.items()}
        block.update({"input_layernorm.weight": (("attn_norm", "scale"), 0, (D,)),
                      "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), 1, (D, F)),
                      "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), 1, (D, F)),
                      "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), 1, (F, D))})
        if cfg.sandwich_norms:  # Gemma: post_attention_layernorm norms the attention's output, not the MLP's input
            block.update({"post_attention_layernorm.weight": (("attn_post_norm", "scale"), 0, (D,)),
                          "pre_feedforward_layernorm.weight": (("mlp_norm", "scale"), 0, (D,)),
                          "post_feedforward_layernorm.weight": (("mlp_post_norm", "scale"), 0, (D,))})
        else:
            block["post_attention_layernorm.weight"] = (("mlp_norm", "scale"), 0, (D,))
        table.update({f"model.layers.{layer}.{name}": ((f"layers_{layer}", *path), layout, shape)
                      for name, (path, layout, shape) in block.items()})
    return table


def hf_to_param(name: str, w: np.ndarray, cfg: ModelConfig) -> tuple[tuple[str, ...], np.ndarray] | None:
    """Return (path in the param tree, array) for one HF tensor; None for tensors jaxkv does not use."""
    if _IGNORED.search(name) or (name == "lm_head.weight" and cfg.tie_embeddings):  # tied: the embedding serves
        return None
    table = _table(cfg)
    if name not in table:
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= cfg.n_layers:
            raise JaxkvError(f"tensor {name!r} is beyond the config's {cfg.n_layers} layers")
        if m and m.group(2).startswith(("self_attn.k_", "self_attn.v_")):
            layer = int(m.group(1))
            raise JaxkvError(f"{name!r}: layer {layer} reads the KV of layer {cfg.kv_sources[layer]} and has no K/V "
                             f"projection")
        raise JaxkvError(f"unexpected tensor {name!r}: the config does not say the model has it")
    path, layout, shape = table[name]
    if layout is None:
        return path, w
    if layout == 0:
        return path, w.reshape(shape)
    return path, np.ascontiguousarray(w.T).reshape(shape)


def params_to_hf(params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in PyTorch's layout) for every parameter: the inverse of `hf_to_param`."""
    for name, (path, layout, shape) in _table(cfg).items():
        x = params
        for part in path:
            x = x[part]
        x = np.asarray(x)
        if layout is None:
            yield name, x
        elif layout == 0:
            yield name, x.reshape(-1)
        else:
            yield name, np.ascontiguousarray(x.reshape(math.prod(shape[:layout]), -1).T)
