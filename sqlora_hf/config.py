"""`SQLoRAConfig`: what the user asks for, validated field by field when it is built.

Every error names the field, the value given and what is allowed, because a quantization config is
often built from JSON or a command line where a typo would otherwise surface as a wrong model.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats.layer import ALLOWED_BITS, ALLOWED_GROUP_SIZES, FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS

QUANT_METHOD = "sqlora"
ALLOWED_SPARSITY = (None, "2:4", "4:8")
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SQLoRAConfig.{field}={value!r} is not valid; allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SQLoRAConfig(QuantizationConfigMixin):
    """Configuration of sqlora_hf compression.

    Args:
        bits: bit width of the quantized weights: 2, 3, 4 (normal-float codebooks) or 8 (int8).
        group_size: input columns sharing one float16 scale: 32, 64, 128 or 256.
        sparsity: None (dense), "2:4" or "4:8" structured sparsity. Opt-in: it costs quality.
        rank: rank of the low-rank correction `L·R`: an int (0 = none) or "auto" (chosen per layer
            from the spectrum of the quantization residual).
        modules_to_not_convert: module names or patterns left uncompressed (transformers' matching
            rules). Embeddings and the output head always stay uncompressed.
        compute_dtype: dtype of the matmul: None (the activations' dtype), "float32", "float16",
            "bfloat16".
        backend: kernel backend: "auto" (fastest available) or a registered name such as "reference".
        format_version: version of the packed format (docs/format.md).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        sparsity: Optional[str] = None,
        rank: Union[int, str] = "auto",
        modules_to_not_convert: Optional[list[str]] = None,
        compute_dtype: Optional[Union[str, torch.dtype]] = None,
        backend: str = "auto",
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"SQLoRAConfig got unknown fields {sorted(kwargs)}; known fields: "
                "bits, group_size, sparsity, rank, modules_to_not_convert, compute_dtype, backend, format_version"
            )
        self.bits = bits
        self.group_size = group_size
        self.sparsity = sparsity
        self.rank = rank
        self.modules_to_not_convert = modules_to_not_convert
        self.compute_dtype = _dtype_name(compute_dtype)
        self.backend = backend
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        """Validate every field (also called again by `validate()` after edits)."""
        if not _is_int(self.bits) or self.bits not in ALLOWED_BITS:
            raise _bad("bits", self.bits, ", ".join(map(str, ALLOWED_BITS)))
        if not _is_int(self.group_size) or self.group_size not in ALLOWED_GROUP_SIZES:
            raise _bad("group_size", self.group_size, ", ".join(map(str, ALLOWED_GROUP_SIZES)))
        if self.sparsity not in ALLOWED_SPARSITY:
            raise _bad("sparsity", self.sparsity, 'None, "2:4", "4:8"')
        if self.sparsity is not None and self.group_size % 64:
            raise _bad("group_size", self.group_size, "64, 128 or 256 when sparsity is set")
        if not (self.rank == "auto" or (_is_int(self.rank) and self.rank >= 0)):
            raise _bad("rank", self.rank, '"auto" or an int >= 0 (0 = no low-rank correction)')
        m = self.modules_to_not_convert
        if m is not None and (not isinstance(m, (list, tuple)) or not all(isinstance(s, str) for s in m)):
            raise _bad("modules_to_not_convert", m, "None or a list of module names / patterns (strings)")
        if m is not None:
            self.modules_to_not_convert = list(m)
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise _bad("compute_dtype", self.compute_dtype, "None, " + ", ".join(COMPUTE_DTYPES))
        from . import kernels

        allowed_backends = ["auto", *kernels.backend_names()]
        if self.backend not in allowed_backends:
            raise _bad("backend", self.backend, ", ".join(allowed_backends))
        if not _is_int(self.format_version) or self.format_version < 1:
            raise _bad("format_version", self.format_version, f"an int in {list(SUPPORTED_FORMAT_VERSIONS)}")
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"SQLoRAConfig.format_version={self.format_version} is newer than this sqlora_hf understands "
                f"(it reads {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade sqlora_hf"
            )

    def validate(self) -> None:
        self.post_init()

    @property
    def torch_compute_dtype(self) -> Optional[torch.dtype]:
        return None if self.compute_dtype is None else COMPUTE_DTYPES[self.compute_dtype]


def _dtype_name(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        for name, dt in COMPUTE_DTYPES.items():
            if dt == value:
                return name
        raise _bad("compute_dtype", value, "None, " + ", ".join(COMPUTE_DTYPES))
    if isinstance(value, str) and value.startswith("torch."):
        return value[len("torch."):]
    return value
