"""The "cpu" C backend against the reference backend, on every ISA path this machine runs."""
from __future__ import annotations

import os

import pytest
import torch

from sqlora_hf import kernels
from sqlora_hf.compression.compress import CompressionSpec, compress_weight
from sqlora_hf.formats.codebooks import nf_table
from sqlora_hf.formats.packing import unpack_codes
from sqlora_hf.kernels.cpu import library
from sqlora_hf.nn.linear import SQLoRALinear

pytestmark = pytest.mark.skipif(library.load() is None, reason=f"CPU kernels not built: {library.load_error()}")

ISAS = [isa for isa in ("scalar", "avx2", "avx512", "neon", "dotprod") if isa in library.supported_isas()]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("SQLORA_CPU_ISA", request.param)
    return request.param


def make_layer(n: int, k: int, bits: int, group: int, sparsity, rank: int, bias: bool, seed: int = 0) -> SQLoRALinear:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    spec = CompressionSpec(bits=bits, group_size=group, sparsity=sparsity, rank=rank, qa_iterations=0)
    return SQLoRALinear.from_dense(w, b, spec)


def run(module: SQLoRALinear, x: torch.Tensor, backend: str) -> torch.Tensor:
    module.backend = backend
    with torch.no_grad():
        return module(x)


def assert_close_rel(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    rel = (y - ref).norm() / ref.norm().clamp_min(1e-12)
    assert rel < tol, f"relative error {rel:.3e} > {tol}"
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())


FORMATS = [
    (4, 64, None), (4, 32, None), (4, 128, None), (4, 256, None), (3, 64, None), (8, 64, None), (2, 64, None),
    (3, 32, None), (3, 256, None), (2, 128, None),
    (4, 64, "2:4"), (4, 128, "4:8"), (3, 64, "4:8"), (8, 64, "2:4"), (2, 128, "2:4"),
]


@pytest.mark.parametrize("bits,group,sparsity", FORMATS)
def test_every_format_matches_reference(isa, bits, group, sparsity):
    # N odd and not a multiple of any SIMD width; K a multiple of the group size (the format's rule).
    n, k = 37, group * 3
    module = make_layer(n, k, bits, group, sparsity, rank=5, bias=True)
    for m in (1, 3, 16):
        x = torch.randn(m, k)
        assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))


@pytest.mark.parametrize("group,k,sparsity", [(64, 192, None), (32, 96, None), (128, 256, None),
                                               (64, 192, "4:8"), (128, 256, "2:4")])
def test_format_1_layers_match_reference(isa, group, k, sparsity):
    """Layers of format version 1 (float32 NF levels: the 4-byte-plane lookup) and of version 2
    (bfloat16 levels: the 2-plane lookup), dense and sparse, both match the reference, which decodes
    each with its own table."""
    from sqlora_hf.formats.codebooks import CODEBOOK_NF

    module = make_layer(37, k, 4, group, sparsity, rank=3, bias=True)
    x = torch.randn(1, k)
    y2 = run(module, x, "cpu")
    assert_close_rel(y2, run(module, x, "reference"))
    module.qmeta[0], module.qmeta[7] = 1, CODEBOOK_NF  # in place: the kernel cache sees the new version
    assert module.packed().codebook == CODEBOOK_NF
    y1 = run(module, x, "cpu")
    assert_close_rel(y1, run(module, x, "reference"))
    assert not torch.equal(y1, y2)  # the two codebooks differ, and each layer used its own


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,k", [(64, 6208), (32, 6176), (256, 6400), (128, 1664)])
def test_long_rows_match_reference(isa, bits, group, k):
    # K >= 6144: the AVX-512 4-bit batch-1 kernel takes rows four at a time (N = 37: one row left over);
    # for groups 32/64 K ends in a partial chunk (128 columns for 4-bit, 256 for 2/3-bit). Batches 2, 4
    # and 6 reach the small-batch kernels' blocks of 2 and 4 rows of x.
    module = make_layer(37, k, bits, group, None, rank=3, bias=True)
    for m in (1, 2, 4, 6):
        x = torch.randn(m, k)
        assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))


