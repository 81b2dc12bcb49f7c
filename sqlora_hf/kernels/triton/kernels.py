"""Triton kernels that multiply activations by a layer stored in the canonical packed format.

* `packed_gemv_kernel` — decode (batch 1-8). One program owns `BLOCK_N` output rows for one
  activation row and walks the rows' *stored* weights in `BLOCK_K` steps: a 2:4/4:8 layer reads half
  the codes and does half the multiply-adds; its mask is decoded in the kernel with a 1 KB select
  table to find the dense column where `x` is gathered. The work is bound by the bytes read.
* `packed_matmul_kernel` — prefill / large batch. A `[BLOCK_M, BLOCK_N]` output tile; each K step
  decodes a `[BLOCK_N, BLOCK_K]` weight tile over *dense* columns (`_dequant_tile`) in registers and
  feeds `tl.dot` (tensor cores). For a sparse row, dense column `k` is stored at index
  `4·(k // 8) + popcount(mask_byte & ((1 << k%8) − 1))` (every mask byte keeps exactly 4 columns,
  for 2:4 as for 4:8) and a column whose bit is clear is zero; sparse tensor cores cannot take a
  general 4:8 pattern, so the gain there is only the bytes not read.

Both read the format of docs/format.md directly (no repacked copy), so what the interpreter tests on
CPU is exactly what runs on the GPU. The low-rank term is fused in the epilogue: the caller computes
`t = x·Rᵀ` (`[M, r]`, fp32) once, and every program adds `t·L[rows]ᵀ` to its accumulator before the
single store, together with the bias. Helpers are `@triton.jit` functions (the module is compiled by
Triton or run by its interpreter, never called as plain Python).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Reductions go through `tl.reduce` with a sum combiner instead of `tl.sum`: `tl.sum` and `tl.zeros`
# are themselves `@triton.jit` functions, fixed as compiled or interpreted when `triton` is first
# imported, while this file is loaded in either mode later (see launch.py). Triton's own combiner is
# always used by the interpreted copy (the interpreter recognises that object and sums with numpy),
# and by the compiled copy when it is compilable; a compiled copy made in a process that imported
# triton with TRITON_INTERPRET=1 (where it is an interpreted function) uses the local `_add`.
@triton.jit
def _add(a, b):
    return a + b


_INTERPRETED_COPY = not isinstance(_add, JITFunction)
_sum_combine = (tl.standard._sum_combine
                if _INTERPRETED_COPY or isinstance(tl.standard._sum_combine, JITFunction) else _add)


@triton.jit
def _popcount8(v):
    """Set bits of an int32 holding a byte value (SWAR; no libdevice, so the interpreter runs it)."""
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


@triton.jit
def _load_codes(codes_ptr, rows, stored, ok, row_bytes, BITS: tl.constexpr):
    """Integer codes (int32) of stored positions `stored` ([BN, BK]) of rows `rows` ([BN])."""
    row_base = codes_ptr + rows[:, None].to(tl.int64) * row_bytes
    if BITS == 8:
        code = tl.load(row_base + stored, mask=ok, other=0).to(tl.int32)
    else:
        block = stored // 32
        i = stored % 32
        if BITS == 4:
            byte = tl.load(row_base + block * 16 + (i % 16), mask=ok, other=0).to(tl.int32)
            code = (byte >> ((i // 16) * 4)) & 0xF
        elif BITS == 2:
            byte = tl.load(row_base + block * 8 + (i % 8), mask=ok, other=0).to(tl.int32)
            code = (byte >> ((i // 8) * 2)) & 0x3
        else:  # 3 bits: a 2-bit plane (bytes 0-7) and a 1-bit plane (bytes 8-11) per 32-block
            low = tl.load(row_base + block * 12 + (i % 8), mask=ok, other=0).to(tl.int32)
            high = tl.load(row_base + block * 12 + 8 + (i // 8), mask=ok, other=0).to(tl.int32)
            code = ((low >> ((i // 8) * 2)) & 0x3) | (((high >> (i % 8)) & 0x1) << 2)
    return code


@triton.jit
def _code_values(code, lut_ptr, BITS: tl.constexpr):
    """Unscaled fp32 values of integer codes: the NF table (2/3/4 bits) or the signed byte (8 bits)."""
    if BITS == 8:
        value = tl.where(code >= 128, code - 256, code).to(tl.float32)
    else:
        value = tl.load(lut_ptr + code)
    return value


@triton.jit
def _dequant_tile(codes_ptr, scales_ptr, mask_ptr, lut_ptr, rows, cols, row_ok, col_ok,
                  row_bytes, n_groups, mask_bytes,
                  BITS: tl.constexpr, GROUP: tl.constexpr, SPARSE: tl.constexpr):
    """Ŵ[rows, cols] as an fp32 `[BN, BK]` tile over *dense* columns (zeros outside the matrix and
    at pruned columns): what `tl.dot` needs."""
    ok = row_ok[:, None] & col_ok[None, :]
    cols2 = cols[None, :]
    if SPARSE:
        mbyte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * mask_bytes + cols2 // 8,
                        mask=ok, other=0).to(tl.int32)
        bit = cols2 % 8
        kept = ((mbyte >> bit) & 1) != 0
        stored = (cols2 // 8) * 4 + _popcount8(mbyte & ((1 << bit) - 1))
        ok = ok & kept
    else:
        stored = cols2 + rows[:, None] * 0
    code = _load_codes(codes_ptr, rows, stored, ok, row_bytes, BITS)
    value = _code_values(code, lut_ptr, BITS)
    scale = tl.load(scales_ptr + rows[:, None].to(tl.int64) * n_groups + cols2 // GROUP,
                    mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, value * scale, 0.0)


@triton.jit
def packed_gemv_kernel(
    x_ptr, codes_ptr, scales_ptr, mask_ptr, select_ptr, lut_ptr, t_ptr, l_ptr, bias_ptr, y_ptr,
    N, n_stored, row_bytes, n_groups, mask_bytes, rank, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, SPARSE: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, rows] = x[m]·Ŵ[rows]ᵀ + t[m]·L[rows]ᵀ + b[rows]; grid = (cdiv(N, BLOCK_N), M).

    Walks the *stored* weights of its rows (`n_stored` = K dense, K/2 sparse), so a sparse layer
    reads half the codes and does half the multiply-adds. For a sparse row, stored weight `s` sits in
    mask byte `s // 4` (every byte keeps 4 columns), and `select_ptr[byte·4 + s % 4]` (a 1 KB table)
    gives its bit position: the dense column is `8·(s // 4) + position`, where `x` is gathered.
    Group `j` of a sparse row holds exactly `GROUP/2` stored weights, so its scale index is
    `s // (GROUP/2)`.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for s0 in range(0, n_stored, BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        s_ok = s < n_stored
        ok = row_ok[:, None] & s_ok[None, :]
        stored = s[None, :] + rows[:, None] * 0
        code = _load_codes(codes_ptr, rows, stored, ok, row_bytes, BITS)
        value = _code_values(code, lut_ptr, BITS)
        if SPARSE:
            mbyte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * mask_bytes + stored // 4,
                            mask=ok, other=0).to(tl.int32)
            position = tl.load(select_ptr + mbyte * 4 + stored % 4, mask=ok, other=0).to(tl.int32)
            x = tl.load(x_ptr + m * stride_xm + (stored // 4) * 8 + position, mask=ok, other=0.0)
            x = x.to(tl.float32)
            group = stored // (GROUP // 2)
        else:
            x = tl.load(x_ptr + m * stride_xm + s, mask=s_ok, other=0.0).to(tl.float32)[None, :]
            group = stored // GROUP
        scale = tl.load(scales_ptr + rows[:, None].to(tl.int64) * n_groups + group,
                        mask=ok, other=0.0).to(tl.float32)
        acc += tl.reduce(tl.where(ok, value * scale * x, 0.0), 1, _sum_combine)
    if HAS_LOWRANK:
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            t = tl.load(t_ptr + m * rank + rr, mask=r_ok, other=0.0)
            lw = tl.load(l_ptr + rows[:, None].to(tl.int64) * rank + rr[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.reduce(lw * t[None, :], 1, _sum_combine)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def packed_matmul_kernel(
    x_ptr, codes_ptr, scales_ptr, mask_ptr, lut_ptr, t_ptr, l_ptr, bias_ptr, y_ptr,
    M, N, K, row_bytes, n_groups, mask_bytes, rank, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, SPARSE: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y[tile] = X·Ŵᵀ + T·Lᵀ + b with a decoded weight tile per K step and `tl.dot`.

    fp16/bf16 activations multiply the tile rounded to their own dtype on tensor cores (fp32
    accumulate). `DOT_FP32` runs the dot in fp32 with `input_precision="ieee"`: for fp32 activations
    (no TF32 rounding sneaks in), and for bf16 under the interpreter, whose bf16 `tl.dot` is wrong
    (Triton 3.9 interpreter: numpy has no bfloat16).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    row_ok = rows < N
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
                    mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        w = _dequant_tile(codes_ptr, scales_ptr, mask_ptr, lut_ptr, rows, cols, row_ok, col_ok,
                          row_bytes, n_groups, mask_bytes, BITS, GROUP, SPARSE)
        if DOT_FP32:  # w rounded to x's dtype first, so the numerics match the tensor-core path
            w = w.to(x.dtype).to(tl.float32)
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_LOWRANK:
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * rank + rr[None, :],
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            lw = tl.load(l_ptr + rows[:, None].to(tl.int64) * rank + rr[None, :],
                         mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(t, tl.trans(lw), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])
