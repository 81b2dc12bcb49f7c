"""Elastic rank (UniQL's on-device pruning): shrink the stored correction at load, no recompression.

The compressor stores `L = U√Σ`, `R = √Σ Vᵀ` sorted by singular value, so dropping trailing columns
of L and rows of R leaves the best correction of the smaller rank, and column `i`'s energy is
`σ_i² = ||L[:, i]||² · ||R[i]||²`.
"""
from __future__ import annotations

import heapq
import math

from ..formats.layer import META_RANK, PackedLayer
from .rank_rules import bytes_per_rank


def truncate_rank(layer: PackedLayer, rank: int, name: str = "layer") -> PackedLayer:
    """The same layer with its correction cut to the first `rank` directions."""
    if not 0 <= rank <= layer.rank:
        raise ValueError(f"{name}: cannot truncate rank {layer.rank} to {rank}; allowed 0 … {layer.rank}")
    if rank == layer.rank:
        return layer
    meta = layer.qmeta.clone()
    meta[META_RANK] = rank
    left = layer.lowrank_l[:, :rank].contiguous() if rank else None
    right = layer.lowrank_r[:rank].contiguous() if rank else None
    out = PackedLayer(meta, layer.qcodes, layer.qscales, layer.qmask, left, right)
    if hasattr(layer, "relative_error"):
        out.relative_error = None  # no longer known without the original weight
    return out


def kept_rank(rank: int, keep: float) -> int:
    """Rank left by keeping the fraction `keep` of `rank` directions (rounded to nearest)."""
    return int(math.floor(rank * keep + 0.5))


def direction_energies(layer: PackedLayer) -> list[float]:
    """`σ_i²` of every stored direction (non-increasing for a layer written by the compressor)."""
    if layer.rank == 0:
        return []
    left = layer.lowrank_l.float().pow(2).sum(0)
    right = layer.lowrank_r.float().pow(2).sum(1)
    return [float(v) for v in left * right]


def ranks_for_budget(layers: dict[str, PackedLayer], budget_bytes: int) -> dict[str, int]:
    """Ranks per layer so the layers' total bytes fit `budget_bytes`, dropping the directions with
    the least energy per byte first (always from the tail of a layer, so prefixes stay valid).

    Raises ValueError naming the least achievable bytes (every rank 0) when the budget is too small.
    """
    ranks = {name: layer.rank for name, layer in layers.items()}
    total = sum(layer.nbytes() for layer in layers.values())
    floor = total - sum(bytes_per_rank(p.out_features, p.in_features) * p.rank for p in layers.values())
    if floor > budget_bytes:
        raise ValueError(f"the compressed layers need at least {floor} bytes even with every correction "
                         f"removed; the budget allows {budget_bytes}")
    energies = {name: direction_energies(layer) for name, layer in layers.items()}
    heap = []
    for name, layer in layers.items():
        if layer.rank:
            cost = bytes_per_rank(layer.out_features, layer.in_features)
            heapq.heappush(heap, (energies[name][layer.rank - 1] / cost, name))
    while total > budget_bytes and heap:
        _, name = heapq.heappop(heap)
        layer = layers[name]
        cost = bytes_per_rank(layer.out_features, layer.in_features)
        ranks[name] -= 1
        total -= cost
        if ranks[name]:
            heapq.heappush(heap, (energies[name][ranks[name] - 1] / cost, name))
    return ranks
