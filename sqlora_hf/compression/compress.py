"""Compress one weight matrix into a `PackedLayer`: the data-free pipeline used at load time.

Order of work: (1) choose the sparsity mask, (2) quantize the kept weights per group with searched
scales, (3) pick the rank of the correction from the residual (or take the one asked for), (4)
alternate quantization and low-rank refit (quantization-aware SVD). The correction absorbs
everything the first steps lost, `W − Ŵ`, pruned weights included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..formats.layer import PackedLayer, layout_problem
from ..formats.packing import pack_codes, pack_mask
from .qasvd import QuantizedWeight, quantize_with_correction
from .rank_rules import residual_spectrum_rank, stable_rank_rule
from .sparsity import nm_mask

RANK_RULES = ("residual", "stable")


@dataclass(frozen=True)
class CompressionSpec:
    """What to do to one layer.

    `rank` is an int (0 = none) or "auto" (chosen by `rank_rule`, never costing more than
    `max_rank_bpw` extra bits per weight). `scale_search` searches MSE-better group scales instead of
    absmax; `qa_iterations` alternations of quantization-aware SVD follow the first fit (0 = plain
    SVD of the residual). `stable_epsilon` is ε of the stable-rank rule (`||W − W_r||_2 ≤ √ε·σ_1`).
    """

    bits: int = 4
    group_size: int = 64
    sparsity: Optional[str] = None
    rank: Union[int, str] = 0
    max_rank_bpw: float = 0.25
    rank_rule: str = "residual"
    scale_search: bool = False
    qa_iterations: int = 2
    stable_epsilon: float = 0.5


def auto_rank_cap(rows: int, cols: int, max_rank_bpw: float) -> int:
    """Largest rank whose float16 factors cost at most `max_rank_bpw` bits per weight."""
    return int(max_rank_bpw * rows * cols // (16 * (rows + cols)))


def check_spec(weight: torch.Tensor, spec: CompressionSpec, name: str) -> torch.Tensor:
    """The weight as fp32 `[N, K]`, or a ValueError naming `name` and what is wrong."""
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
    if isinstance(spec.rank, bool) or not (spec.rank == "auto" or isinstance(spec.rank, int)):
        raise ValueError(f"{name}: rank={spec.rank!r}; allowed: \"auto\" or an int >= 0")
    if isinstance(spec.rank, int) and not 0 <= spec.rank <= min(n, k):
        raise ValueError(f"{name}: rank={spec.rank} is larger than the layer allows (min(out, in) = {min(n, k)})")
    if spec.rank_rule not in RANK_RULES:
        raise ValueError(f"{name}: rank_rule={spec.rank_rule!r}; allowed: {', '.join(RANK_RULES)}")
    if not isinstance(spec.qa_iterations, int) or spec.qa_iterations < 0:
        raise ValueError(f"{name}: qa_iterations={spec.qa_iterations!r}; allowed: an int >= 0")
    return w


def choose_rank(w: torch.Tensor, dense_q: torch.Tensor, spec: CompressionSpec) -> int:
    """The rank `spec` asks for; for "auto", the rank rule's choice under the `max_rank_bpw` cap."""
    if spec.rank != "auto":
        return int(spec.rank)
    n, k = w.shape
    cap = min(auto_rank_cap(n, k, spec.max_rank_bpw), min(n, k))
    if cap == 0:
        return 0
    if spec.rank_rule == "stable":
        return stable_rank_rule(w, spec.stable_epsilon, cap)
    residual = w - dense_q
    energy = float((residual.to(torch.float64) ** 2).sum())
    top = top_singular_values(residual, cap)
    return residual_spectrum_rank(top, n, k, cap, residual_energy=energy)


def top_singular_values(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` largest singular values (randomized with power iterations on large matrices)."""
    if min(matrix.shape) <= 4 * (count + 8):
        return torch.linalg.svdvals(matrix)[:count]
    torch.manual_seed(0)  # reproducible plans
    _, s, _ = torch.svd_lowrank(matrix, q=count + 8, niter=4)
    return s[:count]


def quantize_weight(weight: torch.Tensor, spec: CompressionSpec, name: str = "layer",
                    keep: Optional[torch.Tensor] = None) -> tuple[QuantizedWeight, Optional[torch.Tensor]]:
    """(quantized weight with its correction and error history, keep-mask) for a checked spec."""
    w = check_spec(weight, spec, name)
    if spec.sparsity and keep is None:
        keep = nm_mask(w, spec.sparsity)
    group_len = spec.group_size // 2 if spec.sparsity else spec.group_size
    try:
        first = quantize_with_correction(w, spec.bits, group_len, 0, keep, 0, spec.scale_search)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    rank = choose_rank(w, first.dense_quantized, spec)
    if rank == 0:
        return first, keep
    result = quantize_with_correction(w, spec.bits, group_len, rank, keep, spec.qa_iterations,
                                      spec.scale_search, initial=first)
    return result, keep


def pack_result(q: QuantizedWeight, spec: CompressionSpec, shape: tuple[int, int],
                keep: Optional[torch.Tensor]) -> PackedLayer:
    n, k = shape
    return PackedLayer(
        qmeta=PackedLayer.make_meta(spec.bits, spec.group_size, spec.sparsity, n, k, q.rank),
        qcodes=pack_codes(q.codes, spec.bits),
        qscales=q.scales.contiguous(),
        qmask=pack_mask(keep) if keep is not None else None,
        lowrank_l=q.left.contiguous() if q.left is not None else None,
        lowrank_r=q.right.contiguous() if q.right is not None else None,
    )


def compress_weight(weight: torch.Tensor, spec: CompressionSpec, name: str = "layer") -> PackedLayer:
    """Compress a dense `[N, K]` weight. Raises ValueError naming `name` on bad input.

    The packed layer carries `relative_error` = `||W − Ŵ − L·R||_F / ||W||_F` as an attribute (the
    report shows it).
    """
    q, keep = quantize_weight(weight, spec, name)
    layer = pack_result(q, spec, tuple(weight.shape), keep)
    layer.relative_error = relative_error(weight, q.squared_error)
    return layer


def relative_error(weight: torch.Tensor, squared_error: float) -> float:
    norm2 = float((weight.detach().to(torch.float64) ** 2).sum())
    return (squared_error / norm2) ** 0.5 if norm2 > 0 else 0.0
