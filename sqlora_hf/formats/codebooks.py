"""Codebooks: the values a code stands for, before the group scale is applied.

The normal-float (NF) tables put more levels where a bell-shaped weight distribution has more mass;
they are fixed by the format (docs/format.md), never stored in a checkpoint. Format version 1 used
them at float32 precision (codebook 0); version 2 rounds every level to the nearest bfloat16
(codebook 2, at most 0.3 % from the float32 level). The rounding is for the kernels: a bfloat16 level
is two bytes of a float32 whose low half is zero, so a CPU kernel rebuilds it exactly from two byte-table
lookups instead of four (docs/kernels_cpu.md), and the values stay exact float32 numbers everywhere.
"""
from __future__ import annotations

from statistics import NormalDist

import torch

NF_OFFSET = 0.9677083

# bitsandbytes / QLoRA NF4, bit for bit.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_NF3 = (-1.0, -0.4786292, -0.2171418, 0.0, 0.1609302, 0.3379152, 0.5626170, 1.0)
_NF2 = (-1.0, 0.0, 0.3379152, 1.0)

CODEBOOK_NF = 0  # format version 1: the NF tables above, float32
CODEBOOK_INT8 = 1  # both versions: the code is the int8 level
CODEBOOK_NF_BF16 = 2  # format version 2: the NF tables rounded to bfloat16
NF_CODEBOOKS = (CODEBOOK_NF, CODEBOOK_NF_BF16)
# What new layers are written with (the current format version's NF codebook).
DEFAULT_NF_CODEBOOK = CODEBOOK_NF_BF16

_TABLES = {4: _NF4, 3: _NF3, 2: _NF2}
_CACHE: dict[tuple, torch.Tensor] = {}


def build_normal_float(bits: int, offset: float = NF_OFFSET) -> list[float]:
    """Rebuild an NF table from its construction (used by tests to check the constants)."""
    nd = NormalDist()
    n_pos = 2 ** (bits - 1)
    n_neg = n_pos - 1
    pos = [nd.inv_cdf(offset + (0.5 - offset) * i / n_pos) for i in range(n_pos)]
    neg = [-nd.inv_cdf(offset + (0.5 - offset) * i / n_neg) for i in range(n_neg)]
    values = sorted(pos + neg + [0.0])
    top = max(values)
    return [v / top for v in values]


def codebook_for_bits(bits: int, nf_codebook: int = DEFAULT_NF_CODEBOOK) -> int:
    """The codebook id a layer of `bits` is written with (`nf_codebook` for 2, 3 and 4 bits)."""
    if bits in _TABLES:
        return nf_codebook
    if bits == 8:
        return CODEBOOK_INT8
    raise ValueError(f"bits must be one of 2, 3, 4, 8; got {bits!r}")


def nf_table(bits: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             codebook: int = DEFAULT_NF_CODEBOOK) -> torch.Tensor:
    """The NF table of `codebook` for `bits` (2, 3 or 4) as a tensor, cached per dtype and device."""
    if bits not in _TABLES:
        raise ValueError(f"normal-float codebooks exist for 2, 3 and 4 bits; got {bits!r}")
    if codebook not in NF_CODEBOOKS:
        raise ValueError(f"codebook {codebook!r} is not a normal-float codebook (those are {list(NF_CODEBOOKS)})")
    key = (bits, codebook, dtype, torch.device(device))
    table = _CACHE.get(key)
    if table is None:
        table = torch.tensor(_TABLES[bits], dtype=torch.float32)
        if codebook == CODEBOOK_NF_BF16:
            table = table.to(torch.bfloat16).to(torch.float32)
        table = _CACHE[key] = table.to(dtype=dtype, device=device)
    return table


def nf_midpoints(bits: int, device: torch.device | str = "cpu", codebook: int = DEFAULT_NF_CODEBOOK) -> torch.Tensor:
    """Decision boundaries between neighbouring NF levels (float32), cached: GPTQ asks once per column."""
    key = (bits, codebook, "midpoints", torch.device(device))
    mids = _CACHE.get(key)
    if mids is None:
        table = nf_table(bits, torch.float32, device, codebook)
        mids = _CACHE[key] = (table[1:] + table[:-1]) / 2
    return mids


def decode_values(codes: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32,
                  codebook: int = DEFAULT_NF_CODEBOOK) -> torch.Tensor:
    """Map unpacked integer codes (0 … 2^bits − 1, or int8 bytes for 8 bits) to unscaled values."""
    if bits == 8:
        return codes.view(torch.int8).to(dtype) if codes.dtype == torch.uint8 else codes.to(dtype)
    return nf_table(bits, dtype, codes.device, codebook)[codes.long()]
