"""`PackedLayer`: the tensors of one compressed layer, their invariants, and the reference dequantizer.

Everything that reads or writes the format goes through this class, so the checks a corrupt
checkpoint must fail live in one place (`PackedLayer.validate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .codebooks import CODEBOOKS_OF_VERSION, CURRENT_VERSION, codebook_for_bits, decode_values
from .packing import check_mask_pattern, packed_row_bytes, unpack_codes, unpack_mask

# The versions differ only in their level tables (codebooks.CODEBOOKS_OF_VERSION): 2 rounds the NF
# levels to bfloat16, 3 writes 2-bit layers with the skewed table. New layers are written as the
# current version; older layers keep decoding with their own tables.
FORMAT_VERSION = CURRENT_VERSION
SUPPORTED_FORMAT_VERSIONS = tuple(sorted(CODEBOOKS_OF_VERSION))
SPARSITY_CODES = {None: 0, "2:4": 1, "4:8": 2}
SPARSITY_NAMES = {v: k for k, v in SPARSITY_CODES.items()}
ALLOWED_BITS = (2, 3, 4, 8)
ALLOWED_GROUP_SIZES = (32, 64, 128, 256)
# qmeta layout (docs/format.md)
META_VERSION, META_BITS, META_GROUP, META_SPARSITY, META_OUT, META_IN, META_RANK, META_CODEBOOK = range(8)
QMETA_LEN = 8


class FormatError(ValueError):
    """A packed tensor breaks the format; the message names the tensor."""


def layout_problem(bits: int, group_size: int, sparsity: Optional[str], in_features: int) -> Optional[str]:
    """Why a layer with these settings cannot be packed, or None if it can."""
    if in_features % group_size:
        return f"in_features={in_features} is not a multiple of group_size={group_size}"
    if sparsity is not None and group_size % 64:
        return f"sparsity {sparsity!r} needs a group_size that is a multiple of 64, got {group_size}"
    return None


@dataclass
class PackedLayer:
    """The canonical tensors of one layer. `lowrank_l`/`lowrank_r` are None when rank is 0."""

    qmeta: torch.Tensor
    qcodes: torch.Tensor
    qscales: torch.Tensor
    qmask: Optional[torch.Tensor] = None
    lowrank_l: Optional[torch.Tensor] = None
    lowrank_r: Optional[torch.Tensor] = None

    # ---- metadata views ------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.qmeta[META_VERSION])

    @property
    def bits(self) -> int:
        return int(self.qmeta[META_BITS])

    @property
    def group_size(self) -> int:
        return int(self.qmeta[META_GROUP])

    @property
    def sparsity(self) -> Optional[str]:
        return SPARSITY_NAMES.get(int(self.qmeta[META_SPARSITY]), "?")

    @property
    def out_features(self) -> int:
        return int(self.qmeta[META_OUT])

    @property
    def in_features(self) -> int:
        return int(self.qmeta[META_IN])

    @property
    def rank(self) -> int:
        return int(self.qmeta[META_RANK])

    @property
    def codebook(self) -> int:
        return int(self.qmeta[META_CODEBOOK])

    @property
    def n_stored(self) -> int:
        return self.in_features // 2 if self.sparsity else self.in_features

    @staticmethod
    def make_meta(bits: int, group_size: int, sparsity: Optional[str], out_features: int,
                  in_features: int, rank: int, version: int = FORMAT_VERSION) -> torch.Tensor:
        """`qmeta` of a layer written as format `version` (its codebook follows from the version)."""
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(f"format version must be one of {list(SUPPORTED_FORMAT_VERSIONS)}; got {version!r}")
        return torch.tensor(
            [version, bits, group_size, SPARSITY_CODES[sparsity], out_features, in_features,
             rank, codebook_for_bits(bits, version)],
            dtype=torch.int32,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under their serialized names (absent ones left out)."""
        out = {"qmeta": self.qmeta, "qcodes": self.qcodes, "qscales": self.qscales}
        if self.qmask is not None:
            out["qmask"] = self.qmask
        if self.lowrank_l is not None:
            out["lowrank_l"] = self.lowrank_l
            out["lowrank_r"] = self.lowrank_r
        return out

    def nbytes(self) -> int:
        """Exact storage of the compressed weight in bytes (everything except the bias)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # ---- checks --------------------------------------------------------------------------------
    def validate(self, name: str = "layer", check_values: bool = True) -> None:
        """Raise `FormatError` naming the offending tensor if anything breaks docs/format.md."""
        m = self.qmeta
        if m.dtype != torch.int32 or m.shape != (QMETA_LEN,):
            raise FormatError(f"{name}.qmeta must be int32 [{QMETA_LEN}], got {m.dtype} {tuple(m.shape)}")
        if self.version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError(
                f"{name}.qmeta says format version {self.version}; this sqlora_hf reads versions "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade sqlora_hf to load this checkpoint."
            )
        bits, g, n, k, r = self.bits, self.group_size, self.out_features, self.in_features, self.rank
        if bits not in ALLOWED_BITS:
            raise FormatError(f"{name}.qmeta has bits={bits}; allowed {list(ALLOWED_BITS)}")
        if g not in ALLOWED_GROUP_SIZES:
            raise FormatError(f"{name}.qmeta has group_size={g}; allowed {list(ALLOWED_GROUP_SIZES)}")
        if self.sparsity == "?":
            raise FormatError(f"{name}.qmeta has an unknown sparsity code {int(m[META_SPARSITY])}")
        if n <= 0 or k <= 0 or r < 0 or r > min(n, k):
            raise FormatError(f"{name}.qmeta has impossible sizes out={n} in={k} rank={r}")
        problem = layout_problem(bits, g, self.sparsity, k)
        if problem:
            raise FormatError(f"{name}.qmeta: {problem}")
        expected_cb = codebook_for_bits(bits, self.version)
        if self.codebook != expected_cb:
            raise FormatError(f"{name}.qmeta has codebook {self.codebook}; {bits}-bit layers of format version "
                              f"{self.version} use {expected_cb}")
        self._expect(name, "qcodes", self.qcodes, torch.uint8, (n, packed_row_bytes(self.n_stored, bits)))
        self._expect(name, "qscales", self.qscales, torch.float16, (n, k // g))
        if self.sparsity:
            self._expect(name, "qmask", self.qmask, torch.uint8, (n, k // 8))
            if check_values and not check_mask_pattern(self.qmask, self.sparsity):
                raise FormatError(f"{name}.qmask does not follow the {self.sparsity} pattern")
        elif self.qmask is not None:
            raise FormatError(f"{name}.qmask is present but qmeta says the layer is dense")
        if r > 0:
            self._expect(name, "lowrank_l", self.lowrank_l, torch.float16, (n, r))
            self._expect(name, "lowrank_r", self.lowrank_r, torch.float16, (r, k))
        elif self.lowrank_l is not None or self.lowrank_r is not None:
            raise FormatError(f"{name}.lowrank_l/lowrank_r are present but qmeta says rank 0")
        if check_values:
            for key, t in self.tensors().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise FormatError(f"{name}.{key} holds NaN or Inf")

    @staticmethod
    def _expect(name: str, key: str, t: Optional[torch.Tensor], dtype: torch.dtype, shape: tuple) -> None:
        if t is None:
            raise FormatError(f"{name}.{key} is missing")
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise FormatError(
                f"{name}.{key} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}"
            )

    def rows(self, index: torch.Tensor) -> "PackedLayer":
        """The layer restricted to output rows `index` (for embedding lookups from a packed head).

        Every tensor is stored row-major by output row, so a row subset is a gather on dim 0; the
        shared `R` factor and the codebook stay as they are.
        """
        return self._restricted(int(index.numel()), lambda t: t.index_select(0, index))

    def row_slice(self, start: int, stop: int) -> "PackedLayer":
        """Output rows `start:stop` as views (no copy): for dequantizing a large layer piece by piece."""
        return self._restricted(stop - start, lambda t: t[start:stop])

    def _restricted(self, n_rows: int, pick) -> "PackedLayer":
        meta = self.qmeta.clone()
        meta[META_OUT] = n_rows  # the rank stays: a subset is dequantized, never validated
        cut = (lambda t: None if t is None else pick(t))
        return PackedLayer(meta, cut(self.qcodes), cut(self.qscales), cut(self.qmask), cut(self.lowrank_l),
                           self.lowrank_r)

    # ---- reference dequantizer -----------------------------------------------------------------
    def dequantize_quantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ as a dense `[N, K]` matrix (without the low-rank term): the oracle every kernel matches."""
        n, k, g = self.out_features, self.in_features, self.group_size
        codes = unpack_codes(self.qcodes, self.bits, self.n_stored)
        values = decode_values(codes, self.bits, torch.float32, self.codebook)  # [N, Kc]
        per_group = g // 2 if self.sparsity else g
        scales = self.qscales.to(torch.float32).repeat_interleave(per_group, dim=1)
        values = values * scales
        if not self.sparsity:
            return values.to(dtype)
        keep = unpack_mask(self.qmask)
        dense = torch.zeros(n, k, dtype=torch.float32, device=values.device)
        dense[keep] = values.reshape(-1)
        return dense.to(dtype)

    def lowrank_product(self, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        if self.rank == 0:
            return None
        return self.lowrank_l.to(dtype) @ self.lowrank_r.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight the layer represents: Ŵ + L·R."""
        w = self.dequantize_quantized(torch.float32)
        lr = self.lowrank_product(torch.float32)
        if lr is not None:
            w = w + lr
        return w.to(dtype)