@pytest.mark.parametrize("bits,group,sparsity", FORMATS)
def test_large_batches_match_reference(isa, bits, group, sparsity, monkeypatch):
    # From SQLORA_CPU_GEMM_MIN_ROWS rows (default 32) a call multiplies dequantized row tiles with torch's
    # BLAS; with it set to 0 the packed kernel takes every batch. Both must give the reference's numbers.
    module = make_layer(37, group * 3, bits, group, sparsity, rank=4, bias=True)
    x = torch.randn(40, group * 3)
    ref = run(module, x, "reference")
    assert_close_rel(run(module, x, "cpu"), ref)
    monkeypatch.setenv("SQLORA_CPU_GEMM_MIN_ROWS", "0")  # (fp32 4-bit dense: the two-term bf16 split)
    assert_close_rel(run(module, x, "cpu"), ref)
    monkeypatch.setenv("SQLORA_CPU_EXACT", "1")
    assert_close_rel(run(module, x, "cpu"), ref)


@pytest.mark.parametrize("sparsity", [None, "4:8"])
def test_large_batch_spans_several_tiles(sparsity):
    # 300 x 4096 weights are more than one 4 MB tile (256 rows of 4096), so the last tile is partial.
    module = make_layer(300, 4096, 4, 64, sparsity, rank=2, bias=True)
    x = torch.randn(33, 4096)
    assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))


def test_gemm_min_rows_must_be_a_count(monkeypatch):
    module = make_layer(8, 64, 4, 64, None, rank=0, bias=False)
    monkeypatch.setenv("SQLORA_CPU_GEMM_MIN_ROWS", "many")
    with pytest.raises(ValueError, match="SQLORA_CPU_GEMM_MIN_ROWS"):
        run(module, torch.randn(40, 64), "cpu")


@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("k", [256, 4096])  # 4096 x 300: several tiles at m = 40
def test_cpu_autocast_leaves_the_kernel_exact(m, k):
    """Under `torch.autocast("cpu", bfloat16)` (a user's inference or fine-tuning, or calibrated
    compression's forward passes) the layer still computes the kernel's fp32 result: the tiled path's
    BLAS products used to be rounded to bf16 by autocast and then failed to mix with the low-rank term."""
    module = make_layer(300, k, 4, 64, "4:8" if k == 256 else None, rank=3, bias=True)
    x = torch.randn(m, k)
    ref = run(module, x, "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(module, x, "cpu")
    assert y.dtype == torch.float32
    assert_close_rel(y, ref)


@pytest.mark.parametrize("rank,bias", [(0, False), (0, True), (7, False), (16, True)])
@pytest.mark.parametrize("m", [1, 2, 5, 64])
def test_batches_and_lowrank(isa, rank, bias, m):
    module = make_layer(51, 256, 4, 64, None, rank=rank, bias=bias, seed=m)
    x = torch.randn(m, 256)
    assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))


def test_oracle_is_dequantize(isa):
    """The kernel equals x·(Ŵ + L·R)ᵀ from `PackedLayer.dequantize`, the format's oracle."""
    module = make_layer(33, 192, 4, 64, "4:8", rank=4, bias=False)
    x = torch.randn(4, 192)
    ref = x @ module.dequantize(torch.float32).T
    assert_close_rel(run(module, x, "cpu"), ref)


def test_leading_dims_and_half_inputs(isa):
    module = make_layer(40, 128, 4, 64, None, rank=2, bias=True)
    x = torch.randn(2, 3, 128)
    assert run(module, x, "cpu").shape == (2, 3, 40)
    assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))
    xb = x.to(torch.bfloat16)
    yb = run(module, xb, "cpu")
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), run(module, xb.float(), "reference"), rtol=2e-2, atol=2e-2)


BF16_KERNEL = "avx512" in ISAS and bool(library.load().sqlora_cpu_bf16_supported())
VBMI2 = os.path.exists("/proc/cpuinfo") and " avx512_vbmi2" in open("/proc/cpuinfo").read()


