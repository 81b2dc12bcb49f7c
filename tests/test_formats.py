"""The packed format: packing round trips, codebooks, and the reference matmul, for every option."""
from __future__ import annotations

import itertools

import pytest
import torch

from sqlora_hf.compression import CompressionSpec, compress_weight
from sqlora_hf.formats import FormatError, PackedLayer, pack_codes, pack_mask, unpack_codes, unpack_mask
from sqlora_hf.formats.codebooks import _NF2, _NF3, _NF4, build_normal_float
from sqlora_hf.formats.packing import check_mask_pattern
from sqlora_hf.nn import SQLoRALinear

BITS = (2, 3, 4, 8)
SPARSITY = (None, "2:4", "4:8")


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip_exact(bits):
    g = torch.Generator().manual_seed(bits)
    hi = 256 if bits == 8 else 1 << bits
    codes = torch.randint(0, hi, (7, 96), generator=g, dtype=torch.int32).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 96 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 96), codes)


def test_nibble_order_matches_spec():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 32)
    packed = pack_codes(codes, 4)
    # byte j = c_j | c_{j+16} << 4
    expected = [(j % 16) | (((j + 16) % 16) << 4) for j in range(16)]
    assert packed[0].tolist() == expected


def test_three_bit_planes_match_spec():
    codes = torch.tensor([[7] + [0] * 30 + [4]], dtype=torch.uint8)
    packed = pack_codes(codes, 3)[0].tolist()
    assert packed[0] == 3  # low two bits of c_0 in bits 0-1 of byte 0
    assert packed[8:12] == [1, 0, 0, 0x80]  # high bits: bit 0 (c_0) and bit 31 (c_31)


@pytest.mark.parametrize("bits,table", [(4, _NF4), (3, _NF3), (2, _NF2)])
def test_codebooks_follow_their_construction(bits, table):
    rebuilt = build_normal_float(bits)
    assert len(rebuilt) == len(table) == 1 << bits
    assert max(abs(a - b) for a, b in zip(rebuilt, table)) < 2e-7
    assert 0.0 in table and table[0] == -1.0 and table[-1] == 1.0


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_version_2_codebooks_are_the_bfloat16_roundings(bits):
    """Format 2's NF levels are format 1's rounded to bfloat16: exact float32 numbers whose low 16
    bits are zero (what the two-byte-plane CPU lookup needs), within 0.32 % of the float32 levels."""
    from sqlora_hf.formats import CODEBOOK_NF, CODEBOOK_NF_BF16, nf_table

    v1, v2 = nf_table(bits, codebook=CODEBOOK_NF), nf_table(bits, codebook=CODEBOOK_NF_BF16)
    assert torch.equal(v2, v1.to(torch.bfloat16).float())
    assert torch.all(v2.view(torch.int32) & 0xFFFF == 0)
    assert float(((v1 - v2).abs() / v1.abs().clamp_min(1e-6)).max()) < 3.2e-3
    assert v2[0] == -1 and v2[-1] == 1 and 0.0 in v2.tolist()
    assert not torch.equal(v1, v2)


def test_version_1_layers_decode_with_their_own_codebook():
    """A layer written as format 1 keeps its float32 NF levels; new layers are the current format (3)."""
    from sqlora_hf.formats import CODEBOOK_NF, CODEBOOK_NF_BF16, FORMAT_VERSION, nf_table

    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 16, (3, 64), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(3, 1, generator=g).to(torch.float16) + 0.5
    layers = {v: PackedLayer(PackedLayer.make_meta(4, 64, None, 3, 64, 0, version=v), pack_codes(codes, 4), scales)
              for v in (1, 2)}
    for version, codebook in ((1, CODEBOOK_NF), (2, CODEBOOK_NF_BF16)):
        layers[version].validate(f"v{version}")
        assert layers[version].codebook == codebook
        expected = nf_table(4, codebook=codebook)[codes.long()] * scales.float()
        assert torch.equal(layers[version].dequantize(), expected)
    assert FORMAT_VERSION == 3 and int(compress_weight(torch.randn(4, 64), CompressionSpec()).qmeta[0]) == 3
    with pytest.raises(ValueError, match="format version must be one of"):
        PackedLayer.make_meta(4, 64, None, 3, 64, 0, version=4)


