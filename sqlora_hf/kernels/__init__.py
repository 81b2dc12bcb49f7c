"""Kernel backends: one module per backend, all tested against `reference`.

A backend multiplies activations by a packed layer. `SQLoRALinear.forward` asks `resolve()` for
one; "auto" takes the first backend in `AUTO_ORDER` that is available and supports the input.
Backends register themselves with `register_backend` when their module is imported.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..nn.linear import SQLoRALinear


class Backend(Protocol):
    name: str

    def is_available(self) -> bool:
        """True when this machine can run the backend at all (library built, driver present, ...)."""

    def supports(self, module: "SQLoRALinear", x: torch.Tensor) -> bool:
        """True when this backend can run this layer on this input (device, dtype, format option)."""

    def linear(self, module: "SQLoRALinear", x: torch.Tensor) -> torch.Tensor:
        """`x [M, K]` → `[M, N]`, low-rank term and bias included."""


_BACKENDS: dict[str, Backend] = {}
# Fastest first; "reference" supports everything and ends the list.
AUTO_ORDER: list[str] = ["cuda", "triton", "cpu", "reference"]


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    """Names a user may pass as `SQLoRAConfig(backend=...)`, besides "auto"."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *backend_names()]}, got {name!r}")
    return _BACKENDS[name]


def resolve(name: str, module: "SQLoRALinear", x: torch.Tensor) -> Backend:
    """The backend to run `module` on `x`; a named backend that cannot run it is an error, not a fallback."""
    if name != "auto":
        backend = get_backend(name)
        if not backend.is_available():
            raise RuntimeError(f"backend {name!r} is not available on this machine")
        if not backend.supports(module, x):
            raise RuntimeError(
                f"backend {name!r} cannot run this layer ({module.extra_repr()}) on a "
                f"{x.dtype} tensor on {x.device}"
            )
        return backend
    for candidate in AUTO_ORDER:
        backend = _BACKENDS.get(candidate)
        if backend is not None and backend.is_available() and backend.supports(module, x):
            return backend
    raise RuntimeError("no kernel backend can run this layer")  # unreachable: reference supports all


from . import reference  # noqa: E402,F401  (registers itself)
from . import triton as _triton_kernels  # noqa: E402,F401  (registers "triton" when the triton package is installed)
try:  # the C backend is optional: a missing/broken library must never break `import sqlora_hf`
    from . import cpu as _cpu_kernels  # noqa: E402,F401  (registers "cpu")
except Exception as _err:  # pragma: no cover
    import warnings

    warnings.warn(f"sqlora_hf: the CPU kernel backend could not be registered ({type(_err).__name__}: {_err}); "
                  "the reference backend is used instead", RuntimeWarning)
