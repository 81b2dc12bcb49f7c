"""Low-rank correction of a residual: truncated SVD, sorted and balanced, and the data-free rank rule."""
from __future__ import annotations

import math

import torch


def svd(residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full thin SVD in float32 (singular values sorted, largest first)."""
    return torch.linalg.svd(residual.to(torch.float32), full_matrices=False)


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors `L = U√Σ`, `R = √Σ Vᵀ` of the top `rank` directions, as float16.

    Balancing keeps both factors in float16 range and makes any prefix the best lower-rank
    truncation (what elastic rank at load relies on).
    """
    root = s[:rank].sqrt()
    left = (u[:, :rank] * root).to(torch.float16)
    right = (root.unsqueeze(1) * vh[:rank]).to(torch.float16)
    return left.contiguous(), right.contiguous()


def noise_floor_rank(s: torch.Tensor, rows: int, cols: int, margin: float = 1.1) -> int:
    """Number of singular values that stand above the noise floor of the residual.

    A residual of independent rounding errors with variance v has its largest singular value near
    √v·(√rows + √cols) (the Marchenko–Pastur edge). Directions above that edge are structure the
    quantizer missed (outlier rows and columns); directions below it are noise no rank can fit
    cheaply. `v` is estimated from the total energy, so the rule needs no data.
    """
    energy = float((s.to(torch.float64) ** 2).sum())
    if energy == 0.0:
        return 0
    v = energy / (rows * cols)
    edge = margin * math.sqrt(v) * (math.sqrt(rows) + math.sqrt(cols))
    return int((s > edge).sum())
