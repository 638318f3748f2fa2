"""Read a llama.cpp GGUF file as an HF checkpoint of its family: config, float32 tensors, tokenizer.

Architectures "llama" (Llama and Mistral, which llama.cpp writes as "llama"), "qwen2", "qwen3", "gemma2" and
"gemma3" are read. Tensors come out under HF names in PyTorch's [out, in] layout, so `hf_layout` places them
exactly as it places safetensors, and the config is the one `hf_config` gives the HF checkpoint. What
llama.cpp's converter (convert_hf_to_gguf.py) changes is undone here: quantized storage (dequantized to
float32), the reordering of Llama's Q/K rows (and biases) for its interleaved RoPE, and the 1 it adds to every
Gemma norm weight. What a GGUF leaves to llama.cpp's code (Gemma's window pattern and query scale, its default
soft-caps) is taken as llama.cpp takes it; metadata that llama.cpp's graph for the architecture would not apply,
or that jaxkv cannot, is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxkv.config import ModelConfig, RopeScaling
from jaxkv.errors import JaxkvError
from jaxkv.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)

# GGUF architecture -> jaxkv family
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3"}
GEMMA = ("gemma2", "gemma3")

# --- tensor names ---------------------------------------------------------------------------------
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma's norms around each sublayer: llama.cpp's ffn_norm is the MLP's input norm, and HF's
# post_attention_layernorm norms the attention's output (llama.cpp's post_attention_norm).
_SANDWICH_NAMES = {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# Llama-3 RoPE scaling baked into a tensor by llama.cpp; read by model_config, not a weight.
_ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's LlamaModel.permute reorders these rows (weights and biases) by head: HF part -> config field.
_PERMUTED = {"self_attn.q_proj": "n_heads", "self_attn.k_proj": "n_kv_heads"}

# --- metadata -------------------------------------------------------------------------------------
# Keys that change what a model computes, and the architectures whose llama.cpp graph applies them. llama.cpp
# ignores them elsewhere; jaxkv refuses such a file rather than guess what its writer meant.
_ARCH_KEYS = {
    "attention.sliding_window": GEMMA,
    "attention.sliding_window_pattern": GEMMA,
    "rope.freq_base_swa": GEMMA,
    "attn_logit_softcapping": ("gemma2",),
    "final_logit_softcapping": GEMMA,
}
# What llama.cpp assumes when a key is absent (its llama_hparams defaults and per-architecture loaders).
_DEFAULTS = {
    "gemma2": {"attention.sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"attention.sliding_window": 0, "rope.freq_base_swa": 10000.0, "final_logit_softcapping": 0.0},
}
# llama.cpp's window pattern n when a file has none: layer i is a window layer when i % n < n - 1.
_WINDOW_PATTERNS = {"gemma2": 2, "gemma3": 6}
# A GGUF has no query_pre_attn_scalar: llama.cpp scales Gemma's queries by head_dim ** -0.5, except in the 27B
# geometry (known by its layer count), where it uses (d_model / n_heads) ** -0.5, as Google's reference does.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Head geometry a key may only restate (jaxkv has one head size and full RoPE on every layer).
_HEAD_DIM_KEYS = ("attention.value_length", "attention.key_length_swa", "attention.value_length_swa",
                  "rope.dimension_count", "rope.dimension_count_swa")


def _hf_name(name: str, sandwich: bool) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    part = m and (sandwich and _SANDWICH_NAMES.get(m.group(2)) or _BLOCK_NAMES.get(m.group(2)))
    if part:
        return f"model.layers.{m.group(1)}.{part}"
    raise JaxkvError(f"GGUF tensor {name!r} has no counterpart in an HF checkpoint jaxkv reads")


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (transformers' `_reverse_permute_weights`): within each
    head it stores rows as interleaved RoPE pairs, HF as two halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _wavelengths(head_dim: int, theta: float) -> np.ndarray:
    return 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _llama3_factors(s: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors that Llama-3 scaling applies (what llama.cpp writes as rope_freqs)."""
    wavelen = _wavelengths(head_dim, theta)
    orig = s.original_max_position_embeddings
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < orig / s.high_freq_factor, 1.0,
                    np.where(wavelen > orig / s.low_freq_factor, s.factor, mid))


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling | None:
    """Recover the RopeScaling behind a rope_freqs tensor, refusing any it does not reproduce.

    The factors fix only orig/low and orig/high, so orig is pinned to Llama 3's 8192 and
    low/high are fitted on the smoothly scaled frequencies (s = (orig/wavelen - low)/(high - low)).
    """
    factors = factors.astype(np.float64)
    if factors.shape != (head_dim // 2,):
        raise JaxkvError(f"rope_freqs has shape {factors.shape}, expected ({head_dim // 2},)")
    if np.allclose(factors, 1.0):
        return None
    factor, orig = float(factors.max()), 8192
    wavelen = _wavelengths(head_dim, theta)
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    mid = (smooth > 1e-6) & (smooth < 1 - 1e-6)
    low, high = 1.0, 4.0
    with np.errstate(all="ignore"):  # a degenerate fit just fails the check below
        if mid.sum() >= 2:
            slope, intercept = np.polyfit(orig / wavelen[mid], smooth[mid], 1)
            low, high = -intercept / slope, (1 - intercept) / slope
        scaling = RopeScaling(factor=round(factor, 4), low_freq_factor=round(float(low), 4),
                              high_freq_factor=round(float(high), 4), original_max_position_embeddings=orig)
        ok = np.allclose(_llama3_factors(scaling, head_dim, theta), factors, rtol=1e-4, atol=1e-5)
    if not ok:
        raise JaxkvError("the GGUF's rope_freqs tensor is not Llama-3 RoPE scaling, "
                         "the only kind jaxkv supports")
    return scaling


class GGUFCheckpoint:
    """A GGUF file of a supported architecture (`ARCHITECTURES`), opened lazily (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except FileNotFoundError:
            raise JaxkvError(f"cannot read GGUF file {self.path}: no such file") from None
        except Exception as e:  # the reader fails on bad files with whatever numpy or struct raises
            reason = " ".join(str(e).split()) or type(e).__name__
            raise JaxkvError(f"cannot read GGUF file {self.path}: not a valid GGUF file ({reason})") from None
        self.arch = self._meta("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise JaxkvError(f"GGUF file {self.path} has architecture {self.arch!r}; jaxkv reads "
                             f"{', '.join(ARCHITECTURES)}")
        self.family = ARCHITECTURES[self.arch]

    def _meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def _key(self, key: str, default: Any = None, required: bool = False) -> Any:
        """`<arch>.<key>`, else llama.cpp's default for the architecture, else `default`."""
        value = self._meta(f"{self.arch}.{key}", _DEFAULTS.get(self.arch, {}).get(key, default))
        if value is None and required:
            raise JaxkvError(f"GGUF file {self.path} lacks {self.arch}.{key}")
        return value

    def _refuse(self, key: str, value: Any, why: str) -> JaxkvError:
        return JaxkvError(f"GGUF file {self.path}: {self.arch}.{key}={value!r} {why}")

    def _tensor(self, name: str) -> gguf.ReaderTensor | None:
        return next((t for t in self.reader.tensors if t.name == name), None)

    def __len__(self) -> int:
        """How many tensors `tensors()` yields."""
        return sum(t.name != _ROPE_FREQS for t in self.reader.tensors)

    def _rope_scaling(self, head_dim: int, theta: float) -> RopeScaling | None:
        """Linear scaling from the keys (llama.cpp's default type when a factor is given), or Llama 3's from the
        rope_freqs tensor."""
        factor = float(self._key("rope.scaling.factor", self._key("rope.scale_linear", 0.0)))
        kind = self._key("rope.scaling.type", "linear")
        freqs = self._tensor(_ROPE_FREQS)
        if kind not in ("none", "linear"):
            raise self._refuse("rope.scaling.type", kind, "is not supported (supported: none, linear, and Llama-3 "
                                                          "scaling as a rope_freqs tensor)")
        linear = None if kind == "none" or factor in (0.0, 1.0) else RopeScaling(factor=factor, rope_type="linear")
        llama3 = None if freqs is None else _llama3_scaling(
            gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1), head_dim, theta)
        if linear and llama3:
            raise self._refuse("rope.scaling.factor", factor, "scales RoPE on top of a rope_freqs tensor")
        return linear or llama3

    def _windows(self, n_layers: int) -> tuple[tuple[int, ...], int | None]:
        """(window layers, window) as llama.cpp's graph for the architecture applies them."""
        window = int(self._key("attention.sliding_window", 0))
        if not window:
            return (), None
        pattern = self._key("attention.sliding_window_pattern", _WINDOW_PATTERNS[self.arch])
        if isinstance(pattern, list):  # one flag per layer
            if len(pattern) != n_layers:
                raise self._refuse("attention.sliding_window_pattern", pattern, f"does not have {n_layers} entries")
            return tuple(i for i, windowed in enumerate(pattern) if windowed), window
        n = int(pattern)
        return tuple(i for i in range(n_layers) if n == 0 or i % n < n - 1), window

    def _window_rope_theta(self, theta: float, scaling: RopeScaling | None, window_layers) -> float | None:
        """The RoPE base of the window layers where llama.cpp gives them their own: Gemma 3's local layers always
        (and unscaled, as jaxkv rotates such layers), Gemma 2's when rope.freq_base_swa differs (scaled as the rest,
        which jaxkv cannot do)."""
        local = float(self._key("rope.freq_base_swa", theta))
        if not window_layers or (self.family != "gemma3" and local == theta):
            return None
        if self.family != "gemma3" and scaling:
            raise self._refuse("rope.freq_base_swa", local, "with RoPE scaling is not supported (jaxkv does not "
                                                            "scale a window layer with its own RoPE base)")
        return local

    def _check_keys(self, head_dim: int) -> None:
        for key, archs in _ARCH_KEYS.items():
            value = self._meta(f"{self.arch}.{key}")
            if value and self.arch not in archs:
                raise self._refuse(key, value, f"is not applied by llama.cpp's {self.arch} (only by "
                                               f"{', '.join(archs)}); jaxkv does not guess what it means")
        for key in _HEAD_DIM_KEYS:
            value = self._meta(f"{self.arch}.{key}", head_dim)
            if value != head_dim:
                raise self._refuse(key, value, f"differs from the head size {head_dim}; jaxkv supports one head "
                                               f"size and full RoPE")

    def model_config(self, name: str | None = None) -> ModelConfig:
        d_model, n_heads = int(self._key("embedding_length", required=True)), int(
            self._key("attention.head_count", required=True))
        n_layers = int(self._key("block_count", required=True))
        head_dim = int(self._key("attention.key_length", d_model // n_heads))
        self._check_keys(head_dim)
        theta = float(self._key("rope.freq_base", 10000.0))
        rope_scaling = self._rope_scaling(head_dim, theta)
        gemma = self.family in GEMMA
        window_layers, window = self._windows(n_layers) if gemma else ((), None)
        softcaps = [float(self._key(k, 0.0)) or None for k in ("attn_logit_softcapping", "final_logit_softcapping")]
        embed = self._tensor("token_embd.weight")
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        vocab = int(embed.shape[-1]) if embed is not None else self._key(
            "vocab_size", None if tokens is None else len(tokens.data), required=True)
        return ModelConfig(
            vocab_size=int(vocab),
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(self._key("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            mlp_dim=int(self._key("feed_forward_length", required=True)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            norm_eps=float(self._key("attention.layer_norm_rms_epsilon", required=True)),
            tie_embeddings=self._tensor("output.weight") is None,
            max_seq_len=int(self._key("context_length", required=True)),
            window_layers=window_layers,
            sliding_window=window,
            qkv_bias=self._tensor("blk.0.attn_q.bias") is not None,
            o_bias=self._tensor("blk.0.attn_output.bias") is not None,
            qk_norm=self._tensor("blk.0.attn_q_norm.weight") is not None,
            activation="gelu_tanh" if gemma else "silu",
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            embed_scale=gemma,
            attn_softcap=softcaps[0],
            final_softcap=softcaps[1],
            query_scale=(d_model / n_heads if n_layers == _GEMMA_27B_LAYERS.get(self.family) else head_dim)
            if gemma else None,
            window_rope_theta=self._window_rope_theta(theta, rope_scaling, window_layers),
            family=self.family,
            name=name or self._meta("general.name") or self.path.stem,
        )

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 [out, in] array) one tensor at a time.

        Every tensor's name and type is checked before the first is yielded, so an unusable file
        fails before any conversion work.
        """
        gemma = self.family in GEMMA
        plan = []
        for t in self.reader.tensors:
            if t.name == _ROPE_FREQS:
                continue
            if t.tensor_type not in SUPPORTED_TYPES:
                raise JaxkvError(f"tensor {t.name} has quantization type {t.tensor_type.name}, which jaxkv does not "
                                 f"convert (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
            plan.append((t, _hf_name(t.name, sandwich=gemma)))
        cfg = self.model_config()
        for t, hf_name in plan:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            part = hf_name.split(".", 3)[-1].rsplit(".", 1)[0]  # "self_attn.q_proj" of a layer's q_proj.weight
            if self.arch == "llama" and part in _PERMUTED:
                w = _unpermute(w, getattr(cfg, _PERMUTED[part]))
            if gemma and hf_name.endswith("norm.weight"):  # llama.cpp stores Gemma's (1 + w) norms as 1 + w
                w = w - np.float32(1.0)
            yield hf_name, np.require(w, np.float32, ["C", "W"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf(self.reader)
