"""GPTQ on our codebooks, with SparseGPT-style n:m masks, and the two ways to add a low-rank term.

All three minimise the layer output error `‖X Wᵀ − X (Q + L R)ᵀ‖²_F` for calibration inputs `X`,
seen only through `H = XᵀX` (K × K). Weights are `[N, K]` (out, in) as everywhere in the package.

- `gptq`: column-by-column quantization with error feedback through the inverse Hessian (Frantar
  et al.), lazy block updates, damping, optional act-order, per-group scales, optional joint n:m
  pruning (SparseGPT's saliency `w² / [H⁻¹]²_jj`, chosen per group just before it is quantized).
- `intrinsic_lowrank`: GPTQ-intrinsic LoRA (seed 003). Take the top-r eigenvectors `V_r` of H,
  run GPTQ on the *deflated* Hessian `H − V_r Λ_r V_rᵀ` (the part of the input the correction will
  not cover), then fit the correction. See docs/algorithms.md for the derivation.
- `whitened_lowrank`: the EoRA-style baseline — the best rank-r correction of a given residual under
  the output metric: SVD of `(W − Q) H^{1/2}`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..formats.codebooks import nf_table
from .rtn import nearest_nf, plain_scales
from .scales import search_scales
from .sparsity import PATTERNS


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [N, K] (dense positions; pruned positions hold an arbitrary code)
    scales: torch.Tensor  # float16 [N, K/g]
    keep: Optional[torch.Tensor]  # bool [N, K] or None
    dequantized: torch.Tensor  # float32 [N, K]: what the codes and scales represent (zeros where pruned)

    def split_rows(self, sizes: list[int]) -> list["GPTQResult"]:
        """The results of row blocks of `sizes` rows: GPTQ treats rows independently, so layers that
        share a Hessian can be swept as one stacked matrix and split afterwards."""
        parts = [t.split(sizes) if t is not None else [None] * len(sizes)
                 for t in (self.codes, self.scales, self.keep, self.dequantized)]
        return [GPTQResult(*(p.contiguous() if p is not None else None for p in fields)) for fields in zip(*parts)]


def gram(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """`xᵀx` (float32 `[K, K]`) of `x` `[T, K]`, computing only the upper block triangle.

    `H` is symmetric, so the blocks below the diagonal are copies: skipping them saves up to half
    the work of the biggest cost of calibration after the forward passes (measured 1.5x at K = 1536).
    """
    x = x.to(torch.float32)
    k = x.shape[1]
    if k <= block:
        return x.T @ x
    h = torch.empty(k, k, dtype=torch.float32, device=x.device)
    for i in range(0, k, block):
        h[i:i + block, i:] = x[:, i:i + block].T @ x[:, i:]
    upper = torch.triu(h)
    return upper + torch.triu(h, 1).T


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """`‖X (W − Ŵ)ᵀ‖²_F = tr((W − Ŵ) H (W − Ŵ)ᵀ)`."""
    d = (weight - approx).to(torch.float64)
    return float(((d @ hessian.to(torch.float64)) * d).sum())


def ridge_factor(hessian: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """(lower Cholesky factor of `H + λI`, λ = ridge · mean of H's live diagonal), what `float_targets`
    solves with; one per input, shared by the Linears that read it.

    float32 when `ridge >= 0.1`: the eigenvalues of `H + λI` then lie in `[λ, trace H + λ]`, a condition
    number of at most `K / ridge + 1`, so rounding costs the targets at most ~1e-4 relative at K = 1536
    (~1e-3 at K = 16k), far below the quantization error they are aimed at, and the solve runs about
    twice as fast as in float64 (SmolLM2: 3.4 s of the self-calibrated load). Smaller ridges keep float64.
    """
    h = hessian.to(torch.float32 if ridge >= 0.1 else torch.float64)
    k = h.shape[0]
    diag = torch.diagonal(h)
    live = diag > 0
    lam = ridge * float(diag[live].mean()) if bool(live.any()) else 1.0
    return torch.linalg.cholesky(h + lam * torch.eye(k, dtype=h.dtype, device=h.device)), lam


def float_targets(weights: list[torch.Tensor], crosses: list[torch.Tensor], hessian: torch.Tensor,
                  ridge: float, factor: Optional[tuple[torch.Tensor, float]] = None) -> list[torch.Tensor]:
    """The weights `W*` GPTQ should aim at so that the compressed layers reproduce the *float* model.

    Sequential GPTQ feeds each layer the inputs `X` that the compressed layers before it produce and
    fits `Q` to `X Wᵀ`: it reproduces what the float layer would do on those inputs, so the errors of
    earlier layers are carried forward, never undone. Aiming at the float model's own outputs
    `Y_f = X_f Wᵀ` instead (the asymmetric calibration of GPTAQ, Li et al. 2025), with `C = Y_fᵀ X`
    (`[N, K]`, equal to `W X_fᵀ X`; `crosses`) and `H = XᵀX`,

        ‖X Qᵀ − Y_f‖² = ‖(Q − W°) H^{1/2}‖² + const,   W° = C H⁻¹,

    so GPTQ, which minimises the right-hand form for a given target, runs unchanged on a new target.
    The target used is the ridge estimate `W* = (C + λW)(H + λI)⁻¹`, the minimiser of
    `‖X Qᵀ − Y_f‖² + λ‖Q − W‖²`, with `λ = ridge · mean(diag H)`. The ridge is what keeps `W*`
    honest: `C` and `H` come from a few thousand calibration tokens, and the part of `Y_f − X Wᵀ` that
    is not a linear function of `X` would otherwise be fitted as if it were (SmolLM2 at 4.25 bpw: a
    ridge of 1 % of the mean diagonal made perplexity worse than plain GPTQ, one of 100 % better;
    docs/calibrated.md). `crosses` and `hessian` must be normalised alike (both divided by the same
    token count, or neither). `factor` is `ridge_factor(hessian, ridge)`, if already at hand.
    """
    low, lam = factor if factor is not None else ridge_factor(hessian, ridge)
    rhs = torch.cat([c.to(low.dtype) + lam * w.to(low.dtype) for w, c in zip(weights, crosses)])
    targets = torch.cholesky_solve(rhs.T, low).T.to(torch.float32)
    return list(targets.split([w.shape[0] for w in weights]))


def _prepare_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.to(torch.float32).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = float(diag.mean())
    diag += damp * mean
    return h


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (what GPTQ's column updates need); damping is raised until it works.

    Formed without H⁻¹: with J the order reversal and `J H J = L Lᵀ`, `H⁻¹ = Uᵀ U` for the upper
    triangular `U = J L⁻¹ J`, so one Cholesky and one triangular inverse do it (2/3 K³ flops, where
    Cholesky, `cholesky_inverse` and a second Cholesky took 4/3 K³; SmolLM2's 120 factors: 3.0 s -> 2.4 s).
    """
    extra = 0.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = float(torch.diagonal(h).mean())
    flipped = torch.flip(h, (0, 1))
    for _ in range(8):
        low, info = torch.linalg.cholesky_ex(flipped + extra * mean * eye)
        if int(info) == 0:
            inv_low = torch.linalg.solve_triangular(low, eye, upper=False)
            if bool(torch.isfinite(inv_low).all()):
                return torch.flip(inv_low, (0, 1))
        extra = 0.01 if extra == 0 else extra * 4
    raise ValueError("the calibration Hessian is not positive definite even with heavy damping")


@dataclass
class SweepFactor:
    """The damped Hessian in sweep order, that order, and the upper Cholesky factor of its inverse."""

    h: torch.Tensor
    perm: torch.Tensor
    hinv: torch.Tensor
    act_order: bool


def sweep_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> SweepFactor:
    """What every GPTQ sweep of one Hessian needs first; the costly part is the inverse (O(K³))."""
    h = _prepare_hessian(hessian, damp)
    perm = torch.arange(h.shape[0], device=h.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        h = h[perm][:, perm]
    return SweepFactor(h=h, perm=perm, hinv=_inverse_cholesky_upper(h), act_order=act_order)


def _group_scale(w: torch.Tensor, keep: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    """Absmax scale of one group `[N, g]` (kept weights only), rounded to float16."""
    return plain_scales(w if keep is None else w * keep, bits).to(torch.float16)


def act_order_scales(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                     scale_search: bool) -> torch.Tensor:
    """The group scales of an act-order sweep, fixed up front (GPTQ's "static groups").

    With a permuted column order a group's columns are no longer processed together, so its scale
    comes from the original weights (inputs that never fire zeroed, as the sweep zeroes them).
    """
    w = weight.to(torch.float32).clone()
    w[:, torch.diagonal(hessian) <= 0] = 0.0
    n, k = w.shape
    if scale_search:
        return search_scales(w, bits, group_size)
    return _group_scale(w.view(n, k // group_size, group_size), None, bits)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sparsity: Optional[str] = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    keep: Optional[torch.Tensor] = None,
    scale_search: bool = False,
    static_scales: Optional[torch.Tensor] = None,
    refine_passes: int = 0,
    factor: Optional[SweepFactor] = None,
) -> GPTQResult:
    """Quantize `weight` `[N, K]` to minimise the output error under `hessian` `[K, K]`.

    With `sparsity`, the n:m mask is chosen inside the sweep (SparseGPT) unless a fixed `keep` mask
    (e.g. Wanda's) is given; pruned weights become exact zeros and their error is fed forward too.
    With `act_order`, `static_scales` (from `act_order_scales`) saves recomputing the group scales
    when the same weight is swept twice (GPTQ-intrinsic's plain and deflated sweeps).
    `refine_passes` > 0 then runs that many passes of coordinate descent on the codes (`_refine`).
    `factor` (from `sweep_factor` with the same hessian, damp and act_order) skips the Cholesky
    work when one Hessian serves several sweeps, e.g. the planner's one sweep per tier.
    """
    if act_order and sparsity:
        raise ValueError("act_order cannot be combined with sparsity (the n:m blocks must stay in column order)")
    w_full = weight.to(torch.float32).clone()
    n, k = w_full.shape
    if k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={group_size}")
    if factor is None:
        factor = sweep_factor(hessian, damp, act_order)
    elif factor.act_order != act_order or factor.perm.numel() != k:
        raise ValueError("factor was made for another act_order or layer width")
    h, perm, hinv = factor.h, factor.perm, factor.hinv
    dead = torch.diagonal(hessian) <= 0
    w_full[:, dead] = 0.0
    table = None if bits == 8 else nf_table(bits, torch.float32, weight.device)
    n_keep, m = PATTERNS[sparsity] if sparsity else (0, 1)

    if act_order:
        if static_scales is None:
            static_scales = act_order_scales(weight, hessian, bits, group_size, scale_search)
    else:
        static_scales = None
    w = w_full[:, perm]

    # Columns of W are the sweep's unit, so the sweep works on Wᵀ: every column is a contiguous row,
    # and the per-column error feedback is one rank-1 update (`addr_`) instead of strided writes.
    # Same arithmetic in another order; 1.7-2.8x faster on random layers, a SmolLM2 block 10-20 %
    # faster in all (docs/benchmarks.md).
    wt = w.t().contiguous()  # [K, N]
    w0t = wt.clone() if refine_passes else None  # the sweep updates wt in place
    codes_t = torch.zeros(k, n, dtype=torch.uint8, device=weight.device)
    q_t = torch.zeros(k, n, dtype=torch.float32, device=weight.device)
    scales = torch.zeros(n, k // group_size, dtype=torch.float16, device=weight.device)
    keep_all = torch.ones(n, k, dtype=torch.bool, device=weight.device) if sparsity else None
    block = max(block_size // group_size, 1) * group_size  # a group never straddles two blocks
    static_t = static_safe = None
    if static_scales is not None:  # per column in sweep order, fixed up front
        static_t = static_scales.to(torch.float32).t()[perm // group_size].contiguous()
        static_safe = torch.where(static_t == 0, torch.ones_like(static_t), static_t)

    c_sweep = _c_sweep_usable(sparsity, wt, hinv)
    if c_sweep:
        hinv = hinv.contiguous()  # torch's Cholesky factor comes column-major; C reads its rows
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = wt[b0:b1]  # a view: updated in place
        hinv1 = hinv[b0:b1, b0:b1]
        err1 = torch.empty_like(w1)
        if c_sweep:
            _c_block(w1, hinv1, err1, codes_t[b0:b1], q_t[b0:b1], b0, group_size, bits, scales, static_t, scale_search)
            if b1 < k:
                wt[b1:].addmm_(hinv[b0:b1, b1:].t(), err1, alpha=-1.0)
            continue
        safe = s = None
        for i in range(b1 - b0):
            col = b0 + i
            if static_t is not None:
                s, safe = static_t[col], static_safe[col]
            elif col % group_size == 0:
                group_w = w1[i:i + group_size].t()  # [N, g]
                keep_g = None
                if sparsity and keep is not None:
                    keep_g = keep[:, col:col + group_size]
                    keep_all[:, col:col + group_size] = keep_g
                elif sparsity:
                    sal = (group_w / torch.diagonal(hinv1)[i:i + group_size]) ** 2
                    sal = sal.reshape(n, group_size // m, m)
                    top = sal.topk(n_keep, dim=-1).indices
                    keep_g = torch.zeros_like(sal, dtype=torch.bool).scatter_(-1, top, True).view(n, group_size)
                    keep_all[:, col:col + group_size] = keep_g
                if scale_search and keep_g is None:
                    scale = search_scales(group_w.contiguous(), bits, group_size)[:, 0]
                else:
                    scale = _group_scale(group_w, keep_g, bits)
                scales[:, col // group_size] = scale
                s = scale.to(torch.float32)
                safe = torch.where(s == 0, torch.ones_like(s), s)
            x = w1[i] / safe
            if bits == 8:
                vals = x.round_().clamp_(-127, 127)
                codes_t[col] = vals.to(torch.int8).view(torch.uint8)
            else:
                c = nearest_nf(x, bits)
                codes_t[col] = c.to(torch.uint8)
                vals = table[c]
            q = vals.mul_(s)
            if sparsity:
                q = q.mul_(keep_all[:, col])
            q_t[col] = q
            e = torch.sub(w1[i], q, out=err1[i]).div_(hinv1[i, i])
            if i + 1 < b1 - b0:
                w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1.0)
        if b1 < k:
            wt[b1:].addmm_(hinv[b0:b1, b1:].t(), err1, alpha=-1.0)

    if refine_passes:
        if static_t is not None:
            scale_t = static_t
        else:
            scale_t = scales.to(torch.float32).t().repeat_interleave(group_size, 0).contiguous()
        keep_t = keep_all.t().contiguous() if sparsity else None
        _refine(w0t, h, codes_t, q_t, scale_t, keep_t, bits, refine_passes, block)
    codes, q_all = codes_t.t(), q_t.t()
    if act_order:
        inv = torch.argsort(perm)
        codes, q_all = codes[:, inv], q_all[:, inv]
        scales = static_scales
    return GPTQResult(codes=codes.contiguous(), scales=scales, keep=keep_all, dequantized=q_all.contiguous())


def _refine(wt: torch.Tensor, h: torch.Tensor, codes_t: torch.Tensor, q_t: torch.Tensor, scale_t: torch.Tensor,
            keep_t: Optional[torch.Tensor], bits: int, passes: int, block: int) -> None:
    """Coordinate descent on GPTQ's codes with the scales fixed (the QuantEase idea), in place.

    GPTQ decides each column once, against weights already shifted by the errors of earlier columns,
    and never revisits it. With `E = W − Q` and `G = E H`, the output error `tr(E H Eᵀ)` is, in one
    entry `e_nj` alone, a parabola with its minimum at `e_nj − G_nj / H_jj`; the best code for that
    entry is therefore the grid point nearest to `w_nj − e_nj + G_nj / H_jj`, and taking it can only
    lower the error. A pass visits every column once (all rows at once); `G` is kept exact inside a
    block of columns and brought up to date for the rest with one product per block, as GPTQ's lazy
    updates do. Works on the transposed layout of the sweep (row j = column j, in sweep order).
    `wt` `[K, N]`: the weights GPTQ started from; `h`: the (damped) Hessian GPTQ used, same order.
    """
    from ..kernels.cpu import gptq_sweep

    et = wt - q_t
    gt = h @ et
    k, n = et.shape
    use_c = gptq_sweep.available(wt, h)
    keep_u8 = keep_t.to(torch.uint8).contiguous() if keep_t is not None else None
    delta = torch.empty(min(block, k), n, dtype=torch.float32, device=wt.device)
    for _ in range(passes):
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            d = delta[:b1 - b0]
            h1 = h[b0:b1, b0:b1]
            if use_c:
                gptq_sweep.refine_columns(wt[b0:b1], et[b0:b1], gt[b0:b1], h1, scale_t[b0:b1],
                                          keep_u8[b0:b1] if keep_u8 is not None else None, bits, codes_t[b0:b1], d)
            else:
                _refine_block_torch(wt[b0:b1], et[b0:b1], gt[b0:b1], h1, scale_t[b0:b1],
                                    keep_t[b0:b1] if keep_t is not None else None, bits, codes_t[b0:b1], d)
            if b0 > 0:
                gt[:b0].addmm_(h[:b0, b0:b1], d)
            if b1 < k:
                gt[b1:].addmm_(h[b1:, b0:b1], d)
    vals = codes_t.view(torch.int8).to(torch.float32) if bits == 8 else nf_table(bits, torch.float32, wt.device)[codes_t.long()]
    q_t.copy_(vals * scale_t)  # exactly what the codes and scales represent
    if keep_t is not None:
        q_t.mul_(keep_t)


def _refine_block_torch(w1: torch.Tensor, e1: torch.Tensor, g1: torch.Tensor, h1: torch.Tensor, s1: torch.Tensor,
                        keep1: Optional[torch.Tensor], bits: int, codes1: torch.Tensor, delta: torch.Tensor) -> None:
    """One block of `_refine` in torch: the oracle of `sqlora_cd_columns` and its fallback."""
    table = None if bits == 8 else nf_table(bits, torch.float32, w1.device)
    for j in range(w1.shape[0]):
        d = h1[j, j]
        if float(d) <= 0:
            delta[j] = 0.0
            continue
        s = s1[j]
        x = (w1[j] - e1[j] + g1[j] / d) / torch.where(s == 0, torch.ones_like(s), s)
        if bits == 8:
            v = x.clamp(-127.5, 127.5).round().clamp(-127, 127)
            c = v.to(torch.int8).view(torch.uint8)
        else:
            c = nearest_nf(x, bits).to(torch.uint8)
            v = table[c.long()]
        en = w1[j] - v * s
        if keep1 is not None:
            c = torch.where(keep1[j], c, codes1[j])
            en = torch.where(keep1[j], en, e1[j])
        delta[j] = en - e1[j]
        e1[j] = en
        codes1[j] = c
        g1.addr_(h1[j], delta[j])


def _c_sweep_usable(sparsity: Optional[str], wt: torch.Tensor, hinv: torch.Tensor) -> bool:
    """Dense sweeps on the CPU run their per-column loop in C (kernels/cpu/gptq_sweep.py) when the
    library is built; the torch loop below is the fallback and the oracle it is tested against."""
    if sparsity:
        return False
    from ..kernels.cpu import gptq_sweep

    return gptq_sweep.available(wt, hinv)


def _c_block(w1: torch.Tensor, hinv1: torch.Tensor, err1: torch.Tensor, codes1: torch.Tensor, q1: torch.Tensor,
             b0: int, group_size: int, bits: int, scales: torch.Tensor, static_t: Optional[torch.Tensor],
             scale_search: bool) -> None:
    """One lazy block of the dense sweep in C: in one call with static (act-order) scales, else one
    call per group, whose scale is taken from the weights as updated so far, as the torch loop does."""
    from ..kernels.cpu.gptq_sweep import sweep_columns

    nb = w1.shape[0]
    if static_t is not None:
        sweep_columns(w1, hinv1, 0, nb, static_t[b0:b0 + nb], True, bits, codes1, q1, err1)
        return
    for i in range(0, nb, group_size):
        group_w = w1[i:i + group_size].t()  # [N, g]
        if scale_search:
            scale = search_scales(group_w.contiguous(), bits, group_size)[:, 0]
        else:
            scale = _group_scale(group_w, None, bits)
        scales[:, (b0 + i) // group_size] = scale
        sweep_columns(w1, hinv1, i, i + group_size, scale.to(torch.float32), False, bits, codes1, q1, err1)


Eigh = tuple[torch.Tensor, torch.Tensor]  # (eigenvalues ascending, eigenvectors), float64


def hessian_eigh(hessian: torch.Tensor) -> Eigh:
    """The eigen-decomposition of H, computed once and shared by the low-rank fits.

    float32 is enough: only the top eigenvectors are used as directions, and the small eigenvalues
    are clamped to the damping floor before anything is divided by them (4x faster than float64 at
    K = 1536, the largest cost of GPTQ-intrinsic LoRA after the two GPTQ sweeps).
    """
    return torch.linalg.eigh(hessian.to(torch.float32))


class HessianCache:
    """What the last Hessian costs to factor, kept so Linears that share an input (q/k/v, gate/up) pay
    for it once: its eigen-decomposition (the low-rank fits) and GPTQ's sweep factors (one per damping
    and column order). Keyed on the Hessian object itself, so a new Hessian drops the old entries."""

    def __init__(self) -> None:
        self._h: Optional[torch.Tensor] = None
        self._eig: Optional[Eigh] = None
        self._factors: dict[tuple[float, bool], SweepFactor] = {}

    def _use(self, hessian: torch.Tensor) -> None:
        if self._h is not hessian:
            self._h, self._eig, self._factors = hessian, None, {}

    def eigh(self, hessian: torch.Tensor) -> Eigh:
        self._use(hessian)
        if self._eig is None:
            self._eig = hessian_eigh(hessian)
        return self._eig

    def sweep(self, hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> SweepFactor:
        self._use(hessian)
        key = (float(damp), bool(act_order))
        if key not in self._factors:
            self._factors[key] = sweep_factor(hessian, damp, act_order)
        return self._factors[key]


def top_eigvecs(hessian: torch.Tensor, rank: int, eig: Optional[Eigh] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues desc [r], eigenvectors [K, r]) of the symmetric `hessian`."""
    evals, evecs = eig if eig is not None else hessian_eigh(hessian)
    order = torch.argsort(evals, descending=True)[:rank]
    return evals[order].to(torch.float32), evecs[:, order].to(torch.float32)


def whitened_lowrank(residual: torch.Tensor, hessian: torch.Tensor, rank: int, damp: float = 0.01,
                     eig: Optional[Eigh] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r `L R` for `‖X (E − L R)ᵀ‖` (EoRA / QERA): SVD of `E H^{1/2}`, mapped back by `H^{-1/2}`.

    Returned sorted by singular value, balanced, float32: `L [N, r]`, `R [r, K]`.
    """
    evals, evecs = eig if eig is not None else hessian_eigh(hessian)
    evals = evals.clamp_min(damp * float(evals.clamp_min(0).mean()) + 1e-12)
    residual = residual.to(evals.dtype)
    root = evecs * evals.sqrt()  # H^{1/2} = V Λ^{1/2} Vᵀ; E V Λ^{1/2} has the same singular values
    inv_root_t = (evecs / evals.sqrt()).T  # Λ^{-1/2} Vᵀ
    u, s, vh = _top_singular_triplets(residual @ root, rank)
    sq = s.sqrt()
    left = u * sq
    right = (sq.unsqueeze(1) * vh) @ inv_root_t
    return left.to(torch.float32), right.to(torch.float32)


def _top_singular_triplets(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_rᵀ) of `m`, largest first, from the eigen-decomposition of its smaller Gram matrix
    in float64: only `rank` (≤ 32) triplets are needed, and this is 2–4x cheaper than a full SVD of a
    1536 × 576 matrix. Directions whose singular value is ~0 are dropped to zero (they add nothing)."""
    m64 = m.to(torch.float64)
    n, k = m64.shape
    small = m64.T @ m64 if k <= n else m64 @ m64.T
    evals, evecs = torch.linalg.eigh(small)
    evals, evecs = evals.flip(0)[:rank].clamp_min(0), evecs.flip(1)[:, :rank]
    s = evals.sqrt()
    floor = 1e-12 * float(s[0]) if s.numel() else 0.0
    inv = torch.where(s > floor, 1.0 / s.clamp_min(floor + 1e-300), torch.zeros_like(s))
    if k <= n:
        v = evecs
        u = (m64 @ v) * inv
    else:
        u = evecs
        v = (m64.T @ u) * inv
    return u.to(m.dtype), s.to(m.dtype), v.T.to(m.dtype)


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, sparsity: str) -> torch.Tensor:
    """Wanda's cheap n:m score `|w_ij| · ‖x_j‖` (‖x_j‖² is H's diagonal): no weight update needed."""
    from .sparsity import nm_mask

    score = weight.abs().to(torch.float32) * torch.diagonal(hessian).clamp_min(0).sqrt().to(torch.float32)
    return nm_mask(weight, sparsity, score=score)


def deflated_hessian(hessian: torch.Tensor, rank: int, damp: float, eig: Eigh) -> torch.Tensor:
    """`H − V_r Λ_r V_rᵀ + damp·mean(diag H)·I`: what GPTQ sees in GPTQ-intrinsic LoRA.

    The deflated Hessian is singular along V_r; it is damped relative to the *original* scale so
    GPTQ still treats those directions as (nearly) free rather than ill-posed.
    """
    evals, vr = top_eigvecs(hessian, rank, eig)
    deflated = hessian.to(torch.float32) - (vr * evals) @ vr.T
    deflated = (deflated + deflated.T) / 2
    mean = float(torch.diagonal(hessian).mean())
    deflated += damp * mean * torch.eye(deflated.shape[0], dtype=deflated.dtype, device=deflated.device)
    return deflated


def better_intrinsic(weight: torch.Tensor, hessian: torch.Tensor, rank: int, deflated: GPTQResult,
                     plain: GPTQResult, damp: float, eig: Eigh) -> tuple[GPTQResult, torch.Tensor, torch.Tensor]:
    """Refit the optimal rank-r correction for both GPTQ results and keep the better layer.

    The deflated objective is a bound, not the error itself: when the input spectrum is flat, Q
    tuned to the full Hessian can end up better after the same optimal refit. Keeping the better
    one makes the layer error never exceed "GPTQ, then the best correction".
    """
    w = weight.to(torch.float32)
    left, right = whitened_lowrank(w - deflated.dequantized, hessian, rank, damp, eig)
    pl, pr = whitened_lowrank(w - plain.dequantized, hessian, rank, damp, eig)
    if output_error(w, plain.dequantized + pl @ pr, hessian) < output_error(w, deflated.dequantized + left @ right, hessian):
        return plain, pl, pr
    return deflated, left, right


def intrinsic_lowrank(weight: torch.Tensor, hessian: torch.Tensor, rank: int, bits: int, group_size: int,
                      sparsity: Optional[str] = None, damp: float = 0.01, act_order: bool = False,
                      keep: Optional[torch.Tensor] = None, scale_search: bool = False,
                      eig: Optional[Eigh] = None) -> tuple[GPTQResult, torch.Tensor, torch.Tensor]:
    """GPTQ-intrinsic LoRA: GPTQ on the deflated Hessian, then the correction.

    With `V_r` the top-r eigenvectors of H, the correction `L R` with `R = V_rᵀ` and `L = (W − Q) V_r`
    removes the error of every input direction in span(V_r) exactly, whatever Q is. So Q only has to
    be good on the rest of the input space, i.e. under `H_r = H − V_r Λ_r V_rᵀ`: that is the Hessian
    GPTQ gets. Finally the correction is refitted optimally for the Q found (`whitened_lowrank`), which
    can only lower the error further (it is the best rank-r term for that Q, the V_r choice included),
    and compared with plain GPTQ plus its own refit (`better_intrinsic`).
    """
    eig = eig if eig is not None else hessian_eigh(hessian)
    w = weight.to(torch.float32)
    kwargs = dict(sparsity=sparsity, act_order=act_order, keep=keep, scale_search=scale_search)
    if act_order:  # both sweeps fix the same static scales
        kwargs["static_scales"] = act_order_scales(w, hessian, bits, group_size, scale_search)
    deflated = gptq(w, deflated_hessian(hessian, rank, damp, eig), bits, group_size, damp=0.0, **kwargs)
    plain = gptq(w, hessian, bits, group_size, damp=damp, **kwargs)
    return better_intrinsic(w, hessian, rank, deflated, plain, damp, eig)