def test_version_3_writes_2_bit_layers_with_the_skewed_table():
    """Format 3 changes only the 2-bit table; a version-2 2-bit layer still decodes with NF2, and a
    layer whose codebook does not match its version is refused."""
    from sqlora_hf.formats import CODEBOOK_NF_BF16, nf_table
    from sqlora_hf.formats.codebooks import CODEBOOK_SKEW2, _SKEW2, codebook_for_bits

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4, (5, 64), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(5, 2, generator=g).to(torch.float16) + 0.5
    for version, codebook in ((2, CODEBOOK_NF_BF16), (3, CODEBOOK_SKEW2)):
        layer = PackedLayer(PackedLayer.make_meta(2, 32, None, 5, 64, 0, version=version), pack_codes(codes, 2), scales)
        layer.validate(f"v{version}")
        assert layer.codebook == codebook
        expected = nf_table(2, codebook=codebook)[codes.long()] * scales.float().repeat_interleave(32, 1)
        assert torch.equal(layer.dequantize(), expected)
    skew = nf_table(2, codebook=CODEBOOK_SKEW2)
    assert skew.tolist() == list(_SKEW2) and torch.all(skew.view(torch.int32) & 0xFFFF == 0)  # bfloat16-exact
    assert [codebook_for_bits(b, 3) for b in (3, 4)] == [CODEBOOK_NF_BF16] * 2
    layer.qmeta[7] = CODEBOOK_NF_BF16  # a version-3 2-bit layer claiming NF2
    with pytest.raises(FormatError, match="codebook 2; 2-bit layers of format version 3 use 3"):
        layer.validate("bad")
    with pytest.raises(ValueError, match="no 3-bit table"):
        nf_table(3, codebook=CODEBOOK_SKEW2)


def test_plain_2_bit_scale_puts_the_largest_weight_on_the_minus_one_level():
    """The skewed table's top level is 0.5625, so plain round-to-nearest signs the scale: each group's
    largest-magnitude weight is reproduced exactly (up to float16) whatever its sign."""
    from sqlora_hf.compression.rtn import dequantize_groups, quantize_groups

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    codes, s16 = quantize_groups(w, 2, 64)
    q = dequantize_groups(codes, s16, 2)
    groups, qg = w.view(16, 2, 64), q.view(16, 2, 64)
    idx = groups.abs().argmax(-1, keepdim=True)
    assert torch.allclose(qg.gather(-1, idx), groups.gather(-1, idx), rtol=1e-3)
    assert (codes.view(16, 2, 64).gather(-1, idx) == 0).all()
    assert (s16 < 0).any() and (s16 > 0).any()


def test_mask_round_trip_and_patterns():
    torch.manual_seed(0)
    w = torch.randn(5, 64)
    from sqlora_hf.compression.sparsity import nm_mask

    for pattern in ("2:4", "4:8"):
        keep = nm_mask(w, pattern)
        mask = pack_mask(keep)
        assert torch.equal(unpack_mask(mask), keep)
        assert check_mask_pattern(mask, pattern)
    bad = pack_mask(torch.ones(5, 64, dtype=torch.bool))
    assert not check_mask_pattern(bad, "4:8")


