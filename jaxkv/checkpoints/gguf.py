"""Read a llama.cpp GGUF file as an HF-Llama checkpoint: config, float32 tensors, tokenizer.

Tensors come out under HF names in PyTorch's [out, in] layout, so `hf_layout` places them exactly
as it places safetensors. Two things differ from HF and are undone here: quantized storage
(dequantized to float32) and llama.cpp's reordering of Q/K rows for its interleaved RoPE.
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
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# Llama-3 RoPE scaling baked into a tensor by llama.cpp; read by model_config, not a weight.
_ROPE_FREQS = "rope_freqs.weight"


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise JaxkvError(f"GGUF tensor {name!r} has no counterpart in an HF Llama checkpoint")


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
    """A GGUF file of architecture "llama", opened lazily (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except FileNotFoundError:
            raise JaxkvError(f"cannot read GGUF file {self.path}: no such file") from None
        except Exception as e:  # the reader fails on bad files with whatever numpy or struct raises
            reason = " ".join(str(e).split()) or type(e).__name__
            raise JaxkvError(f"cannot read GGUF file {self.path}: not a valid GGUF file ({reason})") from None
        arch = self._meta("general.architecture")
        if arch != "llama":
            raise JaxkvError(f"GGUF file {self.path} has architecture {arch!r}; jaxkv reads only 'llama'")

    def _meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def _llama(self, key: str, default: Any = None) -> Any:
        value = self._meta(f"llama.{key}", default)
        if value is None:
            raise JaxkvError(f"GGUF file {self.path} lacks llama.{key}")
        return value

    def _tensor(self, name: str) -> gguf.ReaderTensor | None:
        return next((t for t in self.reader.tensors if t.name == name), None)

    def __len__(self) -> int:
        """How many tensors `tensors()` yields."""
        return sum(t.name != _ROPE_FREQS for t in self.reader.tensors)

    def model_config(self, name: str | None = None) -> ModelConfig:
        d_model, n_heads = int(self._llama("embedding_length")), int(self._llama("attention.head_count"))
        head_dim = int(self._llama("attention.key_length", d_model // n_heads))
        rope_dim = self._meta("llama.rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise JaxkvError(f"GGUF rotates {rope_dim} of {head_dim} head dims; jaxkv supports full RoPE only")
        theta = float(self._llama("rope.freq_base", 10000.0))
        scaling_type = self._meta("llama.rope.scaling.type", "none")
        if scaling_type != "none":
            raise JaxkvError(f"GGUF RoPE scaling type {scaling_type!r} is not supported "
                             "(jaxkv supports Llama-3 scaling)")
        freqs = self._tensor(_ROPE_FREQS)
        rope_scaling = None if freqs is None else _llama3_scaling(
            gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1), head_dim, theta)
        tokens = self.reader.get_field("tokenizer.ggml.tokens")
        return ModelConfig(
            vocab_size=int(self._llama("vocab_size", None if tokens is None else len(tokens.data))),
            d_model=d_model,
            n_layers=int(self._llama("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(self._llama("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            mlp_dim=int(self._llama("feed_forward_length")),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            norm_eps=float(self._llama("attention.layer_norm_rms_epsilon")),
            tie_embeddings=self._tensor("output.weight") is None,
            max_seq_len=int(self._llama("context_length")),
            name=name or self._meta("general.name") or self.path.stem,
        )

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 [out, in] array) one tensor at a time.

        Every tensor's name and type is checked before the first is yielded, so an unusable file
        fails before any conversion work.
        """
        plan = []
        for t in self.reader.tensors:
            if t.name == _ROPE_FREQS:
                continue
            if t.tensor_type not in SUPPORTED_TYPES:
                raise JaxkvError(f"tensor {t.name} has quantization type {t.tensor_type.name}, which jaxkv does not "
                                 f"convert (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
            plan.append((t, _hf_name(t.name)))
        cfg = self.model_config()
        heads = {"self_attn.q_proj.weight": cfg.n_heads, "self_attn.k_proj.weight": cfg.n_kv_heads}
        for t, hf_name in plan:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            kind = hf_name.split(".", 3)[-1]
            if kind in heads:
                w = _unpermute(w, heads[kind])
            yield hf_name, np.require(w, np.float32, ["C", "W"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_gguf(self.reader)
