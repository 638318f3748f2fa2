"""KIVI's quantizer written literally in numpy (keys per channel over a page's tokens, values per token in groups
of 32 channels, bfloat16 (scale, minimum) pairs, codes packed 8 / bits to a byte): the truth the pool's
quantizer and its kernels are checked against."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def bf16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def literal_codes(x: np.ndarray, bits: int, keys: bool):
    """KIVI in numpy, literally: keys [S, Dh] per channel over the tokens, values [Dh] per 32 channels; minimum and
    scale = (max - min) / (2^bits - 1) rounded to bfloat16, codes round((x - min) / scale) clipped to the range."""
    top = 2 ** bits - 1
    grouped = x.astype(np.float32) if keys else x.astype(np.float32).reshape(-1, 32)
    axis = 0 if keys else 1
    low = bf16(grouped.min(axis, keepdims=True))
    scale = bf16((grouped.max(axis, keepdims=True) - low) / np.float32(top))
    codes = np.clip(np.round((grouped - low) / np.where(scale > 0, scale, 1)), 0, top).astype(np.int64)
    return codes.reshape(x.shape), scale, low


def literal_bytes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Byte i of a vector holds channel i + j n at bits j bits.. (n = head_dim x bits / 8)."""
    n = codes.shape[-1] * bits // 8
    return sum(codes[..., j * n:(j + 1) * n] << (j * bits) for j in range(8 // bits)).astype(np.uint8)


def literal_dequantize(byte_rows: np.ndarray, bits: int, scale, low) -> np.ndarray:
    """Codes read bit by bit out of the bytes, times scale plus minimum, in float64."""
    n = byte_rows.shape[-1]
    codes = np.concatenate([(byte_rows.astype(np.int64) >> (j * bits)) & (2 ** bits - 1) for j in range(8 // bits)],
                           axis=-1)
    assert codes.shape[-1] == n * 8 // bits
    return codes * np.asarray(scale, np.float64) + np.asarray(low, np.float64)

