"""Bit packing of codes and sparsity masks, exactly as docs/format.md specifies.

Codes are packed in blocks of 32 stored weights. The orders are chosen so that a SIMD kernel turns
one block into runs of consecutive weights with a shift and a mask (see the spec for why).
"""
from __future__ import annotations

import torch

BLOCK = 32


def packed_row_bytes(n_stored: int, bits: int) -> int:
    """Bytes of one packed row holding `n_stored` codes."""
    if bits == 8:
        return n_stored
    if n_stored % BLOCK:
        raise ValueError(f"a packed row must hold a multiple of {BLOCK} codes, got {n_stored}")
    return n_stored * bits // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes `[N, Kc]` (values 0 … 2^bits − 1; int8 values for 8 bits) into uint8 rows."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, Kc], got shape {tuple(codes.shape)}")
    n, kc = codes.shape
    if bits == 8:
        return codes.to(torch.int8).view(torch.uint8).contiguous() if codes.dtype != torch.uint8 else codes.contiguous()
    c = codes.to(torch.int32)
    if int(c.min()) < 0 or int(c.max()) >= (1 << bits):
        raise ValueError(f"{bits}-bit codes must lie in [0, {(1 << bits) - 1}]")
    if kc % BLOCK:
        raise ValueError(f"the number of stored codes per row ({kc}) must be a multiple of {BLOCK}")
    blocks = c.view(n, kc // BLOCK, BLOCK)
    if bits == 4:
        out = blocks[..., :16] | (blocks[..., 16:] << 4)
    elif bits == 2:
        out = _pack2(blocks)
    elif bits == 3:
        low = _pack2(blocks & 3)
        high = (blocks >> 2) & 1
        word = (high.to(torch.int64) << torch.arange(32, dtype=torch.int64, device=codes.device)).sum(-1)  # uint32 value per block
        high_bytes = torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.int32)
        out = torch.cat([low, high_bytes], dim=-1)
    else:
        raise ValueError(f"bits must be one of 2, 3, 4, 8; got {bits!r}")
    return out.to(torch.uint8).reshape(n, -1).contiguous()


def _pack2(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[..., 0:8] | (blocks[..., 8:16] << 2) | (blocks[..., 16:24] << 4) | (blocks[..., 24:32] << 6)


def unpack_codes(packed: torch.Tensor, bits: int, n_stored: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 rows → integer codes `[N, n_stored]` (uint8; 8 bits stays raw bytes)."""
    n = packed.shape[0]
    expected = packed_row_bytes(n_stored, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != expected:
        raise ValueError(
            f"packed codes must be uint8 [N, {expected}] for {n_stored} {bits}-bit codes per row, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed
    p = packed.view(n, -1, BLOCK * bits // 8)
    if bits == 4:
        out = torch.cat([p & 0xF, p >> 4], dim=-1)
    elif bits == 2:
        out = _unpack2(p)
    elif bits == 3:
        low = _unpack2(p[..., :8])
        hb = p[..., 8:12].to(torch.int64)
        word = hb[..., 0] | (hb[..., 1] << 8) | (hb[..., 2] << 16) | (hb[..., 3] << 24)
        high = ((word.unsqueeze(-1) >> torch.arange(32, device=packed.device)) & 1).to(torch.uint8)
        out = low | (high << 2)
    else:
        raise ValueError(f"bits must be one of 2, 3, 4, 8; got {bits!r}")
    return out.reshape(n, n_stored)


def _unpack2(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6], dim=-1)


# ---- sparsity masks -------------------------------------------------------------------------------

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Bool `[N, K]` keep-mask → uint8 `[N, K/8]` bitmap (bit i of byte j ↔ column 8j + i)."""
    n, k = keep.shape
    if k % 8:
        raise ValueError(f"in_features must be a multiple of 8 for a sparsity mask, got {k}")
    bits = keep.view(n, k // 8, 8).to(torch.int32) * _BIT_WEIGHTS.to(keep.device)
    return bits.sum(-1).to(torch.uint8)


def unpack_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, K/8]` bitmap → bool `[N, K]`."""
    n, kb = mask.shape
    bits = (mask.unsqueeze(-1).to(torch.int32) >> torch.arange(8, device=mask.device, dtype=torch.int32)) & 1
    return bits.view(n, kb * 8).bool()


def check_mask_pattern(mask: torch.Tensor, sparsity: str) -> bool:
    """True when every byte (4:8) or nibble (2:4) of the bitmap keeps exactly half its columns."""
    keep = unpack_mask(mask)
    m = 4 if sparsity == "2:4" else 8
    counts = keep.view(keep.shape[0], -1, m).sum(-1)
    return bool((counts == m // 2).all())
