"""Triton GPU kernels for the packed format (backend "triton"); see docs/kernels_gpu.md.

Importing this package registers the backend when the `triton` package is importable. Without it
(a CPU-only install) nothing is registered and `import sqlora_hf` still works: the backend is then
simply not in `kernels.backend_names()`.
"""
from __future__ import annotations

import logging

AVAILABLE = False
try:
    import triton  # noqa: F401  (the top-level package, not this one)
except ImportError:
    pass  # CPU-only install: no "triton" backend
else:
    try:
        from . import backend  # noqa: F401  (registers "triton")

        AVAILABLE = True
    except Exception as error:  # a broken triton install must not break `import sqlora_hf`
        logging.getLogger(__name__).warning("Triton backend disabled: %s", error)
