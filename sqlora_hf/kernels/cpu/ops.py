"""`torch.ops.sqlora_cpu.linear`: the C kernel as a torch custom op, with a fake (meta) impl.

The fake impl only computes the output shape, so `torch.compile` and meta-device tracing see the op
without running it. The real impl validates every buffer length in Python before handing raw
pointers to C (which re-checks them): a short or corrupt buffer raises, it is never read past.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import library

_LIB = torch.library.Library("sqlora_cpu", "DEF")
_LIB.define(
    "linear(Tensor x, Tensor codes, Tensor scales, Tensor? mask, Tensor lut, Tensor? lowrank_l, "
    "Tensor? lowrank_r, Tensor? bias, int out_features, int bits, int group_size, int sparsity) -> Tensor"
)

ERRORS = {-1: "invalid argument", -2: "buffer length does not match the layer's shape",
          -3: "instruction set not supported", -4: "out of memory"}


def num_threads() -> int:
    """`SQLORA_CPU_THREADS` when set, else torch's intra-op thread count."""
    env = os.environ.get("SQLORA_CPU_THREADS")
    if env:
        n = int(env)
        if n < 1:
            raise ValueError(f"SQLORA_CPU_THREADS must be a positive integer, got {env!r}")
        return n
    return max(1, torch.get_num_threads())


def _row_bytes(n_stored: int, bits: int) -> int:
    return n_stored if bits == 8 else n_stored // 32 * 4 * bits


def _check(name: str, t: Optional[torch.Tensor], dtype: torch.dtype, numel: int) -> None:
    if t is None:
        raise ValueError(f"sqlora_cpu.linear: {name} is missing")
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"sqlora_cpu.linear: {name} must be a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}")
    if t.numel() != numel:
        raise ValueError(f"sqlora_cpu.linear: {name} has {t.numel()} elements, the layer's shape needs {numel}")


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


@torch.library.impl(_LIB, "linear", "CPU")
def _linear_cpu(x, codes, scales, mask, lut, lowrank_l, lowrank_r, bias, out_features, bits, group_size, sparsity):
    lib = library.load()
    if lib is None:
        raise RuntimeError(f"sqlora CPU kernels are not available: {library.load_error()}")
    if bits not in (2, 3, 4, 8) or sparsity not in (0, 1, 2):
        raise ValueError(f"sqlora_cpu.linear: bits must be 2/3/4/8 and sparsity 0/1/2, got {bits}, {sparsity}")
    if x.dim() != 2:
        raise ValueError(f"sqlora_cpu.linear: x must be 2-D [M, K], got {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    n = out_features
    if group_size <= 0 or group_size % 32 or k % group_size or (sparsity and group_size % 64):
        raise ValueError(f"sqlora_cpu.linear: group_size {group_size} does not fit in_features {k}")
    n_stored = k // 2 if sparsity else k
    _check("x", x, torch.float32, m * k)
    _check("codes", codes, torch.uint8, n * _row_bytes(n_stored, bits))
    _check("scales", scales, torch.float32, n * (k // group_size))
    if sparsity:
        _check("mask", mask, torch.uint8, n * (k // 8))
    if bits != 8:
        _check("lut", lut, torch.float32, 1 << bits)
    rank = 0 if lowrank_l is None else lowrank_l.numel() // n
    if rank:
        _check("lowrank_l", lowrank_l, torch.float32, n * rank)
        _check("lowrank_r", lowrank_r, torch.float32, rank * k)
    if bias is not None:
        _check("bias", bias, torch.float32, n)
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    isa = library.ISA_CODES[library.selected_isa()]
    rc = lib.sqlora_cpu_linear(
        isa, num_threads(), x.data_ptr(), m, n, k, bits, group_size, sparsity,
        codes.data_ptr(), codes.numel(), scales.data_ptr(), scales.numel(),
        _ptr(mask), 0 if mask is None else mask.numel(), lut.data_ptr(), lut.numel(),
        _ptr(lowrank_l), _ptr(lowrank_r), rank, 0 if lowrank_l is None else lowrank_l.numel(),
        0 if lowrank_r is None else lowrank_r.numel(),
        _ptr(bias), 0 if bias is None else bias.numel(), y.data_ptr(),
    )
    if rc != 0:
        raise RuntimeError(f"sqlora_cpu.linear failed: {ERRORS.get(rc, rc)} (code {rc})")
    return y


@torch.library.register_fake("sqlora_cpu::linear", lib=_LIB)
def _linear_fake(x, codes, scales, mask, lut, lowrank_l, lowrank_r, bias, out_features, bits, group_size, sparsity):
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)
