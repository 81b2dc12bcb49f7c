"""GPTQ's column sweep in C (`sqlora_gptq_columns` in csrc/sqlora_cpu.c), for calibrated compression.

The torch sweep in `compression/gptq.py` runs about fifteen small tensor operations per weight
column; on SmolLM2's layers that Python and dispatch overhead, not arithmetic, is what a sweep costs
(0.6 s for the 3072 × 576 gate/up stack). The C loop does the same arithmetic per element, so the
torch sweep stays the oracle it is tested against and the fallback when the library is missing.
`SQLORA_GPTQ_SWEEP=torch` forces the torch sweep.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .library import load

_LEVELS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def available(*tensors: torch.Tensor) -> bool:
    """Whether the C sweep can run on these tensors (CPU float32) and is not switched off."""
    if os.environ.get("SQLORA_GPTQ_SWEEP", "").strip().lower() == "torch":
        return False
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return load() is not None


def _levels(bits: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if bits == 8:
        return None, None
    if bits not in _LEVELS:
        from ...formats.codebooks import nf_midpoints, nf_table

        _LEVELS[bits] = (nf_table(bits, torch.float32, torch.device("cpu")).contiguous(),
                         nf_midpoints(bits, torch.device("cpu")).to(torch.float32).contiguous())
    return _LEVELS[bits]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def sweep_columns(w: torch.Tensor, hinv: torch.Tensor, c0: int, c1: int, scale: torch.Tensor, per_column: bool,
                  bits: int, codes: torch.Tensor, q: torch.Tensor, err: torch.Tensor) -> None:
    """Quantize columns `c0..c1-1` of one block of the sweep and feed their errors to the block's later rows.

    `w` `[nb, N]` (the block of Wᵀ, updated in place), `hinv` `[nb, nb]` (a view into the inverse
    factor, rows may be strided), `scale`: `[nb, N]` per column when `per_column`, else one `[N]`
    vector for every column; `codes`/`q`/`err` `[nb, N]` are written for the columns swept.
    """
    nb, n = w.shape
    for name, t in (("w", w), ("codes", codes), ("q", q), ("err", err)):
        if t.shape != (nb, n) or t.stride() != (n, 1):
            raise ValueError(f"sweep_columns: {name} must be a contiguous-row [{nb}, {n}] block, got {tuple(t.shape)}")
    if w.dtype != torch.float32 or q.dtype != torch.float32 or err.dtype != torch.float32 or codes.dtype != torch.uint8:
        raise ValueError("sweep_columns: w, q, err must be float32 and codes uint8")
    if hinv.dtype != torch.float32 or hinv.shape != (nb, nb) or hinv.stride(1) != 1:
        raise ValueError(f"sweep_columns: hinv must be float32 [{nb}, {nb}] with unit column stride")
    scale = scale.to(torch.float32).contiguous()
    if scale.shape != ((nb, n) if per_column else (n,)):
        raise ValueError(f"sweep_columns: scale has shape {tuple(scale.shape)}")
    if not 0 <= c0 <= c1 <= nb:
        raise ValueError(f"sweep_columns: columns {c0}..{c1} outside the block of {nb}")
    levels, mids = _levels(bits)
    rc = load().sqlora_gptq_columns(torch.get_num_threads(), nb, c0, c1, n, w.data_ptr(), n,
                                    hinv.data_ptr(), hinv.stride(0), scale.data_ptr(), n if per_column else 0, bits,
                                    _ptr(levels), _ptr(mids), codes.data_ptr(), q.data_ptr(), err.data_ptr())
    if rc != 0:
        raise RuntimeError(f"sqlora_gptq_columns failed with code {rc}")


def refine_columns(w: torch.Tensor, e: torch.Tensor, g: torch.Tensor, h: torch.Tensor, scale: torch.Tensor,
                   keep: Optional[torch.Tensor], bits: int, codes: torch.Tensor, delta: torch.Tensor) -> None:
    """One block of coordinate descent on the codes (`compression/gptq.py` `_refine`): updates `e`,
    `g` (inside the block), `codes`, and writes each column's change of the error into `delta`."""
    nb, n = w.shape
    for name, t in (("w", w), ("e", e), ("g", g), ("scale", scale), ("delta", delta)):
        if t.shape != (nb, n) or t.stride() != (n, 1) or t.dtype != torch.float32:
            raise ValueError(f"refine_columns: {name} must be a contiguous-row float32 [{nb}, {n}] block")
    for name, t in (("codes", codes), ("keep", keep)):
        if t is not None and (t.shape != (nb, n) or t.stride() != (n, 1) or t.dtype != torch.uint8):
            raise ValueError(f"refine_columns: {name} must be a contiguous-row uint8 [{nb}, {n}] block")
    if h.dtype != torch.float32 or h.shape != (nb, nb) or h.stride(1) != 1:
        raise ValueError(f"refine_columns: h must be float32 [{nb}, {nb}] with unit column stride")
    levels, mids = _levels(bits)
    rc = load().sqlora_cd_columns(torch.get_num_threads(), nb, n, w.data_ptr(), e.data_ptr(), g.data_ptr(), n,
                                  h.data_ptr(), h.stride(0), scale.data_ptr(), _ptr(keep), bits,
                                  _ptr(levels), _ptr(mids), codes.data_ptr(), delta.data_ptr())
    if rc != 0:
        raise RuntimeError(f"sqlora_cd_columns failed with code {rc}")
