"""The packed format of docs/format.md, in plain torch: packing, codebooks, and `PackedLayer`."""
from .codebooks import CODEBOOK_INT8, CODEBOOK_NF, CODEBOOK_NF_BF16, decode_values, nf_table
from .layer import (
    ALLOWED_BITS,
    ALLOWED_GROUP_SIZES,
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    FormatError,
    PackedLayer,
    layout_problem,
)
from .packing import pack_codes, pack_mask, unpack_codes, unpack_mask

__all__ = [
    "ALLOWED_BITS", "ALLOWED_GROUP_SIZES", "CODEBOOK_INT8", "CODEBOOK_NF", "CODEBOOK_NF_BF16",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS", "FormatError", "PackedLayer", "decode_values", "layout_problem",
    "nf_table", "pack_codes", "pack_mask", "unpack_codes", "unpack_mask",
]
