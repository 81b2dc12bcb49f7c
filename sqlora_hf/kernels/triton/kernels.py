"""Triton kernels that multiply activations by a layer stored in the canonical packed format.

* `packed_matmul_kernel` — every batch size of a dense layer, and sparse layers at batch > 8. A
  `[BLOCK_M, BLOCK_N]` output tile; each K step decodes a `[BLOCK_N, BLOCK_K]` weight tile in
  registers and multiplies it with `tl.dot` (tensor cores, fp32 accumulate), or at `BLOCK_M = 1`
  with a row reduction.
* `sparse_gemv_kernel` — 2:4 / 4:8 layers at batch 1-8 (walks the *stored* weights only).

**Dense decode (`_dense_tile`).** Nothing is loaded per weight. A K step covers `BLOCK_K / 32`
whole blocks of 32 codes (BLOCK_K is a power of two ≥ 32), so its packed bytes are one contiguous
`[BLOCK_N, BLOCK_K/32, bytes_per_block]` uint8 tile (4-bit: 16 bytes per block, 2-bit: 8, 3-bit: the
8-byte 2-bit plane and the 4-byte 1-bit plane of each 12-byte block, 8-bit: a plain `[BN, BK]`
tile). Nibbles / bit planes are split with shifts and masks and put back in natural column order in
registers with `tl.join` + `tl.permute` + `tl.reshape` (reshape keeps element order; in the compiled
kernel this is register renaming: a thread keeps the two nibbles of its byte). The NF value is a
`tl.gather` from the codebook held in registers (16 fp32 entries, NF2/NF3 padded by the launcher),
which the compiler turns into a select chain. A codebook in global memory (an L1 hit) was slower on
an H100: as fp32, Triton's software pipeliner makes every lookup its own asynchronous copy into
shared memory; as fp16 (left alone) it still cost ~40% more than the gather. The scales of the step
are one contiguous `[BLOCK_N, NG]` tile, `NG = max(BLOCK_K / GROUP, 1)`, broadcast over their
columns by viewing the values as `[BLOCK_N, NG, BLOCK_K / NG]`; BLOCK_K and GROUP are both powers of
two, so either a step holds whole groups (`BLOCK_K >= GROUP`) or a group holds whole steps. `x` is a contiguous `[BLOCK_M, BLOCK_K]` tile. The last K step may run past
K (masked: zero bytes, zero scales, zero `x`), so K only has to be a multiple of 32, which every
valid layer is.

**One tile kernel for every batch.** Every weight byte is read once per call whatever the batch
(a GEMV with one program per activation row re-reads the weights M times). Batch 1 runs with
`BLOCK_M = 1` and multiplies by a row reduction (no `tl.dot`, which needs 16 rows, and no
shared-memory round trip for its operand: 4096x4096 4-bit took 13 µs against 24 µs for the padded
dot on an H100). Batches 2-16 use `BLOCK_M = 16` (rows of `x` beyond M masked): the padded `tl.dot`
costs little while the kernel is bound by the bytes read. Small batches use small `BLOCK_N` (8-64)
and long K steps (128-1024) so a 4096-row layer still has enough programs for every SM; large
batches use `BLOCK_M`, `BLOCK_N` 64-128. The launcher (launch.py) autotunes the three separately.

**Sparse layers** keep the per-weight path (`_load_codes`, `_sparse_tile`): the GEMV reads only the
stored codes of its rows and gathers `x` at their dense columns (a 1 KB select table decodes the
mask); the tile kernel decodes a dense-column tile, where dense column `k` is stored at index
`4·(k // 8) + popcount(mask_byte & ((1 << k%8) − 1))` (every mask byte keeps exactly 4 columns, for
2:4 as for 4:8) and a column whose bit is clear is zero. Sparse tensor cores cannot take a general
4:8 pattern, so the gain there is only the bytes not read.

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


# ---- dense layers: contiguous tiles -------------------------------------------------------------

@triton.jit
def _two_bit_codes(byte, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """`[BN, NB, 8]` int32 bytes of 2-bit planes → `[BN, NB, 32]` codes in natural order.

    Byte `j` holds codes `j`, `j+8`, `j+16`, `j+24` at shifts 0, 2, 4, 6. The joins give
    `[.., j, y, x]` = code `j + 16y + 8x`; moving `j` last makes the flat index `16y + 8x + j`.
    """
    low = tl.join(byte & 3, (byte >> 4) & 3)             # [.., j, y]: code j + 16y
    high = tl.join((byte >> 2) & 3, (byte >> 6) & 3)     # [.., j, y]: code j + 8 + 16y
    codes = tl.join(low, high)                            # [.., j, y, x]: code j + 16y + 8x
    return tl.reshape(tl.permute(codes, (0, 1, 3, 4, 2)), (BLOCK_N, NB, 32))


@triton.jit
def _dense_tile(codes_ptr, scales_ptr, lut_ptr, rows, row_ok, k0, K, row_bytes, n_groups,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ŵ[rows, k0 : k0+BLOCK_K] of a dense layer as an fp32 `[BN, BK]` tile (zeros outside the
    matrix), from contiguous loads of the packed bytes and the scales (see the module docstring)."""
    NB: tl.constexpr = BLOCK_K // 32  # whole 32-code blocks per step
    base = codes_ptr + rows.to(tl.int64) * row_bytes  # [BN] row starts
    if BITS == 8:  # one signed byte per weight, in order
        cols = k0 + tl.arange(0, BLOCK_K)
        byte = tl.load(base[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0)
        value = byte.to(tl.int8, bitcast=True).to(tl.float32)
    else:
        block = k0 // 32 + tl.arange(0, NB)
        ok = row_ok[:, None, None] & (block < K // 32)[None, :, None]
        first = base[:, None, None] + (block * (4 * BITS))[None, :, None]  # [BN, NB, 1] block starts
        if BITS == 4:  # byte j = code j | code j+16 << 4
            byte = tl.load(first + tl.arange(0, 16)[None, None, :], mask=ok, other=0).to(tl.int32)
            halves = tl.join(byte & 0xF, byte >> 4)  # [BN, NB, 16, 2]: [j, h] = code j + 16h
            code = tl.reshape(tl.permute(halves, (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
        else:  # 2 bits, or the low two bits of 3 (bytes 0-7 of each 12-byte block)
            byte = tl.load(first + tl.arange(0, 8)[None, None, :], mask=ok, other=0).to(tl.int32)
            code = _two_bit_codes(byte, BLOCK_N, NB)
            if BITS == 3:  # bytes 8-11: bit r of byte 8+q is the high bit of code 8q + r
                word = tl.load(first + 8 + tl.arange(0, 4)[None, None, :], mask=ok, other=0).to(tl.int32)
                high = (word[:, :, :, None] >> tl.arange(0, 8)[None, None, None, :]) & 1  # [BN, NB, 4, 8]
                code = code | (tl.reshape(high, (BLOCK_N, NB, 32)) << 2)
            code = tl.reshape(code, (BLOCK_N, BLOCK_K))
        # NF value: a gather from the codebook held in registers (the launcher pads it to 16 entries:
        # Triton 3.6 fails to compile a gather from 4 or 8). Faster than loading from a table in
        # global memory, which the software pipeliner turns into one async copy per lookup.
        table = tl.load(lut_ptr + tl.arange(0, 16))
        value = tl.gather(tl.broadcast_to(table[None, :], (BLOCK_N, 16)), code, 1)
    # Scales: NG groups per step (1 when a group spans several steps), broadcast over their columns.
    NG: tl.constexpr = (BLOCK_K + GROUP - 1) // GROUP
    group = k0 // GROUP + tl.arange(0, NG)
    scale = tl.load(scales_ptr + rows[:, None].to(tl.int64) * n_groups + group[None, :],
                    mask=row_ok[:, None] & (group < n_groups)[None, :], other=0.0).to(tl.float32)
    w = tl.reshape(value, (BLOCK_N, NG, BLOCK_K // NG)) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


# ---- sparse layers: per-weight addressing ---------------------------------------------------------

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
def _sparse_tile(codes_ptr, scales_ptr, mask_ptr, lut_ptr, rows, cols, row_ok, col_ok,
                 row_bytes, n_groups, mask_bytes, BITS: tl.constexpr, GROUP: tl.constexpr):
    """Ŵ[rows, cols] of a 2:4/4:8 layer as an fp32 `[BN, BK]` tile over *dense* columns (zeros
    outside the matrix and at pruned columns)."""
    ok = row_ok[:, None] & col_ok[None, :]
    cols2 = cols[None, :]
    mbyte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * mask_bytes + cols2 // 8,
                    mask=ok, other=0).to(tl.int32)
    bit = cols2 % 8
    kept = ((mbyte >> bit) & 1) != 0
    stored = (cols2 // 8) * 4 + _popcount8(mbyte & ((1 << bit) - 1))
    ok = ok & kept
    code = _load_codes(codes_ptr, rows, stored, ok, row_bytes, BITS)
    value = _code_values(code, lut_ptr, BITS)
    scale = tl.load(scales_ptr + rows[:, None].to(tl.int64) * n_groups + cols2 // GROUP,
                    mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, value * scale, 0.0)


# ---- kernels --------------------------------------------------------------------------------------

@triton.jit
def sparse_gemv_kernel(
    x_ptr, codes_ptr, scales_ptr, mask_ptr, select_ptr, lut_ptr, t_ptr, l_ptr, bias_ptr, y_ptr,
    N, n_stored, row_bytes, n_groups, mask_bytes, rank, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, rows] = x[m]·Ŵ[rows]ᵀ + t[m]·L[rows]ᵀ + b[rows] for a 2:4/4:8 layer;
    grid = (cdiv(N, BLOCK_N), M).

    Walks the *stored* weights of its rows (`n_stored` = K/2), so it reads half the codes and does
    half the multiply-adds. Stored weight `s` sits in mask byte `s // 4` (every byte keeps 4
    columns), and `select_ptr[byte·4 + s % 4]` (a 1 KB table) gives its bit position: the dense
    column is `8·(s // 4) + position`, where `x` is gathered. Group `j` holds exactly `GROUP/2`
    stored weights, so its scale index is `s // (GROUP/2)`.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for s0 in range(0, n_stored, BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (s < n_stored)[None, :]
        stored = s[None, :] + rows[:, None] * 0
        code = _load_codes(codes_ptr, rows, stored, ok, row_bytes, BITS)
        value = _code_values(code, lut_ptr, BITS)
        mbyte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * mask_bytes + stored // 4,
                        mask=ok, other=0).to(tl.int32)
        position = tl.load(select_ptr + mbyte * 4 + stored % 4, mask=ok, other=0).to(tl.int32)
        x = tl.load(x_ptr + m * stride_xm + (stored // 4) * 8 + position, mask=ok, other=0.0)
        scale = tl.load(scales_ptr + rows[:, None].to(tl.int64) * n_groups + stored // (GROUP // 2),
                        mask=ok, other=0.0).to(tl.float32)
        acc += tl.reduce(tl.where(ok, value * scale * x.to(tl.float32), 0.0), 1, _sum_combine)
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
    """Y[tile] = X·Ŵᵀ + T·Lᵀ + b with a decoded weight tile per K step and `tl.dot`;
    grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)). BLOCK_K: a power of two ≥ 32 (dense layers).
    BLOCK_M = 1 (batch 1) multiplies by a row reduction instead of `tl.dot` (which needs 16 rows);
    otherwise BLOCK_M, BLOCK_N ≥ 16.

    fp16/bf16 activations multiply the tile rounded to their own dtype on tensor cores (fp32
    accumulate). `DOT_FP32` runs the dot in fp32 with `input_precision="ieee"`: for fp32 activations
    (no TF32 rounding sneaks in), and for bf16 under the interpreter, whose bf16 `tl.dot` is wrong
    (Triton 3.9 interpreter: numpy has no bfloat16).
    """
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must hold whole 32-code blocks")
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
        if SPARSE:
            w = _sparse_tile(codes_ptr, scales_ptr, mask_ptr, lut_ptr, rows, cols, row_ok, col_ok,
                             row_bytes, n_groups, mask_bytes, BITS, GROUP)
        else:
            w = _dense_tile(codes_ptr, scales_ptr, lut_ptr, rows, row_ok, k0, K, row_bytes, n_groups,
                            BITS, GROUP, BLOCK_N, BLOCK_K)
        if BLOCK_M == 1:  # batch 1: a row reduction in registers, no shared-memory round trip
            acc += tl.reduce(w * x.to(tl.float32), 1, _sum_combine)[None, :]
        elif DOT_FP32:  # w rounded to x's dtype first, so the numerics match the tensor-core path
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
            if BLOCK_M == 1:
                acc += tl.reduce(t * lw, 1, _sum_combine)[None, :]
            else:
                acc += tl.dot(t, tl.trans(lw), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])
