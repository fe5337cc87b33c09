"""Block quantisation for MatMulNBits (vlchat.model.onnx_quant): the 4-bit + residual form is exact
on GGUF Q4_1-like weights (where an integer zero point is not), symmetric 8 bits on Q8_0-like ones."""

from __future__ import annotations

import numpy as np

from vlchat.model.onnx_quant import BLOCK, q4_1_blocks, q4_1_weight, quantise, symmetric8


def q4_1_like(n: int, k: int, seed: int = 0) -> np.ndarray:
    """(N, K) float32 weights made as GGUF Q4_1 de-quantises them: per block of 32, d*q + m with
    q in 0..15 (0 and 15 both used), d and m float16 values, m a float minimum."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.002, 0.02, (n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    m = (-d * rng.uniform(2, 13, (n, k // BLOCK, 1))).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, k // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15
    return (d * q + m).reshape(n, k).astype(np.float32)


def test_q4_1_blocks_rebuild_q4_1_weights_exactly():
    weight = q4_1_like(48, 96)
    packed, scale, zero, residual = q4_1_blocks(weight)
    assert packed.shape == (48, 3, 16) and scale.shape == (48 * 3,) and residual.shape == (48, 3)
    assert zero.shape == (48 * 2,)  # 3 zero points a row, packed two a byte, the row padded
    np.testing.assert_allclose(q4_1_weight(packed, scale, zero, residual), weight, rtol=0, atol=1e-7)
    assert (np.abs(residual) <= scale.reshape(48, 3) / 2 + 1e-7).all()  # z = round(-m / d) kept it small


def test_integer_zero_points_alone_move_q4_1_weights():
    """Why the residual: 4 bits with an integer zero point (the grid through 0) misses the float minimum."""
    weight = q4_1_like(48, 96)
    packed, scale, zero = quantise(weight, 4)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(48, 3, BLOCK).astype(np.float32)
    z = np.stack([zero & 15, zero >> 4], -1).reshape(48, -1)[:, :3, None]
    rebuilt = (scale.reshape(48, 3, 1) * (q - z)).reshape(48, 96)
    assert np.abs(rebuilt - weight).max() > 1e-3


def test_q4_1_blocks_on_any_weights_err_by_at_most_half_a_step():
    weight = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32)
    packed, scale, zero, residual = q4_1_blocks(weight)
    error = np.abs(q4_1_weight(packed, scale, zero, residual) - weight).reshape(16, 2, BLOCK).max(-1)
    assert (error <= scale.reshape(16, 2) / 2 + 1e-6).all() and error.max() > 0


def test_symmetric8_is_exact_on_q8_0_weights():
    rng = np.random.default_rng(2)
    d = rng.uniform(0.001, 0.01, (8, 4, 1)).astype(np.float32)
    q = rng.integers(-127, 128, (8, 4, BLOCK))
    q[..., 0] = 127  # Q8_0 picks d = max|w| / 127
    weight = (d * q).reshape(8, 128).astype(np.float32)
    packed, scale, zero = symmetric8(weight)
    rebuilt = ((packed.astype(np.float32) - zero.reshape(8, 4, 1)) * scale.reshape(8, 4, 1)).reshape(8, 128)
    np.testing.assert_allclose(rebuilt, weight, rtol=0, atol=1e-7)
