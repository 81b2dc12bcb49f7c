"""Compress one weight matrix into a `PackedLayer`: the data-free pipeline used at load time.

Order of work: (1) choose the sparsity mask, (2) quantize the kept weights per group, (3) fit the
low-rank correction to everything the first two steps lost, `W − Ŵ` (pruned weights included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..formats.layer import PackedLayer, layout_problem
from ..formats.packing import pack_codes, pack_mask
from .lowrank import factors_from_svd, noise_floor_rank, svd
from .rtn import dequantize_groups, quantize_groups
from .sparsity import compact, expand, nm_mask


@dataclass(frozen=True)
class CompressionSpec:
    """What to do to one layer. `rank` is an int (0 = none) or "auto"."""

    bits: int = 4
    group_size: int = 64
    sparsity: Optional[str] = None
    rank: Union[int, str] = 0
    # "auto" never spends more than this many extra bits per weight on the correction.
    max_rank_bpw: float = 0.25


def auto_rank_cap(rows: int, cols: int, max_rank_bpw: float) -> int:
    """Largest rank whose float16 factors cost at most `max_rank_bpw` bits per weight."""
    return int(max_rank_bpw * rows * cols // (16 * (rows + cols)))


def compress_weight(weight: torch.Tensor, spec: CompressionSpec, name: str = "layer") -> PackedLayer:
    """Compress a dense `[N, K]` weight. Raises ValueError naming `name` on bad input."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name}: the weight holds {bad} NaN/Inf values; refusing to compress it")
    n, k = w.shape
    problem = layout_problem(spec.bits, spec.group_size, spec.sparsity, k)
    if problem:
        raise ValueError(f"{name}: {problem}")
    if isinstance(spec.rank, int) and spec.rank > min(n, k):
        raise ValueError(f"{name}: rank={spec.rank} is larger than the layer allows (min(out, in) = {min(n, k)})")

    keep = nm_mask(w, spec.sparsity) if spec.sparsity else None
    stored = compact(w, keep) if keep is not None else w
    group_len = spec.group_size // 2 if spec.sparsity else spec.group_size
    try:
        codes, scales = quantize_groups(stored, spec.bits, group_len)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    q_stored = dequantize_groups(codes, scales, spec.bits)
    q_dense = expand(q_stored, keep) if keep is not None else q_stored

    left = right = None
    rank = 0
    if spec.rank == "auto" or spec.rank > 0:
        u, s, vh = svd(w - q_dense)
        if spec.rank == "auto":
            rank = min(noise_floor_rank(s, n, k), auto_rank_cap(n, k, spec.max_rank_bpw))
        else:
            rank = int(spec.rank)
        if rank > 0:
            left, right = factors_from_svd(u, s, vh, rank)

    layer = PackedLayer(
        qmeta=PackedLayer.make_meta(spec.bits, spec.group_size, spec.sparsity, n, k, rank),
        qcodes=pack_codes(codes, spec.bits),
        qscales=scales.contiguous(),
        qmask=pack_mask(keep) if keep is not None else None,
        lowrank_l=left,
        lowrank_r=right,
    )
    return layer
