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


def _sources(module) -> tuple:
    """The tensors the prepared arguments derive from, with their in-place version counters."""
    b = module._buffers
    src = (b.get("qmeta"), b.get("qcodes"), b.get("qscales"), b.get("qmask"), b.get("lowrank_l"),
           b.get("lowrank_r"), module._parameters.get("bias"))
    return src, tuple(-1 if t is None else t._version for t in src)


def prepared(module) -> dict:
    """The fp32 tensors the kernel reads, validated and described once per module (kernel cache).

    Rebuilt when a packed buffer or the bias was replaced or modified in place since (identity and
    version counter), so a call after validation costs a few attribute reads, not a re-check.
    """
    cache = module.kernel_cache("cpu")
    src, versions = _sources(module)
    if cache and cache["versions"] == versions and all(map(operator.is_, cache["src"], src)):
        return cache
    cache.clear()
    p = module.packed()
    p.validate("layer", check_values=False)  # shapes and dtypes against qmeta: no short buffers
    cache["codes"] = p.qcodes.contiguous()
    cache["scales"] = p.qscales.to(torch.float32).contiguous()
    cache["mask"] = None if p.qmask is None else p.qmask.contiguous()
    cache["lut"] = nf_table(p.bits) if p.bits != 8 else torch.zeros(1)
    cache["L"] = None if p.rank == 0 else p.lowrank_l.to(torch.float32).contiguous()
    cache["R"] = None if p.rank == 0 else p.lowrank_r.to(torch.float32).contiguous()
    cache["meta"] = (p.out_features, p.bits, p.group_size, _SPARSITY_CODE[p.sparsity])
    bias = src[-1]
    cache["bias"] = None if bias is None else bias.detach().to(torch.float32).contiguous()
    n, bits, group, sparsity = cache["meta"]
    cache["described"] = ops.describe(cache["codes"], cache["scales"], cache["mask"], cache["lut"], cache["L"],
                                      cache["R"], cache["bias"], n, p.in_features, bits, group, sparsity)
    cache["src"], cache["versions"] = src, versions
    return cache


class CPUBackend:
    name = "cpu"

    def is_available(self) -> bool:
        return library.load() is not None

    def supports(self, module, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _DTYPES and module.qcodes is not None and module.qcodes.device.type == "cpu"

    def linear(self, module, x: torch.Tensor) -> torch.Tensor:
        c = prepared(module)
        x32 = x.to(torch.float32).contiguous()
        if type(x32) is torch.Tensor and not torch.compiler.is_compiling():
            # Eager: straight to the C library with the layer described once (no dispatcher, no
            # per-buffer checks). Tracing, fake tensors and torch.compile go through the custom op.
            y = ops.run(c["described"], x32)
        else:
            n, bits, group, sparsity = c["meta"]
            y = torch.ops.sqlora_cpu.linear(x32, c["codes"], c["scales"], c["mask"], c["lut"], c["L"], c["R"],
                                            c["bias"], n, bits, group, sparsity)
        return y.to(x.dtype)


register_backend(CPUBackend())
