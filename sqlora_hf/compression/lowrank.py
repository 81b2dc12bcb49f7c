"""Low-rank correction of a residual: truncated SVD, sorted and balanced (rank rules: rank_rules.py)."""
from __future__ import annotations

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
