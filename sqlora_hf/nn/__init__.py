"""torch.nn modules holding packed weights."""
from .linear import PACKED_NAMES, SQLoRALinear

__all__ = ["PACKED_NAMES", "SQLoRALinear"]
