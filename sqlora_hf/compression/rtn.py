"""Round-to-nearest onto a codebook, one scale per group: the baseline every better quantizer beats."""
from __future__ import annotations

import torch

from ..formats.codebooks import is_skewed, nf_midpoints, nf_table


# From this many values on, the C loop (kernels/cpu/rounding.py) beats torch.bucketize plus the call cost.
C_NEAREST_MIN = 1024


def nearest_nf(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest NF level (int64) for values already divided by their scale (clamped to [-1, 1])."""
    if x.numel() >= C_NEAREST_MIN and x.device.type == "cpu":
        from ..kernels.cpu.rounding import nearest_codes

        codes = nearest_codes(x, bits)
        if codes is not None:
            return codes.to(torch.int64)
    return torch.bucketize(x.clamp(-1, 1).contiguous(), nf_midpoints(bits, x.device))


def plain_scales(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """The absmax scale of each group `[..., g]` (int8: absmax/127), float32.

    For a skewed table (top level below 1, `codebooks.is_skewed`) the scale is minus the group's
    largest-magnitude weight, so that weight lands exactly on the −1 level.
    """
    absmax = groups.abs().amax(-1)
    if bits == 8:
        return absmax / 127.0
    if is_skewed(bits):
        extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
        return -extreme
    return absmax


def quantize_groups(values: torch.Tensor, bits: int, group_len: int,
                    scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `[N, Kc]` values in groups of `group_len` along the row.

    Returns (codes uint8 `[N, Kc]`, scales float16 `[N, Kc/group_len]`). The scale is
    `plain_scales` (the group's absmax; int8: absmax/127; signed for a skewed table) unless `scales`
    is given. Codes are chosen against the *fp16-rounded* scale, so the stored scale and codes agree
    exactly.
    """
    n, kc = values.shape
    v = values.to(torch.float32).view(n, kc // group_len, group_len)
    if scales is None:
        scales = plain_scales(v, bits)
    scales16 = scales.to(torch.float16)
    if not bool(torch.isfinite(scales16).all()):
        raise ValueError("a group scale overflows float16 (|weight| > 65504 or NaN/Inf in the weight)")
    s = scales16.to(torch.float32).unsqueeze(-1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    x = v / safe
    if bits == 8:
        codes = x.round().clamp_(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        codes = nearest_nf(x, bits).to(torch.uint8)
    return codes.view(n, kc), scales16


def dequantize_groups(codes: torch.Tensor, scales16: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `quantize_groups` (float32)."""
    n, kc = codes.shape
    group_len = kc // scales16.shape[1]
    if bits == 8:
        vals = codes.view(torch.int8).to(torch.float32)
    else:
        vals = nf_table(bits, torch.float32, codes.device)[codes.long()]
    return (vals.view(n, -1, group_len) * scales16.to(torch.float32).unsqueeze(-1)).view(n, kc)