@pytest.mark.skipif(not BF16_KERNEL, reason="the bf16 kernel needs an AVX-512 BF16 CPU")
@pytest.mark.parametrize("group,k", [(64, 192), (32, 96), (32, 1056), (128, 384), (256, 512)])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 17, 40])
def test_bf16_inputs_take_the_exact_bf16_kernel(monkeypatch, group, k, m):
    from sqlora_hf.kernels.cpu import ops, prepared

    monkeypatch.setenv("SQLORA_CPU_ISA", "avx512")
    # N = 53: three full panels of 16 rows and a partial one; K = 96 and 1056: a trailing 32 columns
    module = make_layer(53, k, 4, group, None, rank=3, bias=True)
    run(module, torch.randn(1, k), "cpu")  # prepares the kernel cache
    d = prepared(module)["described"]
    assert d.bf16_table and ops.bf16_kernel_available()
    x = torch.randn(m, k).to(torch.bfloat16).float()  # bf16 values: the bf16 kernel's products are exact
    ref = run(module, x.double(), "reference").float()  # float64 oracle on the same values
    y = ops.run(d, x, bf16_x=True)
    assert_close_rel(y, ref, tol=1e-5)
    # through the module: a bf16 tensor in, bf16 out, within bf16 rounding of the oracle
    yb = run(module, x.to(torch.bfloat16), "cpu")
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.skipif(not BF16_KERNEL, reason="the bf16 kernel needs an AVX-512 BF16 CPU")
@pytest.mark.parametrize("group,k", [(64, 192), (32, 1056), (256, 512)])
@pytest.mark.parametrize("m", [1, 2, 3, 6, 7, 8, 17, 31])
def test_fp32_batches_split_into_two_bf16_terms(monkeypatch, group, k, m):
    monkeypatch.setenv("SQLORA_CPU_ISA", "avx512")
    module = make_layer(53, k, 4, group, None, rank=3, bias=True)
    x = torch.randn(m, k) * torch.exp(2 * torch.randn(m, k))  # a wide dynamic range, not bf16 values
    ref = run(module, x.double(), "reference").float()
    split = run(module, x, "cpu")
    assert_close_rel(split, ref, tol=2e-5)  # hi + lo leaves at most 2^-18 of each x out
    monkeypatch.setenv("SQLORA_CPU_EXACT", "1")
    exact = run(module, x, "cpu")
    assert_close_rel(exact, ref, tol=2e-6)
    if 3 <= m <= 6:  # batches of 3-6 rows take the exact row-pair kernel by default (no slower there)
        assert torch.equal(split, exact)
    else:
        assert not torch.equal(split, exact)  # the split path really ran by default


@pytest.mark.parametrize("group,k", [(64, 192), (32, 1056), (128, 384), (256, 6400), (64, 6208)])
@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_exact_small_batches_in_row_pairs(isa, monkeypatch, group, k, m):
    # The exact small-batch path (what AVX-512 CPUs without BF16 run by default) takes weight rows in pairs
    # against blocks of 4, 2 and 1 rows of x; N = 37 leaves one single row at the end.
    monkeypatch.setenv("SQLORA_CPU_EXACT", "1")
    module = make_layer(37, k, 4, group, None, rank=3, bias=True, seed=m)
    x = torch.randn(m, k)
    ref = run(module, x.double(), "reference").float()
    assert_close_rel(run(module, x, "cpu"), ref, tol=2e-6)


@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
@pytest.mark.parametrize("group,k", [(64, 320), (128, 1152), (256, 4352)])
def test_sparse_small_batches(isa, monkeypatch, sparsity, group, k):
    # Sparse rows at small batches (on AVX-512 VBMI2: codes spread to their columns by vpexpandb, blocks of
    # 4, 2 and 1 rows of x) against a float64 oracle. Exact path: every product is exact, so only the
    # summation order differs. Default: batches 1-16 on an AVX-512 BF16 CPU take the word-lane kernel with x
    # split into two bf16 terms (at most 2^-18 of each x left out); elsewhere the exact kernels run.
    module = make_layer(37, k, 4, group, sparsity, rank=3, bias=True, seed=group)
    for m in (1, 2, 3, 6, 7, 16):
        x = torch.randn(m, k) * torch.exp(torch.randn(m, k))
        ref = run(module, x.double(), "reference").float()
        monkeypatch.setenv("SQLORA_CPU_EXACT", "1")
        exact = run(module, x, "cpu")
        assert_close_rel(exact, ref, tol=2e-6)
        monkeypatch.delenv("SQLORA_CPU_EXACT")
        default = run(module, x, "cpu")
        assert_close_rel(default, ref, tol=2e-5)
        if isa == "avx512" and BF16_KERNEL and VBMI2:
            assert not torch.equal(default, exact)  # the split kernel really ran


