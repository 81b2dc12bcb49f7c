"""The memory-budget planner (MLoRQ / LQ-LoRA style): one configuration per layer, least total error.

Per layer there are candidate configurations (bits, group size, rank, sparsity), each with an exact
byte cost and an estimated error. A candidate that costs more *and* errs more than another is never
worth choosing, so each layer keeps only its Pareto front. Choosing one candidate per layer so the
bytes fit and the summed error is least is a multiple-choice knapsack; it is solved exactly by
dynamic programming over bytes, in units of `unit` bytes with every cost rounded *up* (so the
plan can never exceed the real budget). With `unit = 1` the solution is exactly optimal; a coarser
unit is optimal for the rounded costs and loses at most `layers × unit` bytes of budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One way to store one layer: its settings, exact bytes and estimated error."""

    bits: int
    group_size: int
    rank: int
    sparsity: Optional[str]
    nbytes: int
    error: float
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def label(self) -> str:
        sp = f" {self.sparsity}" if self.sparsity else ""
        return f"{self.bits}b g{self.group_size} r{self.rank}{sp}"


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both bytes and error, sorted by bytes ascending."""
    ordered = sorted(candidates, key=lambda c: (c.nbytes, c.error))
    front: list[Candidate] = []
    for c in ordered:
        if not front or c.error < front[-1].error:
            front.append(c)
    return front


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Budget:
    """A parsed `memory_budget`: either whole-model bytes or average bits per compressed weight."""

    total_bytes: Optional[int] = None
    bits_per_weight: Optional[float] = None
    auto: bool = False  # "auto": the bytes of the uniform configuration, spent where they help most

    def layer_bytes(self, n_weights: int, fixed_bytes: int) -> int:
        """Bytes left for the compressed layers (qmeta, codes, scales, masks, factors)."""
        if self.bits_per_weight is not None:
            return int(self.bits_per_weight * n_weights // 8)
        return int(self.total_bytes) - fixed_bytes

    def describe(self) -> str:
        if self.auto:
            return "auto"
        if self.bits_per_weight is not None:
            return f"{self.bits_per_weight:g} bits per weight"
        return f"{self.total_bytes} bytes"


def parse_budget(value: Any, field_name: str = "memory_budget") -> Budget:
    """`320_000_000`, `"320MB"`, `"1.5GiB"` (whole model) or `"3.25bpw"` (average bits per weight)."""
    allowed = 'None (no planning), "auto", an int number of bytes > 0, a size string such as "320MB" / "1.5GiB", or "3.25bpw" (2.25 to 16)'
    if isinstance(value, bool):
        raise ValueError(f"SQLoRAConfig.{field_name}={value!r} is not valid; allowed: {allowed}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"SQLoRAConfig.{field_name}={value!r} is not valid; allowed: {allowed}")
        return Budget(total_bytes=value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text == "auto":
            return Budget(auto=True)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)bpw", text, flags=re.IGNORECASE)
        if m:
            bpw = float(m.group(1))
            if not 2.25 <= bpw <= 16:
                raise ValueError(f"SQLoRAConfig.{field_name}={value!r} is not valid; allowed: {allowed}")
            return Budget(bits_per_weight=bpw)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]I?B|B)", text, flags=re.IGNORECASE)
        if m and float(m.group(1)) > 0:
            return Budget(total_bytes=int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]))
    raise ValueError(f"SQLoRAConfig.{field_name}={value!r} is not valid; allowed: {allowed}")


class BudgetError(ValueError):
    """The budget cannot be met; the message says the least achievable."""


def budget_advice(tiers, rank, sparsity) -> str:
    """What would let a budget that cannot be met be met, given what the config fixed."""
    ways = []
    if min(tiers) > 2:
        ways.append("allow smaller tiers (e.g. tiers=[2, 3, 4, 8])")
    if isinstance(rank, int) and rank > 0:
        ways.append(f"use rank='auto' or 0 (a fixed rank={rank} gives every layer its L·R factors)")
    if sparsity is None:
        ways.append('add sparsity="4:8" (it costs quality)')
    ways.append("raise the budget")
    return "To meet it: " + ", or ".join(ways)


def solve_budget(fronts: Sequence[Sequence[Candidate]], budget_bytes: int,
                 resolution: int = 100_000) -> list[int]:
    """Index of the chosen candidate per layer: total bytes <= `budget_bytes`, least summed error.

    Exact multiple-choice knapsack by dynamic programming over byte units; the unit is
    `ceil(budget / resolution)` bytes (1 byte for small problems, where it is exactly optimal).
    Raises `BudgetError` with the least achievable bytes when even the smallest candidates do not fit.
    """
    if not fronts:
        return []
    least = sum(min(c.nbytes for c in f) for f in fronts)
    if least > budget_bytes:
        raise BudgetError(f"the budget allows {budget_bytes} bytes for the compressed layers, "
                          f"but the smallest configuration of every layer needs {least} bytes")
    unit = max(1, -(-budget_bytes // resolution))
    cap = budget_bytes // unit
    inf = np.inf
    best = np.full(cap + 1, inf)  # best[b] = least error using exactly <= b units so far
    best[0:] = 0.0
    choices = np.zeros((len(fronts), cap + 1), dtype=np.int16)
    for layer, front in enumerate(fronts):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, c in enumerate(front):
            cost = -(-c.nbytes // unit)
            if cost > cap:
                continue
            shifted = np.full(cap + 1, inf)
            shifted[cost:] = best[: cap + 1 - cost] + c.error
            improve = shifted < new
            new[improve] = shifted[improve]
            pick[improve] = j
        best = new
        choices[layer] = pick
    if not np.isfinite(best[cap]):
        # Rounding costs up made the smallest configurations overflow: retry with finer units.
        if unit > 1:
            return solve_budget(fronts, budget_bytes, resolution * 4)
        raise BudgetError(f"no combination of layer configurations fits {budget_bytes} bytes")
    out = [0] * len(fronts)
    b = cap
    for layer in range(len(fronts) - 1, -1, -1):
        j = int(choices[layer, b])
        out[layer] = j
        b -= -(-fronts[layer][j].nbytes // unit)
    return out


# ---- candidates of one layer ----------------------------------------------------------------------

QMETA_BYTES = 32
PLAN_GROUP_SIZES = (32, 64, 128, 256)
PLAN_RANKS = (8, 16, 32, 64)


def layer_bytes(rows: int, cols: int, bits: int, group_size: int, rank: int, sparsity: Optional[str]) -> int:
    """Exact storage of one packed layer (docs/format.md): qmeta, codes, scales, mask, factors."""
    stored = cols // 2 if sparsity else cols
    codes = rows * stored * bits // 8
    scales = rows * (cols // group_size) * 2
    mask = rows * cols // 8 if sparsity else 0
    return QMETA_BYTES + codes + scales + mask + 2 * rank * (rows + cols)


def nominal_bits_per_weight(bits: int, group_size: int, sparsity: Optional[str]) -> float:
    """Bits per weight of a layout without metadata (the docs/format.md table): codes, scales, mask."""
    return (bits / 2 + 1 if sparsity else bits) + 16 / group_size


def auto_target_bytes(rows: int, cols: int, bits: int, group_size: int, sparsity: Optional[str],
                      rank: Any) -> int:
    """One layer's share of the default "auto" budget: its nominal layout without metadata, plus the
    factors of a pinned int rank (`rank="auto"` adds nothing). Data-free and calibrated "auto" plans
    both aim at the sum of these, paying the metadata with coarser groups."""
    pinned = rank if isinstance(rank, int) else 0
    return int(nominal_bits_per_weight(bits, group_size, sparsity) * rows * cols // 8) + 2 * pinned * (rows + cols)


def layer_candidates(weight: "torch.Tensor", tiers: Sequence[int], sparsity: Optional[str],
                     rank: Any, max_rank_bpw: float = 0.25, sample_every: int = 4,
                     scale_search: bool = True, min_group_size: int = 0) -> list[Candidate]:
    """Candidates (bits × group size × rank) of one `[N, K]` layer with exact bytes and estimated error.

    The error estimate is the relative squared error `||W − Ŵ − L·R||² / ||W||²` (HIGGS' linearity
    view with equal layer weights, since there is no data to weigh layers). Quantization error is
    measured on every `sample_every`-th row (rows are quantized independently, so the sample is an
    unbiased estimate at a fraction of the cost). A rank-r correction's gain is the energy of the top
    r singular values of the full residual at the bulk tier (4 bits, or the nearest), applied to
    every quantization of the layer in proportion to its error: the residual is noise-like, so its
    top directions hold about the same share of the energy whatever the grid. Group sizes below
    `min_group_size` are left out.
    """
    import torch

    from .compress import top_singular_values
    from .rtn import dequantize_groups, quantize_groups
    from .scales import search_scales
    from .sparsity import compact, expand, nm_mask

    from ..formats.layer import layout_problem

    w = weight.detach().to(torch.float32)
    n, k = w.shape
    norm2 = float((w.double() ** 2).sum()) or 1.0
    keep = nm_mask(w, sparsity) if sparsity else None
    sample = w[::sample_every]
    sample_keep = keep[::sample_every] if keep is not None else None
    pruned2 = float((w[~keep].double() ** 2).sum()) if keep is not None else 0.0
    stored = compact(sample, sample_keep) if keep is not None else sample
    scale_factor = n / sample.shape[0]
    out: list[Candidate] = []
    quant_err: dict[tuple[int, int], float] = {}
    for bits in tiers:
        for g in PLAN_GROUP_SIZES:
            if g < min_group_size or layout_problem(bits, g, sparsity, k):
                continue
            gl = g // 2 if sparsity else g
            scales = search_scales(stored, bits, gl) if scale_search else None
            codes, s16 = quantize_groups(stored, bits, gl, scales)
            err = float(((stored - dequantize_groups(codes, s16, bits)).double() ** 2).sum()) * scale_factor
            quant_err[(bits, g)] = err + pruned2
    if not quant_err:
        return out
    if rank == "auto":
        cap = min(int(max_rank_bpw * n * k // (16 * (n + k))), min(n, k))
        ranks = [0] + [r for r in PLAN_RANKS if r <= cap]
    else:
        ranks = [int(rank)]  # a pinned rank is kept: the planner only chooses the grid
    share: dict[int, float] = {0: 0.0}
    if max(ranks) > 0:
        bulk = min(quant_err, key=lambda bg: (abs(bg[0] - 4), bg[1] != 64, bg[1]))
        bits, g = bulk
        gl = g // 2 if sparsity else g
        full = compact(w, keep) if keep is not None else w
        scales = search_scales(full, bits, gl) if scale_search else None
        codes, s16 = quantize_groups(full, bits, gl, scales)
        q = dequantize_groups(codes, s16, bits)
        residual = w - (expand(q, keep) if keep is not None else q)
        energy = float((residual.double() ** 2).sum()) or 1.0
        top = top_singular_values(residual, max(ranks)).double() ** 2
        for r in ranks:
            share[r] = float(top[:r].sum()) / energy
    for (bits, g), err in quant_err.items():
        for r in ranks:
            out.append(Candidate(bits, g, r, sparsity, layer_bytes(n, k, bits, g, r, sparsity),
                                 err * (1.0 - share[r]) / norm2))
    return out


# ---- candidates of one layer, with calibration data (issue: calibrated budget) --------------------

CALIBRATED_PLAN_RANKS = (4, 8, 16, 32)


def _whitened_energy(residual: "torch.Tensor", hessian: "torch.Tensor", count: int) -> "torch.Tensor":
    """The `count` largest `σᵢ²` of `E H^{1/2}`: the output error a rank-i correction removes.

    With `H = C Cᵀ` (Cholesky, lightly damped), `E C` has the same singular values as `E H^{1/2}`;
    its top ones come from a randomized SVD.
    """
    import torch

    from .compress import top_singular_values

    e, h = residual.to(torch.float32), hessian.to(torch.float32)
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    jitter = 1e-5 * float(torch.diagonal(h).mean()) + 1e-12
    # A Hessian from fewer tokens than inputs (short windows: 16 x 32 tokens for a 1536-wide layer) is
    # singular, and fp32 rounding can leave it just short of positive definite: raise the jitter until
    # the factorisation goes through (it only has to rank candidates).
    for _ in range(8):
        c, info = torch.linalg.cholesky_ex(h + jitter * eye)
        if int(info) == 0:
            return top_singular_values(e @ c, count).double() ** 2
        jitter *= 10
    raise ValueError("the calibration Hessian is not positive definite even with heavy damping")


def _row_weighted_error(e: "torch.Tensor", h: "torch.Tensor", row_weight: "torch.Tensor") -> float:
    """`Σ_n w_n (E H Eᵀ)_nn`: each output row's error on the calibration inputs, weighted."""
    return float((((e @ h) * e).sum(1) * row_weight).sum())


