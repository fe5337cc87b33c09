"""Block quantisation of linear weights for ONNX Runtime's `MatMulNBits` (model/onnx_lm.py).

`MatMulNBits` holds a weight (N, K) as blocks of 32 along K, each block `scale * (q - zero)`
with integer q and an integer zero point. The default LM's weights are GGUF Q4_1 de-quantised:
per block w = d*q + m with q in 0..15 and a FLOAT minimum m (its LM head, tied to the
embeddings, is Q8_0: w = d*q, q in -127..127). Re-quantising Q4_1 weights to 4 bits with an
integer zero point moves every block by up to d/2 (prompt logits' cosine 0.84 against float32);
`MatMulNBits` with float zero points is exact but decoded ~20x slower on an AVX2 CPU.

`q4_1_blocks` writes each block exactly as d*(q - z) + r with the integer z = round(-m/d) and a
per-block residual r = m + d*z (|r| <= d/2 while z is in 0..15), so W x = MatMulNBits4(x) +
R · blocksum(x), where blocksum(x) sums x over each block of 32 and R (N, K/32) holds the r's:
a float matmul with 1/32 of the weight count. On weights that are not Q4_1 it is Q4_1's own
quantisation (min and max of the block on the 16-level grid), error <= d/2 per weight.
"""

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


def symmetric8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit blocks scale * (q - 128) with scale = max|w| / 127: exact on GGUF Q8_0 weights
    (w = d*q, d = max|w| / 127 per block), as MatMulNBits' B, scales and zero points."""
    blocks = blocks_of(weight)
    scale = np.maximum(np.abs(blocks).max(-1) / 127, 1e-12)
    q = np.clip(np.round(blocks / scale[..., None]) + 128, 1, 255).astype(np.uint8)
    return q, scale.astype(np.float32).reshape(-1), np.full(scale.size, 128, np.uint8)


def q4_1_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, K) float, K a multiple of 32 -> 4-bit MatMulNBits' B (N, K/32, 16), scales d (N*K/32,),
    packed integer zero points z, and the residuals R (N, K/32) float32: per block
    w = d*(q - z) + r, the Q4_1 block d*q + m written with an integer zero point (module doc)."""
    blocks = blocks_of(weight).astype(np.float64)
    low, high = blocks.min(-1), blocks.max(-1)
    scale = np.where(high > low, (high - low) / 15, 1.0)  # d, as Q4_1's quantiser picks it
    q = np.clip(np.round((blocks - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    zero = np.clip(np.round(-low / scale), 0, 15)
    scale = scale.astype(np.float32)  # as MatMulNBits holds it; the residual absorbs its rounding
    residual = low + scale.astype(np.float64) * zero  # m + d*z
    return pack4(q), scale.reshape(-1), pack4(zero.astype(np.uint8)).reshape(-1), residual.astype(np.float32)


def q4_1_weight(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """The (N, K) float weight that `q4_1_blocks`' parts stand for (a reference for tests)."""
    n, blocks = residual.shape
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks, BLOCK).astype(np.float32)
    z = np.stack([zero & 15, zero >> 4], axis=-1).reshape(n, -1)[:, :blocks, None]
    d = scale.reshape(n, blocks, 1)
    return (d * (q - z) + residual[..., None]).reshape(n, blocks * BLOCK)