@pytest.mark.skipif(not BF16_KERNEL, reason="the bf16 kernel needs an AVX-512 BF16 CPU")
@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
@pytest.mark.parametrize("m", [1, 2])
def test_sparse_bf16_inputs_are_exact(monkeypatch, sparsity, m):
    # bf16-valued x takes the sparse word-lane kernel with one bf16 term (no split): the products are exact,
    # so only the fp32 summation order differs from a float64 oracle.
    from sqlora_hf.kernels.cpu import ops, prepared

    monkeypatch.setenv("SQLORA_CPU_ISA", "avx512")
    module = make_layer(37, 4352, 4, 128, sparsity, rank=3, bias=True)
    run(module, torch.randn(1, 4352), "cpu")  # prepares the kernel cache
    d = prepared(module)["described"]
    x = torch.randn(m, 4352).to(torch.bfloat16).float()
    ref = run(module, x.double(), "reference").float()
    assert_close_rel(ops.run(d, x, bf16_x=True), ref, tol=2e-6)


def test_exact_flag_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("SQLORA_CPU_EXACT", "yes")
    module = make_layer(16, 64, 4, 64, None, rank=0, bias=False)
    with pytest.raises(ValueError, match="SQLORA_CPU_EXACT"):
        run(module, torch.randn(4, 64), "cpu")


def test_bf16_shortcut_forward_equals_the_generic_path():
    module = make_layer(53, 192, 4, 64, None, rank=2, bias=True)
    x = torch.randn(2, 5, 192).to(torch.bfloat16)
    first = run(module, x, "cpu")  # the generic path, which prepares the layer and installs the shortcut
    assert module._kernel_cache.get("forward") is not None
    with torch.no_grad():
        again = module(x)
    assert again.dtype == torch.bfloat16 and torch.equal(first, again)
    module.compute_dtype = torch.float32  # now the generic path casts x to fp32 (the exact fp32 kernels)
    with torch.no_grad():
        y32 = module(x)
        assert torch.equal(y32, module(x.float()).to(torch.bfloat16))


def test_threads_agree(monkeypatch):
    module = make_layer(129, 256, 4, 64, None, rank=3, bias=True)
    x = torch.randn(3, 256)
    monkeypatch.setenv("SQLORA_CPU_THREADS", "1")
    y1 = run(module, x, "cpu")
    monkeypatch.setenv("SQLORA_CPU_THREADS", "2")
    y2 = run(module, x, "cpu")
    assert torch.equal(y1, y2)  # rows are independent: the thread split cannot change a value


def test_bad_isa_name_is_a_clear_error(monkeypatch):
    module = make_layer(8, 64, 4, 64, None, rank=0, bias=False)
    monkeypatch.setenv("SQLORA_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SQLORA_CPU_ISA must be one of"):
        run(module, torch.randn(1, 64), "cpu")


def test_corrupt_buffers_are_rejected_before_the_kernel_reads():
    module = make_layer(16, 128, 4, 64, "2:4", rank=2, bias=False)
    x = torch.randn(1, 128)
    c = {k: v for k, v in module.named_buffers()}
    op = torch.ops.sqlora_cpu.linear
    from sqlora_hf.kernels.cpu import prepared

    p = prepared(module)
    args = dict(x=x, codes=p["codes"], scales=p["scales"], mask=p["mask"], lut=p["lut"], lowrank_l=p["L"],
                lowrank_r=p["R"], bias=None)
    short = {
        "codes": p["codes"].reshape(-1)[:-1], "scales": p["scales"].reshape(-1)[:-3],
        "mask": p["mask"].reshape(-1)[:8], "lowrank_r": p["R"].reshape(-1)[:-1],
    }
    for name, bad in short.items():
        kw = dict(args, **{name: bad.clone()})
        with pytest.raises((ValueError, RuntimeError), match=name):
            op(*kw.values(), 16, 4, 64, 1)
    # A mask whose rows do not keep K/2 weights would make the kernel read past a row's codes.
    broken = p["mask"].clone()
    broken[0, 0] = 0xFF
    with pytest.raises(RuntimeError, match="buffer length"):
        op(*dict(args, mask=broken).values(), 16, 4, 64, 1)
    broken = p["mask"].clone()
    broken[-1, -1] = 0x1F  # the last byte of the last row, at batch 2 (each batch size has its own kernel)
    with pytest.raises(RuntimeError, match="buffer length"):
        op(*dict(args, x=torch.randn(2, 128), mask=broken).values(), 16, 4, 64, 1)
    # Through the module: a truncated qcodes buffer is refused when the kernel prepares the layer.
    module.qcodes = c["qcodes"][:, :-1].contiguous()
    module._kernel_cache.clear()
    with pytest.raises(ValueError, match="qcodes"):
        run(module, x, "cpu")