@pytest.mark.parametrize("bits,sparsity,rank,group", [
    (b, s, r, g) for b, s, r, g in itertools.product(BITS, SPARSITY, (0, 5), (32, 64, 128))
    if not (s and g == 32)
])
def test_reference_matmul_equals_dequantized_product(bits, sparsity, rank, group):
    torch.manual_seed(1)
    n, k = 40, 256
    w = torch.randn(n, k) * 0.05
    bias = torch.randn(n)
    spec = CompressionSpec(bits=bits, group_size=group, sparsity=sparsity, rank=rank)
    layer = SQLoRALinear.from_dense(w, bias, spec, backend="reference")
    packed = layer.packed()
    packed.validate("test")
    assert packed.rank == rank and packed.sparsity == sparsity and packed.bits == bits
    x = torch.randn(3, 4, k)
    expected = x @ packed.dequantize().T + bias
    got = layer(x)
    assert got.shape == (3, 4, n)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the compressed weight is a sensible approximation (a broken packer would not be)
    rel = (packed.dequantize() - w).norm() / w.norm()
    assert rel < (0.75 if bits == 2 or sparsity else 0.25)
    # storage is exactly what the format says
    kc = k // 2 if sparsity else k
    expected_bytes = 32 + n * kc * bits // 8 + n * (k // group) * 2 + (n * k // 8 if sparsity else 0) + 2 * rank * (n + k)
    assert layer.storage_bytes() == expected_bytes


def test_sparse_layer_has_exact_zeros_where_pruned():
    torch.manual_seed(2)
    w = torch.randn(16, 128)
    p = compress_weight(w, CompressionSpec(bits=4, group_size=64, sparsity="4:8", rank=0))
    dense = p.dequantize()
    assert int((dense.view(16, -1, 8) != 0).sum(-1).max()) <= 4


def test_factors_sorted_so_prefixes_are_optimal():
    torch.manual_seed(3)
    w = torch.randn(48, 128)
    p = compress_weight(w, CompressionSpec(bits=3, group_size=64, rank=12))
    norms = (p.lowrank_l.float().norm(dim=0) * p.lowrank_r.float().norm(dim=1))
    assert torch.all(norms[:-1] >= norms[1:] * 0.999)


def _layer():
    torch.manual_seed(4)
    return compress_weight(torch.randn(8, 64), CompressionSpec(bits=4, group_size=64, sparsity="4:8", rank=2))


@pytest.mark.parametrize("breakage,needle", [
    (lambda p: p.qmeta.__setitem__(0, 4), "format version 4"),
    (lambda p: p.qmeta.__setitem__(0, 1), "codebook 2; 4-bit layers of format version 1 use 0"),
    (lambda p: p.qmeta.__setitem__(7, 0), "codebook 0; 4-bit layers of format version 3 use 2"),
    (lambda p: setattr(p, "qcodes", p.qcodes[:, :-1]), "qcodes"),
    (lambda p: setattr(p, "qscales", p.qscales.float()), "qscales"),
    (lambda p: setattr(p, "qmask", None), "qmask is missing"),
    (lambda p: setattr(p, "qmask", torch.full_like(p.qmask, 255)), "4:8 pattern"),
    (lambda p: setattr(p, "lowrank_r", p.lowrank_r[:1]), "lowrank_r"),
    (lambda p: p.qmeta.__setitem__(1, 5), "bits=5"),
    (lambda p: setattr(p, "qscales", p.qscales.clone().fill_(float("nan"))), "NaN"),
])
def test_validate_names_the_broken_tensor(breakage, needle):
    p = _layer()
    breakage(p)
    with pytest.raises(FormatError, match="mylayer"):
        try:
            p.validate("mylayer")
        except FormatError as err:
            assert needle in str(err), str(err)
            raise


def test_compress_rejects_nan_and_bad_rank():
    w = torch.randn(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="blk.q_proj.*NaN"):
        compress_weight(w, CompressionSpec(), "blk.q_proj")
    with pytest.raises(ValueError, match="rank=100 is larger"):
        compress_weight(torch.randn(8, 64), CompressionSpec(rank=100), "x")
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        compress_weight(torch.randn(8, 96), CompressionSpec(group_size=64), "x")
