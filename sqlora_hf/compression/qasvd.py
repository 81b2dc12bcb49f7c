"""Quantization-aware SVD (LoftQ / LQ-LoRA style): alternate the quantized part and the correction.

Plain "quantize, then SVD the residual" fits `L·R` to rounding noise the quantizer already chose.
Alternating lets the quantizer see the correction: quantize `W − L·R`, then refit `L·R` to
`W − Q`, a few times. Each half-step is made monotone on purpose:
- the Q step re-quantizes every group and keeps, *per group*, whichever codes (new or old) leave
  less error against the current target `W − L·R`;
- the L·R step takes the best rank-r fit of `W − Q` (Eckart–Young) and keeps it only if, after
  rounding the factors to float16, it beats the previous factors.
So the residual `||W − Q − L·R||_F²` never increases across iterations, and the best iterate is the
last one. Factors are sorted by singular value and balanced, so any prefix is a valid lower rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .lowrank import factors_from_svd, svd
from .rtn import dequantize_groups, quantize_groups
from .scales import search_scales
from .sparsity import compact, expand


@dataclass
class QuantizedWeight:
    """Codes/scales of the stored weights, the optional float16 factors, and the error history."""

    codes: torch.Tensor
    scales: torch.Tensor
    left: Optional[torch.Tensor]
    right: Optional[torch.Tensor]
    dense_quantized: torch.Tensor  # Q as a dense fp32 matrix (zeros where pruned)
    error_history: list[float] = field(default_factory=list)  # ||W − Q − L·R||_F² after each iteration

    @property
    def rank(self) -> int:
        return 0 if self.left is None else int(self.left.shape[1])

    @property
    def squared_error(self) -> float:
        return self.error_history[-1]


def quantize_stored(values: torch.Tensor, bits: int, group_len: int, scale_search: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float16 scales) of `[N, Kc]` values: MSE-searched scales or plain absmax."""
    scales = search_scales(values, bits, group_len) if scale_search else None
    return quantize_groups(values, bits, group_len, scales)


def _group_errors(target: torch.Tensor, q: torch.Tensor, group_len: int) -> torch.Tensor:
    n, kc = target.shape
    d = (target.to(torch.float64) - q.to(torch.float64)).view(n, kc // group_len, group_len)
    return (d * d).sum(-1)


def residual_energy(weight: torch.Tensor, dense_q: torch.Tensor, left: Optional[torch.Tensor],
                    right: Optional[torch.Tensor]) -> float:
    """`||W − Q − L·R||_F²` in float64 (the quantity every step of the alternation lowers)."""
    r = weight.to(torch.float64) - dense_q.to(torch.float64)
    if left is not None:
        r = r - left.to(torch.float64) @ right.to(torch.float64)
    return float((r * r).sum())


def top_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced float16 factors of the best rank-`rank` approximation of `residual`.

    Exact SVD unless the rank is small against the matrix, where a randomized SVD with power
    iterations finds the same top directions for a fraction of the cost (the alternation only
    accepts factors that lower the error, so an inexact fit can never make things worse).
    """
    if min(residual.shape) <= 4 * (rank + 8):
        u, s, vh = svd(residual)
    else:
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(residual.to(torch.float32), q=rank + 8, niter=4)
        vh = v.T
    return factors_from_svd(u, s, vh, rank)


def quantize_with_correction(weight: torch.Tensor, bits: int, group_len: int, rank: int,
                             keep: Optional[torch.Tensor] = None, iterations: int = 1,
                             scale_search: bool = True, initial: Optional[QuantizedWeight] = None
                             ) -> QuantizedWeight:
    """Quantize `weight` `[N, K]` (fp32) with an optional rank-`rank` correction.

    `iterations` = 0 is plain "quantize then SVD the residual"; each further iteration is one
    alternation (Q step, then L·R step). `keep` is the n:m keep-mask of a sparse layer (the
    correction is fitted to everything lost, pruned weights included). `initial`, a rank-0 result
    for the same weight, skips the first quantization.
    """
    w = weight.to(torch.float32)

    def to_stored(x: torch.Tensor) -> torch.Tensor:
        return compact(x, keep) if keep is not None else x

    def to_dense(x: torch.Tensor) -> torch.Tensor:
        return expand(x, keep) if keep is not None else x

    if initial is not None:
        codes, scales, dense_q = initial.codes, initial.scales, initial.dense_quantized
        q_stored = to_stored(dense_q)
    else:
        codes, scales = quantize_stored(to_stored(w), bits, group_len, scale_search)
        q_stored = dequantize_groups(codes, scales, bits)
        dense_q = to_dense(q_stored)
    left = right = None
    if rank > 0:
        left, right = top_factors(w - dense_q, rank)
    history = [residual_energy(w, dense_q, left, right)]
    if rank == 0:
        return QuantizedWeight(codes, scales, None, None, dense_q, history)

    for _ in range(iterations):
        # Q step: quantize the target the correction leaves, keep the better codes per group.
        target = to_stored(w - left.to(torch.float32) @ right.to(torch.float32))
        new_codes, new_scales = quantize_stored(target, bits, group_len, scale_search)
        new_q = dequantize_groups(new_codes, new_scales, bits)
        better = _group_errors(target, new_q, group_len) < _group_errors(target, q_stored, group_len)
        per_weight = better.repeat_interleave(group_len, dim=1)
        codes = torch.where(per_weight, new_codes, codes)
        scales = torch.where(better, new_scales, scales)
        q_stored = torch.where(per_weight, new_q, q_stored)
        dense_q = to_dense(q_stored)
        # L·R step: the optimal refit, kept only if it survives float16 rounding as an improvement.
        old_error = residual_energy(w, dense_q, left, right)
        new_left, new_right = top_factors(w - dense_q, rank)
        new_error = residual_energy(w, dense_q, new_left, new_right)
        if new_error < old_error:
            left, right = new_left, new_right
        history.append(min(new_error, old_error))
    return QuantizedWeight(codes, scales, left, right, dense_q, history)