def test_custom_op_traces_on_meta_and_compiles():
    module = make_layer(24, 128, 4, 64, None, rank=2, bias=True)
    from sqlora_hf.kernels.cpu import prepared

    p = prepared(module)
    xm = torch.empty(5, 128, device="meta")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.sqlora_cpu.linear(torch.empty(5, 128), p["codes"], p["scales"], None, p["lut"], p["L"], p["R"],
                                          None, 24, 4, 64, 0)
    assert out.shape == (5, 24)
    assert torch.ops.sqlora_cpu.linear(xm, p["codes"].to("meta"), p["scales"].to("meta"), None, p["lut"].to("meta"),
                                       None, None, None, 24, 4, 64, 0).shape == (5, 24)
    module.backend = "cpu"
    compiled = torch.compile(lambda t: module(t), backend="eager", fullgraph=False)
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), run(module, x, "reference"), rtol=1e-4, atol=1e-4)


def test_the_kernel_cache_follows_every_change_of_the_packed_tensors():
    """In-place ops, `.data =` swaps (new storage: a stale descriptor would read freed memory) and layers built
    under inference mode (no version counter); `clear_kernel_cache` after a write that bypasses the counter."""
    module = make_layer(24, 192, 4, 64, None, rank=2, bias=True)
    x = torch.randn(3, 192)
    run(module, x, "cpu")
    module.qscales.mul_(2)
    assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))
    module.qcodes.data = torch.flip(module.qcodes, dims=[1]).contiguous()
    module.lowrank_l.data = (module.lowrank_l * 3).contiguous()
    assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))
    module.qscales.data.mul_(0.5)  # not counted by autograd: invisible until the cache is cleared
    module.clear_kernel_cache()
    assert_close_rel(run(module, x, "cpu"), run(module, x, "reference"))
    with torch.inference_mode():
        frozen = make_layer(24, 192, 4, 64, None, rank=2, bias=True)
        inside = run(frozen, x, "cpu")
    assert_close_rel(inside, run(frozen, x, "reference"))
    assert_close_rel(run(frozen, x, "cpu"), run(frozen, x, "reference"))


def test_threads_calling_one_changing_layer():
    """The cache entry is built aside and published whole: no thread sees a half-built one."""
    import threading

    module = make_layer(24, 192, 4, 64, None, rank=2, bias=True)
    module.backend = "cpu"
    x = torch.randn(2, 192)
    errors = []

    def call():
        try:
            for _ in range(20):
                with torch.no_grad():
                    module(x)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    for _ in range(5):
        module.qscales.mul_(1.0)  # a new version: every thread's next call rebuilds the entry
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_compiled_calls_read_the_buffers_as_they_are():
    """Under torch.compile the fp32 conversions are traced, not a cached copy baked into the graph."""
    module = make_layer(24, 192, 4, 64, None, rank=2, bias=True)
    module.backend = "cpu"
    compiled = torch.compile(lambda t: module(t) + 1, backend="inductor")
    x = torch.randn(3, 192)
    with torch.no_grad():
        compiled(x)
        module.qscales.mul_(2)
        module.lowrank_l.mul_(3)
        got = compiled(x)
    assert_close_rel(got, run(module, x, "reference") + 1)


def test_auto_picks_cpu_backend():
    module = make_layer(8, 64, 4, 64, None, rank=0, bias=False)
    assert kernels.resolve("auto", module, torch.randn(1, 64)).name in ("cpu", "triton", "cuda")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_same_logits_as_reference(tiny_model_dirs, arch):
    from transformers import AutoModelForCausalLM

    from sqlora_hf import SQLoRAConfig

    path, _ = tiny_model_dirs[arch]
    logits = {}
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for backend in ("reference", "cpu"):
        cfg = SQLoRAConfig(backend=backend)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
        n_packed = sum(isinstance(m, SQLoRALinear) for m in model.modules())
        assert n_packed > 0
        with torch.no_grad():
            logits[backend] = model(ids).logits
    assert_close_rel(logits["cpu"], logits["reference"])


