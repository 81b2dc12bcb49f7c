"""Codebooks: the values a code stands for, before the group scale is applied.

The normal-float (NF) tables put more levels where a bell-shaped weight distribution has more mass;
they are fixed by the format (docs/format.md), never stored in a checkpoint. Format version 1 used
them at float32 precision (codebook 0); version 2 rounds every level to the nearest bfloat16
(codebook 2, at most 0.3 % from the float32 level). The rounding is for the kernels: a bfloat16 level
is two bytes of a float32 whose low half is zero, so a CPU kernel rebuilds it exactly from two byte-table
lookups instead of four (docs/kernels_cpu.md), and the values stay exact float32 numbers everywhere.

Version 3 writes 2-bit layers with a *skewed* table (codebook 3) instead of NF2. With four levels a
group cannot afford an exact zero: NF2 spends one of them on it and keeps the group's absmax on both
sides. The skewed table keeps one level (−1) for the group's largest weight (the scale's sign puts it
on that side) and spreads the other three over the bulk. Found by a small search on real SmolLM2
layers (21 layers, 16 × 512 calibration tokens, GPTQ output error): 0.69x the NF2 error
(geometric mean); NF2 stays better only on a few heavy-tailed early layers. 3 and 4 bits keep NF.
"""
from __future__ import annotations

from statistics import NormalDist
from typing import Optional

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
# Format 3's 2-bit table: exact in bfloat16 (-11/32, 5/64, 9/16).
_SKEW2 = (-1.0, -0.34375, 0.078125, 0.5625)

CODEBOOK_NF = 0  # format version 1: the NF tables above, float32
CODEBOOK_INT8 = 1  # both versions: the code is the int8 level
CODEBOOK_NF_BF16 = 2  # format versions 2 and 3: the NF tables rounded to bfloat16
CODEBOOK_SKEW2 = 3  # format version 3, 2-bit layers: the skewed table above
# The codebook of each bit width in each format version.
CODEBOOKS_OF_VERSION = {
    1: {2: CODEBOOK_NF, 3: CODEBOOK_NF, 4: CODEBOOK_NF, 8: CODEBOOK_INT8},
    2: {2: CODEBOOK_NF_BF16, 3: CODEBOOK_NF_BF16, 4: CODEBOOK_NF_BF16, 8: CODEBOOK_INT8},
    3: {2: CODEBOOK_SKEW2, 3: CODEBOOK_NF_BF16, 4: CODEBOOK_NF_BF16, 8: CODEBOOK_INT8},
}
CURRENT_VERSION = 3
# The level-table codebooks of each bit width (every version's, so old layers keep decoding).
_CODEBOOKS_OF_BITS = {b: sorted({m[b] for m in CODEBOOKS_OF_VERSION.values()}) for b in (2, 3, 4)}

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


def codebook_for_bits(bits: int, version: int = CURRENT_VERSION) -> int:
    """The codebook id a layer of `bits` is written with in format `version`."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8; got {bits!r}")
    if version not in CODEBOOKS_OF_VERSION:
        raise ValueError(f"format version must be one of {list(CODEBOOKS_OF_VERSION)}; got {version!r}")
    return CODEBOOKS_OF_VERSION[version][bits]


def nf_table(bits: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             codebook: Optional[int] = None) -> torch.Tensor:
    """The level table of `codebook` for `bits` (2, 3 or 4) as a tensor, cached per dtype and device.

    `codebook=None` is the one new layers of `bits` are written with (`codebook_for_bits`), so the
    compressors choose codes against exactly the table the layer will be stored with.
    """
    if bits not in _TABLES:
        raise ValueError(f"level tables exist for 2, 3 and 4 bits; got {bits!r}")
    if codebook is None:
        codebook = codebook_for_bits(bits)
    if codebook not in _CODEBOOKS_OF_BITS[bits]:
        raise ValueError(f"codebook {codebook!r} has no {bits}-bit table ({bits}-bit codebooks: "
                         f"{_CODEBOOKS_OF_BITS[bits]})")
    key = (bits, codebook, dtype, torch.device(device))
    table = _CACHE.get(key)
    if table is None:
        table = torch.tensor(_SKEW2 if codebook == CODEBOOK_SKEW2 else _TABLES[bits], dtype=torch.float32)
        if codebook == CODEBOOK_NF_BF16:
            table = table.to(torch.bfloat16).to(torch.float32)
        table = _CACHE[key] = table.to(dtype=dtype, device=device)
    return table


def is_skewed(bits: int, codebook: Optional[int] = None) -> bool:
    """Whether the table's top level is below 1, so a group's largest weight must map to −1.

    For such a table the plain (absmax) scale carries the sign that puts the group's largest weight
    on the −1 side; NF tables reach both ±1 and keep the positive absmax.
    """
    return bits != 8 and float(nf_table(bits, codebook=codebook)[-1]) < 1.0


def nf_midpoints(bits: int, device: torch.device | str = "cpu", codebook: Optional[int] = None) -> torch.Tensor:
    """Decision boundaries between neighbouring levels (float32), cached: GPTQ asks once per column."""
    if codebook is None:
        codebook = codebook_for_bits(bits)
    key = (bits, codebook, "midpoints", torch.device(device))
    mids = _CACHE.get(key)
    if mids is None:
        table = nf_table(bits, torch.float32, device, codebook)
        mids = _CACHE[key] = (table[1:] + table[:-1]) / 2
    return mids


def decode_values(codes: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32,
                  codebook: Optional[int] = None) -> torch.Tensor:
    """Map unpacked integer codes (0 … 2^bits − 1, or int8 bytes for 8 bits) to unscaled values."""
    if bits == 8:
        return codes.view(torch.int8).to(dtype) if codes.dtype == torch.uint8 else codes.to(dtype)
    return nf_table(bits, dtype, codes.device, codebook)[codes.long()]
