"""Compress one layer given its calibration Hessian: GPTQ + the chosen low-rank method -> PackedLayer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..formats.layer import PackedLayer, layout_problem
from ..formats.packing import pack_codes, pack_mask
from .gptq import EighCache, gptq, intrinsic_lowrank, output_error, wanda_mask, whitened_lowrank
from .lowrank import factors_from_svd, svd

METHODS = ("intrinsic", "eora", "gptq")
SPARSITY_CRITERIA = ("sparsegpt", "wanda")


@dataclass(frozen=True)
class CalibratedSpec:
    bits: int = 4
    group_size: int = 64
    sparsity: Optional[str] = None
    rank: Union[int, str] = "auto"
    method: str = "intrinsic"
    sparsity_criterion: str = "sparsegpt"
    act_order: Optional[bool] = None  # None: on for dense layers, off for sparse ones
    damp: float = 0.01
    scale_search: bool = False


def calibrated_auto_rank(rows: int, cols: int) -> int:
    """`rank="auto"` with calibration data: 16, or less where that would cost over 0.25 bit per weight."""
    return min(16, int(0.25 * rows * cols // (16 * (rows + cols))))


def compress_with_hessian(weight: torch.Tensor, hessian: torch.Tensor, spec: CalibratedSpec,
                          name: str = "layer", eig_cache: Optional[EighCache] = None) -> tuple[PackedLayer, float]:
    """(packed layer, relative output error ‖X(W − Ŵ)ᵀ‖² / ‖X Wᵀ‖²).

    `eig_cache` lets Linears that share a Hessian object (q/k/v) share its eigen-decomposition.
    """
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: the weight holds NaN/Inf values; refusing to compress it")
    n, k = w.shape
    problem = layout_problem(spec.bits, spec.group_size, spec.sparsity, k)
    if problem:
        raise ValueError(f"{name}: {problem}")
    rank = calibrated_auto_rank(n, k) if spec.rank == "auto" else int(spec.rank)
    if rank > min(n, k):
        raise ValueError(f"{name}: rank={rank} is larger than the layer allows (min(out, in) = {min(n, k)})")
    act_order = (spec.sparsity is None) if spec.act_order is None else spec.act_order
    keep = wanda_mask(w, hessian, spec.sparsity) if spec.sparsity and spec.sparsity_criterion == "wanda" else None
    kwargs = dict(sparsity=spec.sparsity, damp=spec.damp, act_order=act_order, keep=keep, scale_search=spec.scale_search)
    left = right = None
    if rank > 0 and spec.method == "intrinsic":
        eig = eig_cache(hessian) if eig_cache is not None else None
        result, left, right = intrinsic_lowrank(w, hessian, rank, spec.bits, spec.group_size, eig=eig, **kwargs)
    else:
        result = gptq(w, hessian, spec.bits, spec.group_size, **kwargs)
        if rank > 0 and spec.method == "eora":
            eig = eig_cache(hessian) if eig_cache is not None else None
            left, right = whitened_lowrank(w - result.dequantized, hessian, rank, spec.damp, eig)
        elif rank > 0:
            u, s, vh = svd(w - result.dequantized)
            left, right = factors_from_svd(u, s, vh, rank)
    approx = result.dequantized
    if left is not None:
        left, right = left.to(torch.float16).contiguous(), right.to(torch.float16).contiguous()
        approx = approx + left.float() @ right.float()
    codes = result.codes
    if result.keep is not None:
        codes = codes[result.keep].view(n, k // 2)
    packed = PackedLayer(
        qmeta=PackedLayer.make_meta(spec.bits, spec.group_size, spec.sparsity, n, k, rank),
        qcodes=pack_codes(codes, spec.bits),
        qscales=result.scales.contiguous(),
        qmask=pack_mask(result.keep) if result.keep is not None else None,
        lowrank_l=left,
        lowrank_r=right,
    )
    denom = output_error(w, torch.zeros_like(w), hessian)
    rel = output_error(w, approx, hessian) / denom if denom > 0 else 0.0
    return packed, rel
