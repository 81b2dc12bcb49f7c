"""Folding a LoRA delta `B·A·scaling` into a packed layer's low-rank factors, and nothing else.

A compressed layer computes `Ŵ + L·R`. A LoRA adapter adds `ΔW = B·A·s`, another low-rank matrix,
so the merged layer is `Ŵ + [L, B·s]·[R; A]`: the codes, scales and sparsity mask never change and
no re-quantization happens (which is what every other quantized-LoRA merge has to do).

Two ways to write the new factors:
- *grow* (default, exact up to float16 rounding of the adapter part): keep L and R byte for byte and
  append the adapter as `rank(ΔW)` more columns/rows;
- *truncate to rank t*: the best rank-t approximation of the whole `L·R + ΔW`, computed from the
  factors (QR + a small SVD) without ever forming an `[N, K]` matrix. Lossy when t is smaller than
  the combined rank; the user chooses it to keep the checkpoint small.
The format stores the factors in float16 (docs/format.md), so the new columns are balanced
(`U·√Σ`, `√Σ·Vᵀ`) to keep both halves in float16's range.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..formats.layer import META_RANK, PackedLayer

MergeRank = Union[None, int, str]  # None = grow, int = truncate to that rank, "keep" = the layer's current rank (merge_and_unload resolves it to the compressed rank first)


def balanced_factors(left: torch.Tensor, right: torch.Tensor, rank: Optional[int] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`left·right` ([N, r]·[r, K]) as `U√Σ, √ΣVᵀ` (float64), largest singular values first.

    Works on the thin factors only: `left = Q₁R₁`, `rightᵀ = Q₂R₂`, SVD of the small `R₁R₂ᵀ`.
    `rank` keeps the leading components (the best approximation of that rank).
    """
    left = left.to(torch.float64)
    right = right.to(torch.float64)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    if rank is not None:
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    return (q_left @ u) * root, root[:, None] * (vh @ q_right.T)


def fold_delta(packed: PackedLayer, delta_left: torch.Tensor, delta_right: torch.Tensor,
               rank: MergeRank = None, name: str = "layer") -> PackedLayer:
    """A new `PackedLayer` representing `packed + delta_left·delta_right`; codes/scales/mask are shared.

    Raises ValueError (naming the layer) for an impossible rank or a delta that overflows float16.
    """
    n, k = packed.out_features, packed.in_features
    limit = min(n, k)
    old_rank = packed.rank
    if rank == "keep":
        rank = old_rank
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= limit):
        raise ValueError(f"{name}: merge rank must be None (grow), 'keep' or an int in [1, {limit}] "
                         f"(min(out_features={n}, in_features={k})), got {rank!r}")
    device = packed.qcodes.device
    delta_left = delta_left.to(device)
    delta_right = delta_right.to(device)
    grown = old_rank + delta_left.shape[1]
    if rank is None and grown <= limit:
        extra_l, extra_r = balanced_factors(delta_left, delta_right)
        new_l, new_r = _to_half(name, extra_l, extra_r)
        if old_rank:
            new_l = torch.cat([packed.lowrank_l, new_l], dim=1)
            new_r = torch.cat([packed.lowrank_r, new_r], dim=0)
    else:
        # Truncating (or growing past min(N, K), where the exact product has rank <= min(N, K) anyway).
        target = limit if rank is None else rank
        if old_rank:
            left = torch.cat([packed.lowrank_l.to(torch.float64), delta_left.to(torch.float64)], dim=1)
            right = torch.cat([packed.lowrank_r.to(torch.float64), delta_right.to(torch.float64)], dim=0)
        else:
            left, right = delta_left, delta_right
        new_l, new_r = _to_half(name, *balanced_factors(left, right, min(target, left.shape[1])))
    qmeta = packed.qmeta.clone()
    qmeta[META_RANK] = new_l.shape[1]
    merged = PackedLayer(qmeta, packed.qcodes, packed.qscales, packed.qmask,
                         new_l.contiguous(), new_r.contiguous())
    merged.validate(name, check_values=False)
    return merged


def with_lowrank(packed: PackedLayer, lowrank_l: Optional[torch.Tensor], lowrank_r: Optional[torch.Tensor]
                 ) -> PackedLayer:
    """The same quantized weight with other low-rank factors (None/None for rank 0); qmeta's rank follows."""
    rank = 0 if lowrank_l is None else lowrank_l.shape[1]
    if rank == 0:
        lowrank_l = lowrank_r = None
    qmeta = packed.qmeta.clone()
    qmeta[META_RANK] = rank
    return PackedLayer(qmeta, packed.qcodes, packed.qscales, packed.qmask, lowrank_l, lowrank_r)


def _to_half(name: str, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    left_h, right_h = left.to(torch.float16), right.to(torch.float16)
    if not (torch.isfinite(left_h).all() and torch.isfinite(right_h).all()):
        raise ValueError(f"{name}: the merged low-rank factors overflow float16 (the format's dtype for "
                         "lowrank_l/lowrank_r); the adapter's weights are too large or not finite")
    return left_h, right_h
