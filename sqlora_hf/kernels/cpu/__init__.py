"""The "cpu" backend: packed C kernels (AVX-512 / AVX2 / scalar on x86, NEON on aarch64).

Load-time preparation (cached per module with `kernel_cache("cpu")`): fp16 scales and low-rank
factors become fp32 once, so the kernel's inner loop never converts halves. Codes and masks are used
in the canonical format as stored (docs/format.md); no repacking is needed for these kernels.
"""
from __future__ import annotations

import operator

import torch

from .. import register_backend
from ...formats.codebooks import nf_table
from . import library, ops  # noqa: F401  (ops registers torch.ops.sqlora_cpu.linear)

_SPARSITY_CODE = {None: 0, "2:4": 1, "4:8": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FAST_DTYPES = (torch.float32, torch.bfloat16)


def _stamp(t) -> tuple:
    """What tells a changed tensor from the one a cache entry was built from: its in-place version counter
    and its storage (a `.data = other` swap keeps the object but not the storage, and a cached descriptor
    holding the old storage's address must not outlive it). Inference-mode tensors have no version counter;
    they cannot be written in place outside inference mode."""
    if t is None:
        return (-1, 0)
    return (0 if t.is_inference() else t._version, t.data_ptr())


def _sources(module) -> tuple:
    """The tensors the prepared arguments derive from, with their stamps."""
    b = module._buffers
    src = (b.get("qmeta"), b.get("qcodes"), b.get("qscales"), b.get("qmask"), b.get("lowrank_l"),
           b.get("lowrank_r"), module._parameters.get("bias"))
    return src, tuple(map(_stamp, src))


def _arguments(module) -> dict:
    """The kernel's arguments from the module's current tensors: fp16 scales and factors (and a non-fp32
    bias) widened to fp32, shapes and dtypes checked against qmeta."""
    p = module.packed()
    p.validate("layer", check_values=False)  # shapes and dtypes against qmeta: no short buffers
    bias = module._parameters.get("bias")
    return {
        "codes": p.qcodes.contiguous(),
        "scales": p.qscales.to(torch.float32).contiguous(),
        "mask": None if p.qmask is None else p.qmask.contiguous(),
        "lut": nf_table(p.bits, codebook=p.codebook) if p.bits != 8 else torch.zeros(1),
        "L": None if p.rank == 0 else p.lowrank_l.to(torch.float32).contiguous(),
        "R": None if p.rank == 0 else p.lowrank_r.to(torch.float32).contiguous(),
        "meta": (p.out_features, p.bits, p.group_size, _SPARSITY_CODE[p.sparsity]),
        "bias": None if bias is None else bias.detach().to(torch.float32).contiguous(),
        "k": p.in_features,
    }


def prepared(module) -> dict:
    """The fp32 tensors the kernel reads, validated and described once per module (kernel cache).

    Rebuilt when a packed buffer or the bias was replaced, modified in place or given new storage since
    (identity and `_stamp`), so a call after validation costs a few attribute reads, not a re-check.
    A write that bypasses the version counter (through `.data` or a NumPy view) is not seen: call
    `module.clear_kernel_cache()` after one. The entry is built aside and published with one dict store, so
    a thread calling the same module meanwhile sees the old entry or the new one, never a half-built one.
    """
    cache = module._kernel_cache.get("cpu")
    src, stamps = _sources(module)
    if cache and cache["stamps"] == stamps and all(map(operator.is_, cache["src"], src)):
        return cache
    new = _arguments(module)
    n, bits, group, sparsity = new["meta"]
    new["described"] = ops.describe(new["codes"], new["scales"], new["mask"], new["lut"], new["L"], new["R"],
                                    new["bias"], n, new["k"], bits, group, sparsity)
    new["src"], new["stamps"] = src, stamps
    module._kernel_cache["cpu"] = new
    return new


def _fast_forward(module, x: torch.Tensor):
    """`module(x)` for the common inference call, or None to take the generic path.

    The generic path (SQLoRALinear.forward → kernels.resolve → CPUBackend.linear → checks) costs
    ~40 µs of Python per call, more than a 576x576 layer's kernel; SmolLM2 makes 210 such calls per
    token. Taken only when nothing could differ from the generic path: a plain contiguous CPU fp32 or
    bf16 tensor (bf16 converted as the generic path does), no autograd, no compute-dtype cast, not
    tracing, the same backend setting as when this module was prepared, and no packed buffer replaced or
    modified since (identity and version).
    """
    c = module._kernel_cache.get("cpu")
    if (not c or type(x) is not torch.Tensor or x.dtype not in _FAST_DTYPES or not x.is_cpu
            or not x.is_contiguous() or module.backend != c.get("backend_name")
            or module.compute_dtype not in (None, x.dtype)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (module.bias is not None and module.bias.requires_grad)):
        return None
    b = module._buffers
    src = c["src"]
    if (b.get("qcodes") is not src[1] or b.get("qscales") is not src[2] or b.get("qmask") is not src[3]
            or b.get("lowrank_l") is not src[4] or b.get("lowrank_r") is not src[5] or b.get("qmeta") is not src[0]
            or module._parameters.get("bias") is not src[6]
            or tuple(map(_stamp, src)) != c["stamps"]
            or torch.compiler.is_compiling()):
        return None
    d = c["described"]
    if x.dim() == 0 or x.shape[-1] != d.k:
        return None
    if x.dtype is torch.bfloat16:  # a bf16 model: exact in fp32, and the kernel may use bf16 products
        return ops.run_flat(d, x.float(), bf16_x=True).to(torch.bfloat16)
    return ops.run_flat(d, x)


class CPUBackend:
    name = "cpu"

    def is_available(self) -> bool:
        return library.load() is not None

    def supports(self, module, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _DTYPES and module.qcodes is not None and module.qcodes.device.type == "cpu"

    def dequantize_rows(self, module, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of Ŵ (no low-rank term) in fp32 by the C decoders, for the backward of
        fine-tuning: the same values as `PackedLayer.dequantize_quantized`, ~60x faster."""
        return ops.dequantize_rows(prepared(module)["described"], start, stop)

    def linear(self, module, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced: the fp32 conversions go into the graph, so a compiled call reads the buffers as they
            # are at each call (a cached fp32 copy would be baked in and miss in-place changes).
            a = _arguments(module)
            n, bits, group, sparsity = a["meta"]
            y = torch.ops.sqlora_cpu.linear(x.to(torch.float32).contiguous(), a["codes"], a["scales"], a["mask"],
                                            a["lut"], a["L"], a["R"], a["bias"], n, bits, group, sparsity)
            return y.to(x.dtype)
        c = prepared(module)
        if "backend_name" not in c:
            # This module runs on this backend: from now on its plain inference calls may skip the
            # generic forward (see `_fast_forward`); the entry goes when the kernel cache is cleared.
            # (`prepared` rebuilds `c` after an in-place change of a buffer, so this is set again then.)
            module._kernel_cache["forward"] = _fast_forward
            c["backend_name"] = module.backend
        x32 = x.to(torch.float32).contiguous()
        if type(x32) is torch.Tensor:
            # Eager: straight to the C library with the layer described once (no dispatcher, no
            # per-buffer checks). Tracing, fake tensors and torch.compile go through the custom op.
            # bf16 inputs are exact in fp32, and tell the kernel it may use bf16 dot products.
            y = ops.run(c["described"], x32, bf16_x=x.dtype is torch.bfloat16)
        else:
            n, bits, group, sparsity = c["meta"]
            y = torch.ops.sqlora_cpu.linear(x32, c["codes"], c["scales"], c["mask"], c["lut"], c["L"], c["R"],
                                            c["bias"], n, bits, group, sparsity)
        return y.to(x.dtype)


register_backend(CPUBackend())
