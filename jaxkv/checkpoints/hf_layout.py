"""Map HF-Llama tensor names and layouts onto jaxkv's parameter tree.

Every checkpoint format (HF safetensors, GGUF) is first read as HF-named tensors in
PyTorch's [out, in] layout; this one mapping then places them, so the formats cannot
drift apart.
"""

from __future__ import annotations

import re

import numpy as np

from jaxkv.config import ModelConfig
from jaxkv.errors import JaxkvError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


def _linear(w: np.ndarray, *out_shape: int) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> kernel [in, *out_shape]."""
    return np.ascontiguousarray(w.T).reshape(w.shape[1], *out_shape)


def hf_to_param(name: str, w: np.ndarray, cfg: ModelConfig) -> tuple[tuple[str, ...], np.ndarray] | None:
    """Return (path in the param tree, array) for one HF tensor; None for tensors jaxkv does not use."""
    if _IGNORED.search(name):
        return None
    H, K, Dh, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    if name == "model.embed_tokens.weight":
        return ("embed", "embedding"), w
    if name == "model.norm.weight":
        return ("final_norm", "scale"), w
    if name == "lm_head.weight":  # a tied model reuses the embedding instead
        return None if cfg.tie_embeddings else (("lm_head", "kernel"), np.ascontiguousarray(w.T))
    m = _LAYER.match(name)
    if not m:
        raise JaxkvError(f"unexpected tensor {name!r} in a Llama-family checkpoint")
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= cfg.n_layers:
        raise JaxkvError(f"tensor {name!r} is beyond the config's {cfg.n_layers} layers")
    prefix = f"layers_{layer}"
    if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight") and cfg.kv_sources[layer] != layer:
        raise JaxkvError(f"{name!r}: layer {layer} reads the KV of layer {cfg.kv_sources[layer]} and has no K/V projection")
    table = {
        "input_layernorm.weight": (("attn_norm", "scale"), lambda: w),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), lambda: w),
        "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), lambda: _linear(w, H, Dh)),
        "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), lambda: _linear(w, K, Dh)),
        "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), lambda: _linear(w, K, Dh)),
        "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), lambda: _linear(w, D).reshape(H, Dh, D)),
        "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), lambda: _linear(w, cfg.mlp_dim)),
        "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), lambda: _linear(w, cfg.mlp_dim)),
        "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), lambda: _linear(w, D)),
    }
    if rest not in table:
        raise JaxkvError(f"unexpected tensor {name!r} in a Llama-family checkpoint (biases and other architectures are not supported)")
    path, make = table[rest]
    return (prefix, *path), make()
