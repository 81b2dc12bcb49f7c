"""Round-to-nearest in C for the compressors (`sqlora_nearest_codes`, `sqlora_scale_errors` in
csrc/sqlora_cpu.c).

`torch.bucketize` finds a nearest level by binary search at about 15 ns a value on this project's
2-core dev VM, and the scale search (`compression/scales.py`) runs it ten times over every weight of
every layer GPTQ compresses: 14 of the 300 seconds of SmolLM2's calibrated compression went there.
These loops choose the same codes bit for bit (the same division, then the number of midpoints below
the clamped value), so the torch code stays the oracle they are tested against and the fallback when
the library is missing or `SQLORA_GPTQ_SWEEP=torch` is set.
"""
from __future__ import annotations

from typing import Optional

import torch

from .gptq_sweep import _levels, available
from .library import load


def nearest_codes(x: torch.Tensor, bits: int) -> Optional[torch.Tensor]:
    """uint8 codes of `x` (values over their scale, any shape) on the `bits` table, or None when the
    C library cannot take this tensor (then the caller uses torch)."""
    if bits == 8 or x.dtype != torch.float32 or not available(x):
        return None
    _, mids = _levels(bits)
    x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.uint8)
    rc = load().sqlora_nearest_codes(torch.get_num_threads(), x.numel(), x.data_ptr(), mids.numel(),
                                     mids.data_ptr(), codes.data_ptr())
    if rc != 0:
        raise RuntimeError(f"sqlora_nearest_codes failed with code {rc}")
    return codes


def scale_errors(v: torch.Tensor, scales: torch.Tensor, bits: int, dots: bool = False
                 ) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """For groups `v` `[G, g]` and candidate scales `[C, G]` (float32 values of float16 scales):
    (squared errors `[C, G]`, and with `dots` Σ v·level and Σ level² `[C, G]`), or None when the C
    library cannot take these tensors."""
    if v.dtype != torch.float32 or not available(v, scales) or v.dim() != 2 or v.shape[1] > 4096:
        return None
    levels, mids = _levels(bits)
    v = v.contiguous()
    scales = scales.to(torch.float32).contiguous()
    n_cand, n_groups = scales.shape
    if n_groups != v.shape[0]:
        raise ValueError(f"scale_errors: {n_groups} scales per candidate for {v.shape[0]} groups")
    err = torch.empty(n_cand, n_groups, dtype=torch.float32)
    vc = torch.empty_like(err) if dots else None
    cc = torch.empty_like(err) if dots else None
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    rc = load().sqlora_scale_errors(torch.get_num_threads(), n_groups, v.shape[1], v.data_ptr(), n_cand,
                                    scales.data_ptr(), bits, ptr(levels), ptr(mids), err.data_ptr(), ptr(vc), ptr(cc))
    if rc != 0:
        raise RuntimeError(f"sqlora_scale_errors failed with code {rc}")
    return err, vc, cc
