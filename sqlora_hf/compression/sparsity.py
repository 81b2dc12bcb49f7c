"""Structured n:m masks (2:4 and 4:8), data free.

This is the magnitude criterion; the data-free science issue replaces it with a better score.
"""
from __future__ import annotations

from typing import Optional

import torch

PATTERNS = {"2:4": (2, 4), "4:8": (4, 8)}


def nm_mask(weight: torch.Tensor, sparsity: str, score: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool keep-mask `[N, K]` keeping the `n` highest-scoring of every `m` consecutive columns."""
    if sparsity not in PATTERNS:
        raise ValueError(f"sparsity must be one of {list(PATTERNS)}, got {sparsity!r}")
    n_keep, m = PATTERNS[sparsity]
    rows, k = weight.shape
    if k % m:
        raise ValueError(f"in_features={k} is not a multiple of {m} for {sparsity} sparsity")
    s = (weight.abs() if score is None else score).to(torch.float32).view(rows, k // m, m)
    top = s.topk(n_keep, dim=-1).indices
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
    return keep.view(rows, k)


def compact(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept values of each row in ascending column order: `[N, K/2]`."""
    return weight[keep].view(weight.shape[0], -1)


def expand(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inverse of `compact`: scatter kept values back into a dense zero matrix."""
    dense = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    dense[keep] = values.reshape(-1)
    return dense
