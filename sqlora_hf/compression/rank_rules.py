"""Rank rules for the low-rank correction: SQ-LoRA's stable-rank rule and the residual-spectrum rule.

Two different questions hide behind "what rank":
- SQ-LoRA's rule looks at the weight `W`. Its stable rank `sr(W) = ||W||_F² / ||W||_2²` bounds how
  fast the spectrum of `W` can fall: since `σ_{r+1}² ≤ ||W||_F² / (r+1)`, choosing
  `r ≥ sr(W)/ε − 1` guarantees `||W − W_r||_2 ≤ √ε·σ_1(W)`. That is a bound on approximating `W`
  itself, which is what a LoRA replacing `W` would need.
- The correction in sqlora_hf fits the *quantization residual* `E = W − Q`, whose spectrum is
  nearly flat (rounding noise). The residual rule keeps a direction only when the error energy it
  removes per byte beats what the same bytes buy as one more quantization bit.
`docs/algorithms.md` has the derivations and the measurement that chose the default.
"""
from __future__ import annotations

import math

import torch

FACTOR_BYTES_PER_RANK_ELEMENT = 2  # float16 factors


def stable_rank(weight: torch.Tensor) -> float:
    """`||W||_F² / ||W||_2²` (1 for a rank-one matrix, min(N, K) for an orthogonal one; 0 for W = 0)."""
    w = weight.to(torch.float32)
    top = float(torch.linalg.matrix_norm(w, ord=2))
    if top == 0.0:
        return 0.0
    return float((w * w).sum()) / (top * top)


def stable_rank_rule(weight: torch.Tensor, epsilon: float, cap: int) -> int:
    """SQ-LoRA rank: the smallest `r` with the bound `||W − W_r||_2 ≤ √ε·σ_1` guaranteed, at most `cap`.

    From `σ_{r+1}² ≤ ||W||_F²/(r+1) = sr(W)·σ_1²/(r+1)`, `r = ceil(sr(W)/ε) − 1` suffices.
    """
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon={epsilon!r} must lie in (0, 1]")
    sr = stable_rank(weight)
    if sr == 0.0:
        return 0
    return max(0, min(cap, math.ceil(sr / epsilon) - 1))


def bytes_per_rank(rows: int, cols: int) -> int:
    """Storage of one rank direction: a float16 column of L and a float16 row of R."""
    return FACTOR_BYTES_PER_RANK_ELEMENT * (rows + cols)


def residual_price_per_byte(residual_energy: float, rows: int, cols: int) -> float:
    """Error energy one byte of *quantization* buys on this layer.

    One more bit per weight costs `rows·cols/8` bytes and cuts the residual energy by about 4x
    (6 dB per bit), i.e. removes `0.75·||E||²`. A rank direction must do at least as well.
    """
    return 0.75 * residual_energy * 8.0 / (rows * cols)


def residual_spectrum_rank(singular_values: torch.Tensor, rows: int, cols: int, cap: int,
                           residual_energy: float | None = None) -> int:
    """Residual-spectrum rank: directions `i` whose `σ_i²` per byte beats the quantization price.

    `singular_values` are those of the residual `E = W − Q`, sorted descending; `residual_energy`
    defaults to their squared sum (`||E||_F²`). A noise-like residual has
    `σ_1² ≈ ||E||²(√N+√K)²/(NK)`, well under the price `0.75·||E||²·16(N+K)/(NK)`, so rounding
    noise gets rank 0 and only structure (outlier rows/columns the quantizer missed) gets rank.
    """
    s2 = singular_values.to(torch.float64) ** 2
    energy = float(s2.sum()) if residual_energy is None else residual_energy
    if energy <= 0.0:
        return 0
    threshold = residual_price_per_byte(energy, rows, cols) * bytes_per_rank(rows, cols)
    return int(min(cap, int((s2 >= threshold).sum())))
