"""Compression algorithms in pure torch (no transformers imports): weights in, `PackedLayer` out."""
from .compress import CompressionSpec, compress_weight

__all__ = ["CompressionSpec", "compress_weight"]
