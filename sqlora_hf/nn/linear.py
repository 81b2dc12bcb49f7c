"""`SQLoRALinear`: a compressed Linear that keeps its weights packed and multiplies through a backend.

It deliberately does not subclass `nn.Linear`: PEFT and other tools would then treat the packed
integer buffers as a float weight (see docs/architecture.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import kernels
from ..formats.layer import PackedLayer

PACKED_NAMES = ("qmeta", "qcodes", "qscales", "qmask", "lowrank_l", "lowrank_r")
# Packed buffers keep their dtype through `.to(dtype)` / `.half()`: the format fixes it.
_FIXED_DTYPES = {"qscales": torch.float16, "lowrank_l": torch.float16, "lowrank_r": torch.float16}


class SQLoRALinear(nn.Module):
    """`y = x·Ŵᵀ + (x·Rᵀ)·Lᵀ + b` with Ŵ stored packed (docs/format.md).

    Before its weight is loaded the module holds a `weight` slot with the original checkpoint shape
    (so the loader can hand the fp tensor to the quantizer); afterwards only the packed buffers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: Optional[torch.dtype] = None,
        backend: str = "auto",
        transposed_source: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.backend = backend
        # GPT-2's Conv1D stores the weight as [in, out]; the quantizer transposes it before packing.
        self.transposed_source = transposed_source
        for name in PACKED_NAMES:
            self.register_buffer(name, None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict = {}

    # ---- building ------------------------------------------------------------------------------
    def add_weight_slot(self, dtype: Optional[torch.dtype] = None) -> None:
        """A meta `weight` parameter with the checkpoint's shape, for quantize-while-loading."""
        shape = (self.in_features, self.out_features) if self.transposed_source else (self.out_features, self.in_features)
        # Direct dict write: the `weight` property would make `register_parameter` refuse the name.
        self._parameters["weight"] = nn.Parameter(torch.empty(shape, device="meta", dtype=dtype), requires_grad=False)

    def allocate(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Empty meta buffers with the given shapes and dtypes (for loading a pre-quantized checkpoint)."""
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    def set_packed(self, packed: PackedLayer) -> None:
        """Install packed tensors (from the compressor) and drop the fp weight slot."""
        if "weight" in self._parameters:
            del self._parameters["weight"]
        tensors = packed.tensors()
        for name in PACKED_NAMES:
            self.register_buffer(name, tensors.get(name))
        self._kernel_cache.clear()
        # shown by report(): known right after compression, None once the factors were cut (rank_keep,
        # a reload budget) or for a layer that was loaded packed
        self.relative_error = getattr(packed, "relative_error", None)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], spec, name: str = "layer",
                   **kwargs) -> "SQLoRALinear":
        """Compress a dense `[N, K]` weight into a new module (outside `from_pretrained`)."""
        from ..compression import compress_weight

        n, k = weight.shape
        module = cls(k, n, bias=bias is not None, dtype=None if bias is None else bias.dtype, **kwargs)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        packed = compress_weight(weight, spec, name)
        module.set_packed(packed)
        return module

    # ---- views ---------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The fp slot while loading; afterwards an empty tensor that only carries device and dtype.

        Code written for `nn.Linear` reads `.weight` for its device/dtype (PEFT) or touches it in
        weight init (GPT-2's `_init_weights`); the empty tensor answers both without pretending to be
        a dense weight (use `dequantize()` for that).
        """
        slot = self._parameters.get("weight")
        if slot is not None:
            return slot
        ref = self.qcodes if self.qcodes is not None else self.bias
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = self.compute_dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        proxy = torch.empty(0, device=device, dtype=dtype)
        proxy._is_hf_initialized = True
        return proxy

    def packed(self) -> PackedLayer:
        return PackedLayer(self.qmeta, self.qcodes, self.qscales, self.qmask, self.lowrank_l, self.lowrank_r)

    @property
    def is_packed(self) -> bool:
        return self.qmeta is not None and self.qmeta.device.type != "meta"

    @property
    def bits(self) -> int:
        return self.packed().bits

    @property
    def rank(self) -> int:
        return self.packed().rank

    @property
    def sparsity(self) -> Optional[str]:
        return self.packed().sparsity

    @property
    def group_size(self) -> int:
        return self.packed().group_size

    def storage_bytes(self) -> int:
        """Exact bytes of the compressed weight (codes, scales, mask, factors, qmeta; bias excluded)."""
        return self.packed().nbytes()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense `[out, in]` weight this layer represents, low-rank term included."""
        return self.packed().dequantize(dtype)

    def extra_repr(self) -> str:
        if not self.is_packed:
            return f"in_features={self.in_features}, out_features={self.out_features}, packed=False"
        p = self.packed()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={p.bits}, "
            f"group_size={p.group_size}, sparsity={p.sparsity}, rank={p.rank}, bias={self.bias is not None}"
        )

    # ---- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._kernel_cache.get("forward")  # a backend's shortcut for plain inference calls
        if fast is not None:
            y = fast(self, x)
            if y is not None:
                return y
        if not self.is_packed:
            raise RuntimeError("SQLoRALinear has no packed weights (it was never loaded or compressed)")
        in_dtype = x.dtype
        if self.compute_dtype is not None and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        backend = kernels.resolve(self.backend, self, x2)
        if torch.is_grad_enabled() and (x2.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            y = _PackedLinearGrad.apply(x2, self.bias, self, backend)
        else:
            y = backend.linear(self, x2)
        return y.reshape(*lead, self.out_features).to(in_dtype)

    def kernel_cache(self, key: str) -> dict:
        """Per-backend scratch space (repacked weights); cleared when the packed tensors change."""
        return self._kernel_cache.setdefault(key, {})

    def clear_kernel_cache(self) -> None:
        """Forget every backend's prepared copy of the packed tensors. Needed only after a write that
        bypasses autograd's version counter (`layer.qscales.data.mul_(2)`, a NumPy view): ordinary in-place
        ops, `.data =` swaps and replaced buffers are noticed by themselves."""
        self._kernel_cache.clear()

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)`, `.half()` etc. would round the float16 scales and factors through another
        # dtype; keep the originals and only follow the device change.
        originals = {n: getattr(self, n) for n in _FIXED_DTYPES if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        self._kernel_cache.clear()
        return self


# Largest dense piece of Ŵ the backward materialises at once (elements; 16 MiB in fp32). Every
# transformer Linear of a small model fits in one piece; a packed output head (SmolLM2: 49152 × 576,
# 113 MB in fp32, and its dequantizer's temporaries several times that) is done in row slices.
BACKWARD_CHUNK_ELEMENTS = 1 << 22


def _grad_through_quantized(packed, grad_y: torch.Tensor, rows=None) -> torch.Tensor:
    """grad_y · Ŵ, dequantizing Ŵ in row slices of at most `BACKWARD_CHUNK_ELEMENTS` elements.

    `rows(start, stop)` gives those rows of Ŵ in fp32 when the layer's backend has a fast dequantizer
    (the C one is ~60x faster than the torch oracle and gives the same values); else the oracle."""
    n, k = packed.out_features, packed.in_features
    step = max(1, BACKWARD_CHUNK_ELEMENTS // k)

    def piece(start: int, stop: int) -> torch.Tensor:
        if rows is not None:
            return rows(start, stop).to(grad_y.dtype)
        whole = start == 0 and stop == n
        return (packed if whole else packed.row_slice(start, stop)).dequantize_quantized(grad_y.dtype)

    if n <= step:
        return grad_y @ piece(0, n)
    grad_x = grad_y.new_zeros(grad_y.shape[0], k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        grad_x.addmm_(grad_y[:, start:stop], piece(start, stop))
    return grad_x


class _PackedLinearGrad(torch.autograd.Function):
    """Backward for any kernel backend: grad_x = grad_y·Ŵ + (grad_y·L)·R, grad_b = Σ grad_y.

    Kernels (C, Triton) have no autograd, and even the reference backend would keep every layer's
    dense Ŵ alive until backward. Here the forward runs without a graph and the backward dequantizes
    this one layer's Ŵ (in row slices when it is large), uses it and frees it, so training never holds
    more than one dense weight.
    The packed buffers are read only: they never receive a gradient.
    """

    @staticmethod
    def forward(ctx, x2: torch.Tensor, bias: Optional[torch.Tensor], module: "SQLoRALinear", backend) -> torch.Tensor:
        ctx.module, ctx.backend = module, backend
        return backend.linear(module, x2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        module = ctx.module
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            packed = module.packed()
            fast = getattr(ctx.backend, "dequantize_rows", None)
            rows = None if fast is None or grad_y.device.type != "cpu" else (lambda a, b: fast(module, a, b))
            grad_x = _grad_through_quantized(packed, grad_y, rows)
            if packed.rank > 0:
                grad_x = grad_x + (grad_y @ packed.lowrank_l.to(grad_y.dtype)) @ packed.lowrank_r.to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.sum(0).to(module.bias.dtype)
        return grad_x, grad_bias, None, None