def _scale_by_gptq(quant_err: dict[tuple[int, int], float], ws: "torch.Tensor", keep: Optional["torch.Tensor"],
                   h: "torch.Tensor", row_weight: "torch.Tensor", sparsity: Optional[str],
                   cache: Optional["HessianCache"] = None) -> None:
    """Scale each tier's round-to-nearest errors by what GPTQ actually leaves of them on this layer."""
    from .gptq import HessianCache, gptq

    cache = cache if cache is not None else HessianCache()
    factor = cache.sweep(h, act_order=not sparsity)  # one inverse serves every tier (and q/k/v's shared H)
    for bits in sorted({b for b, _ in quant_err}):
        g = min(gg for b, gg in quant_err if b == bits)
        r = gptq(ws, h, bits, g, sparsity=sparsity, keep=keep, act_order=not sparsity, factor=factor)
        err = _row_weighted_error(ws - r.dequantized, h, row_weight)
        rtn = quant_err[(bits, g)]
        ratio = min(err / rtn, 1.0) if rtn > 0 else 1.0
        for key in [k for k in quant_err if k[0] == bits]:
            quant_err[key] *= ratio


def hessian_candidates(weight: "torch.Tensor", hessian: "torch.Tensor", tiers: Sequence[int],
                       sparsity: Optional[str], rank: Any, max_rank_bpw: float = 0.25,
                       sample_every: int = 4, sensitivity: Optional["torch.Tensor"] = None,
                       gptq_ratio: bool = True, cache: Optional["HessianCache"] = None) -> list[Candidate]:
    """Candidates (bits × group size × rank) of one `[N, K]` layer, errors measured on the layer output.

    The error of a candidate is the relative output error `tr(E H Eᵀ) / tr(W H Wᵀ)` of its
    round-to-nearest quantization `E = W − Q` under the calibration Hessian `H = XᵀX` (MLoRQ's
    activation-aware error), estimated on every `sample_every`-th row (rows are quantized
    independently). Sparse layers use Wanda's mask.

    With `gptq_ratio` (the default) each tier's errors are then multiplied by what GPTQ leaves of
    them on this layer: one GPTQ sweep per tier (act order when dense, the tier's smallest group)
    on the sampled rows, its error over the round-to-nearest one, capped at 1 (`cache`, a
    `gptq.HessianCache`, lets layers that share a Hessian object share its inverse). The knapsack sums
    errors across layers, and GPTQ does not lower them by a common factor: on SmolLM2 the ratio
    runs from 0.01 (block 0 o_proj) to 0.38 (some MLP layers), and 2-bit gains more than 4-bit in
    some layers and less in others (docs/calibrated.md). Cost: one Hessian inverse per layer
    (`sweep_factor`, shared by the tiers) and one sweep per tier, +7 s of 75 s planning at 3.0 bpw.

    With `sensitivity` (`[N]`, the mean squared loss gradient at each output channel, see
    `budget.output_sensitivity`) the error is instead `Σ_n f_n (E H Eᵀ)_nn`, about twice the loss a
    candidate is expected to add, so errors of different layers are in one unit: summing relative
    errors treats a 1 % error in a layer the loss barely feels like a 1 % error in one it feels
    strongly. Measured on SmolLM2 (docs/calibrated.md): 2.48x → 1.68–1.71x perplexity at 3.0 bpw;
    at 4.25 bpw 1.069x → 1.057–1.062x, inside the plan-to-plan spread.

    A rank-r correction is credited with the *smaller* of two shares of the bulk (4-bit) residual:
    its top r whitened singular values² (`_whitened_energy`: the output error it removes on the
    calibration text) and its top r plain singular values². The whitened share alone over-credits
    ranks on SmolLM2: a few tokens with huge activations dominate `H`, a rank-4 term removes
    their error, and the planner then gave 2-bit grids to most q and gate projections (perplexity
    15x at 3.0 bits per weight). The share is applied to every grid of the layer in proportion.
    """
    import torch

    from .compress import top_singular_values
    from .gptq import wanda_mask
    from .rtn import dequantize_groups, quantize_groups
    from .sparsity import compact, expand

    from ..formats.layer import layout_problem

    w = weight.detach().to(torch.float32)
    h = hessian.to(torch.float32)
    n, k = w.shape
    keep = wanda_mask(w, h, sparsity) if sparsity else None
    rows = slice(None, None, sample_every)
    ws, ks = w[rows], (keep[rows] if keep is not None else None)
    if sensitivity is None:
        row_weight = torch.ones(ws.shape[0], device=w.device)
        norm = float(((ws @ h) * ws).sum()) or 1.0
    else:
        row_weight = sensitivity.to(device=w.device, dtype=torch.float32)[rows]
        norm = 1.0 / sample_every
    stored = compact(ws, ks) if ks is not None else ws
    quant_err: dict[tuple[int, int], float] = {}
    for bits in tiers:
        for g in PLAN_GROUP_SIZES:
            if layout_problem(bits, g, sparsity, k):
                continue
            codes, s16 = quantize_groups(stored, bits, g // 2 if sparsity else g)
            q = dequantize_groups(codes, s16, bits)
            e = ws - (expand(q, ks) if ks is not None else q)
            quant_err[(bits, g)] = _row_weighted_error(e, h, row_weight)
    if not quant_err:
        return []
    if gptq_ratio:
        _scale_by_gptq(quant_err, ws, ks, h, row_weight, sparsity, cache)
    if rank == "auto":
        cap = min(int(max_rank_bpw * n * k // (16 * (n + k))), min(n, k))
        ranks = [0] + [r for r in CALIBRATED_PLAN_RANKS if r <= cap]
    else:
        ranks = [int(rank)]
    share = {0: 0.0}
    if max(ranks) > 0:
        bits, g = min(quant_err, key=lambda bg: (abs(bg[0] - 4), bg[1] != 64, bg[1]))
        full = compact(w, keep) if keep is not None else w
        codes, s16 = quantize_groups(full, bits, g // 2 if sparsity else g)
        q = dequantize_groups(codes, s16, bits)
        e = w - (expand(q, keep) if keep is not None else q)
        plain = top_singular_values(e, max(ranks)).double() ** 2
        plain_total = float((e.double() ** 2).sum()) or 1.0
        if sensitivity is not None:  # the correction's gain on the sensitivity-weighted output error
            e = e * sensitivity.to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()[:, None]
        whitened = _whitened_energy(e, h, max(ranks))
        whitened_total = float(((e @ h) * e).sum()) or 1.0
        for r in ranks:
            share[r] = min(float(whitened[:r].sum()) / whitened_total, float(plain[:r].sum()) / plain_total, 1.0)
    return [Candidate(bits, g, r, sparsity, layer_bytes(n, k, bits, g, r, sparsity), err * (1.0 - share[r]) / norm)
            for (bits, g), err in quant_err.items() for r in ranks]
