"""The "triton" backend: registry glue around `launch.packed_linear`.

Where it runs:
* CUDA tensors: always (it is second in "auto", after a "cuda" backend if one is registered).
* CPU tensors: only through Triton's interpreter, and only when the user asked for both
  `TRITON_INTERPRET=1` *and* `backend="triton"` on the layer. "auto" never picks the interpreter: it
  is thousands of times slower than the CPU kernels and exists to check the GPU code without a GPU.
"""
from __future__ import annotations

import torch

from .. import register_backend
from .launch import SUPPORTED_DTYPES, interpreter_enabled, packed_linear


class TritonBackend:
    name = "triton"

    def is_available(self) -> bool:
        return True  # this module only imports when the triton package does

    def supports(self, module, x: torch.Tensor) -> bool:
        if x.dtype not in SUPPORTED_DTYPES:
            return False
        if x.device.type == "cuda":
            return module.qcodes.device == x.device
        if x.device.type != "cpu":
            return False
        if getattr(module, "backend", "auto") != "triton":
            return False  # "auto" must never choose the interpreter
        if not interpreter_enabled():
            raise RuntimeError(
                "backend 'triton' got a tensor on cpu: Triton kernels run on CUDA devices. To run them "
                "on CPU through Triton's interpreter (slow; for testing), set the environment variable "
                "TRITON_INTERPRET=1, or use backend='auto'/'reference'/'cpu' for CPU tensors."
            )
        return True

    def linear(self, module, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(module, x, interpret=x.device.type == "cpu")


register_backend(TritonBackend())
