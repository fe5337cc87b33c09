"""Block quantisation of linear weights for ONNX Runtime's `MatMulNBits` (model/onnx_lm.py)."""

from __future__ import annotations

import numpy as np

BLOCK = 32  # MatMulNBits block size along K


def blocks_of(weight: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, K/32, 32) float32, K zero-padded to whole blocks."""
    n, k = weight.shape
    if k % BLOCK:
        weight = np.pad(weight, ((0, 0), (0, BLOCK - k % BLOCK)))
    return weight.reshape(n, -1, BLOCK).astype(np.float32)


def pack4(values: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 (.., 2j) -> (.., j) bytes, two per byte, low nibble first."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def quantise(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, K) float -> MatMulNBits' B (N, K/32, 32*bits/8) uint8, scales (N*K/32,) float32 and zero
    points uint8: asymmetric per block of 32 along K with the grid through 0 (an integer zero
    point), two 4-bit values per byte low nibble first. 4 bits are inaccurate on GGUF Q4_1 weights."""
    blocks = blocks_of(weight)
    top = 2**bits - 1
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = np.maximum((high - low) / top, 1e-12)
    zero = np.clip(np.round(-low / scale), 0, top)
    q = np.clip(np.round(blocks / scale[..., None] + zero[..., None]), 0, top).astype(np.uint8)
    zero = zero.astype(np.uint8)
    if bits == 8:
        return q, scale.astype(np.float32).reshape(-1), zero.reshape(-1)
    return pack4(q), scale.astype(np.float32).reshape(-1), pack4(zero).reshape(-1)