@pytest.mark.skipif("avx2" not in ISAS, reason="the integer-activation path is x86 AVX2/AVX-512 only")
@pytest.mark.parametrize("group", [32, 64, 128])
def test_integer_activation_path_is_opt_in_and_close(monkeypatch, group):
    """SQLORA_CPU_INT_ACT=1 quantizes x (12-bit per 64 columns) on 4-bit dense batch 1: close, not exact."""
    module = make_layer(45, 384, 4, group, None, rank=3, bias=True)
    x = torch.randn(1, 384)
    ref = run(module, x, "reference")
    exact = run(module, x, "cpu")
    assert_close_rel(exact, ref)  # default: exact path
    monkeypatch.setenv("SQLORA_CPU_ISA", "avx2")
    monkeypatch.setenv("SQLORA_CPU_INT_ACT", "1")
    approx = run(module, x, "cpu")
    rel = ((approx - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2e-3, rel
    x4 = torch.randn(4, 384)  # batch > 1 is not affected: still the exact path
    assert_close_rel(run(module, x4, "cpu"), run(module, x4, "reference"))
    monkeypatch.setenv("SQLORA_CPU_INT_ACT", "yes")
    with pytest.raises(ValueError, match="SQLORA_CPU_INT_ACT"):
        run(module, x, "cpu")


@pytest.mark.skipif("avx2" not in ISAS, reason="the integer-activation path is x86 AVX2/AVX-512 only")
@pytest.mark.parametrize("group,K", [(32, 384), (64, 448), (128, 384), (256, 768)])  # 448: odd chunk count
def test_int8_activation_path_matches_its_own_arithmetic(monkeypatch, group, K):
    """SQLORA_CPU_INT_ACT=8: x as int8 per 32 columns, table on a 129-step grid. The kernel must equal the
    same arithmetic written in torch (so it is the intended approximation, not a bug hiding in the
    tolerance), and stay within 2e-2 of the exact output (~0.5-1 % here)."""
    module = make_layer(45, K, 4, group, None, rank=3, bias=True)
    x = torch.randn(1, K) * torch.linspace(0.1, 3.0, K)  # blocks of different ranges
    ref = run(module, x, "reference")
    monkeypatch.setenv("SQLORA_CPU_ISA", "avx2")
    monkeypatch.setenv("SQLORA_CPU_INT_ACT", "8")
    got = run(module, x, "cpu")
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2e-2, rel

    # the same approximation in torch (fp32 where the kernel rounds, so the same values round the same
    # way; C's round-half-away-from-zero): int8 x per 32 columns, table levels round(64 c / max|c|) / 64
    def round_away(q: torch.Tensor) -> torch.Tensor:
        return torch.where(q < 0, q - 0.5, q + 0.5).trunc()

    packed = module.packed()
    lut = nf_table(4, torch.float32, torch.device("cpu"))
    amax = lut.abs().max()
    levels = round_away(lut * (64.0 / amax)).double() * (amax / 64.0).double()
    w = levels[unpack_codes(packed.qcodes, 4, K).long()] * packed.qscales.double().repeat_interleave(group, dim=1)
    xb = x.view(-1, 32)
    xa = xb.abs().amax(dim=1, keepdim=True)
    xq = (round_away(xb * (127.0 / xa)).double() * (xa / 127.0).double()).view(1, K)
    want = xq @ w.T + (x.double() @ packed.lowrank_r.double().T) @ packed.lowrank_l.double().T + module.bias.double()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_c_harness_natively(tmp_path):
    """tests/arm/harness.c (the ARM CI's C checks) compiled for this CPU: every x86 path against scalar C,
    every format, batches 1/3/16, 2 threads, the integer-activation paths and a rejected group size."""
    import shutil
    import subprocess

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = tmp_path / "harness"
    subprocess.run([gcc, "-O2", "-std=c11", "-fopenmp", os.path.join(root, "tests", "arm", "harness.c"), "-o", str(exe), "-lm"],
                   check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and " 0 failures" in out.stdout, out.stdout[-3000:]


def test_large_batches_from_two_threads_at_once():
    # The large-batch path reuses a tile buffer; each Python thread has its own (the C call and
    # torch.mm release the GIL, so a shared one would mix two layers' weights).
    import threading

    layers = [make_layer(300, 4096, 4, 64, None, rank=0, bias=False, seed=s) for s in (1, 2)]
    xs = [torch.randn(40, 4096, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    refs = [run(m, x, "reference") for m, x in zip(layers, xs)]
    for m in layers:
        m.backend = "cpu"
    errors = []

    def work(i):
        for _ in range(5):
            with torch.no_grad():
                y = layers[i](xs[i])
            rel = ((y - refs[i]).norm() / refs[i].norm()).item()
            if rel > 1e-4:
                errors.append(rel)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
