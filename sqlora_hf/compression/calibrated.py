"""Compress one layer given its calibration Hessian: GPTQ + the chosen low-rank method -> PackedLayer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..formats.layer import PackedLayer, layout_problem
from ..formats.packing import pack_codes, pack_mask
from .gptq import (GPTQResult, HessianCache, act_order_scales, better_intrinsic, deflated_hessian, gptq,
                   wanda_mask, whitened_lowrank)
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
    refine_passes: int = 0  # coordinate-descent passes on the codes after each GPTQ sweep (gptq._refine)


def calibrated_auto_rank(rows: int, cols: int) -> int:
    """`rank="auto"` with calibration data and `memory_budget=None`: 16, or less where that would cost over
    0.25 bit per weight. (The default "auto" budget resolves `rank="auto"` to 0 before it gets here:
    `budget.plan_calibrated_auto`.)"""
    return min(16, int(0.25 * rows * cols // (16 * (rows + cols))))


def compress_with_hessian(weight: torch.Tensor, hessian: torch.Tensor, spec: CalibratedSpec,
                          name: str = "layer", cache: Optional[HessianCache] = None) -> tuple[PackedLayer, float]:
    """(packed layer, relative output error ‖X(W − Ŵ)ᵀ‖² / ‖X Wᵀ‖²).

    `cache` lets Linears that share a Hessian object (q/k/v) share its eigen-decomposition and
    GPTQ's inverse factor.
    """
    return compress_shared_input([weight], hessian, spec, [name], cache)[0]


def _checked(weight: torch.Tensor, spec: CalibratedSpec, name: str) -> tuple[torch.Tensor, int]:
    """(float32 weight, rank) after the checks every layer gets."""
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
    return w, rank


def _stacked_gptq(ws: list[torch.Tensor], hessian: torch.Tensor, spec: CalibratedSpec,
                  keep: list[Optional[torch.Tensor]], static: Optional[list[torch.Tensor]] = None,
                  **kwargs) -> list[GPTQResult]:
    """GPTQ of several layers under one Hessian as one sweep over their stacked rows.

    GPTQ's rows are independent given H (the column order, the inverse-Hessian factor and every
    update are per row), so this equals one sweep per layer up to float rounding, and pays the
    Hessian factorisation and the per-column Python work once: q/k/v and gate/up each become one sweep.
    """
    stacked_keep = torch.cat(keep) if keep[0] is not None else None
    static_scales = torch.cat(static) if static is not None else None
    result = gptq(torch.cat(ws), hessian, spec.bits, spec.group_size, keep=stacked_keep,
                  static_scales=static_scales, **kwargs)
    return result.split_rows([w.shape[0] for w in ws])


def compress_shared_input(weights: list[torch.Tensor], hessian: torch.Tensor, spec: CalibratedSpec,
                          names: list[str], cache: Optional[HessianCache] = None) -> list[tuple[PackedLayer, float]]:
    """`compress_with_hessian` for layers that read the same input (same `hessian`), in one go.

    The GPTQ sweeps of all of them run stacked (`_stacked_gptq`): one under H, and for
    GPTQ-intrinsic one more per distinct rank under the deflated Hessian.
    """
    checked = [_checked(w, spec, name) for w, name in zip(weights, names)]
    ws = [w for w, _ in checked]
    ranks = [r for _, r in checked]
    act_order = (spec.sparsity is None) if spec.act_order is None else spec.act_order
    keep = [wanda_mask(w, hessian, spec.sparsity) if spec.sparsity and spec.sparsity_criterion == "wanda" else None
            for w in ws]
    kwargs = dict(sparsity=spec.sparsity, act_order=act_order, scale_search=spec.scale_search,
                  refine_passes=spec.refine_passes)
    static = None
    if act_order and spec.method == "intrinsic" and any(ranks):  # both sweeps fix the same static scales
        static = [act_order_scales(w, hessian, spec.bits, spec.group_size, spec.scale_search) for w in ws]
    cache = cache if cache is not None else HessianCache()
    plain = _stacked_gptq(ws, hessian, spec, keep, static, damp=spec.damp,
                          factor=cache.sweep(hessian, spec.damp, act_order), **kwargs)
    eig = None
    if spec.method in ("intrinsic", "eora") and any(ranks):  # the low-rank fits of all layers share it
        eig = cache.eigh(hessian)
    deflated: dict[int, GPTQResult] = {}
    if spec.method == "intrinsic":
        for rank in sorted(set(r for r in ranks if r > 0)):
            members = [i for i, r in enumerate(ranks) if r == rank]
            results = _stacked_gptq([ws[i] for i in members], deflated_hessian(hessian, rank, spec.damp, eig), spec,
                                    [keep[i] for i in members], [static[i] for i in members] if static else None,
                                    damp=0.0, **kwargs)
            deflated.update(zip(members, results))
    out = []
    for i, (w, rank) in enumerate(zip(ws, ranks)):
        result, left, right = plain[i], None, None
        if rank > 0 and spec.method == "intrinsic":
            result, left, right = better_intrinsic(w, hessian, rank, deflated[i], plain[i], spec.damp, eig)
        elif rank > 0 and spec.method == "eora":
            left, right = whitened_lowrank(w - result.dequantized, hessian, rank, spec.damp, eig)
        elif rank > 0:
            u, s, vh = svd(w - result.dequantized)
            left, right = factors_from_svd(u, s, vh, rank)
        out.append(_pack(w, hessian, spec, rank, result, left, right))
    return out


def _pack(w: torch.Tensor, hessian: torch.Tensor, spec: CalibratedSpec, rank: int, result: GPTQResult,
          left: Optional[torch.Tensor], right: Optional[torch.Tensor]) -> tuple[PackedLayer, float]:
    n, k = w.shape
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
    return packed, _relative_output_error(w, approx, hessian)


def _relative_output_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """`‖X(W − Ŵ)ᵀ‖² / ‖X Wᵀ‖²`, the figure the report prints (no decision rests on it), with float32
    products: twice as fast as `output_error`'s float64 on every layer, and within 1e-3 of it (tested)."""
    h = hessian.to(torch.float32)
    d = w - approx
    denom = float(((w @ h) * w).sum(dtype=torch.float64))
    return float(((d @ h) * d).sum(dtype=torch.float64)) / denom if denom > 0 else 0.0
