"""The Triton backend, checked without a GPU: Triton's interpreter against the reference backend,
ahead-of-time compilation for sm_80/sm_90, and the backend's device rules. GPU-only checks skip here."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from sqlora_hf import SQLoRAConfig, SQLoRALinear, kernels  # noqa: E402
from sqlora_hf.compression import CompressionSpec  # noqa: E402
from sqlora_hf.kernels.triton import aot  # noqa: E402
from sqlora_hf.kernels.triton import launch  # noqa: E402
from sqlora_hf.kernels.triton.launch import GEMV_MAX_BATCH  # noqa: E402

from .conftest import auto_class  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _layer(n=40, k=192, bits=4, group=64, sparsity=None, rank=0, bias=True, seed=0) -> SQLoRALinear:
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    b = torch.randn(n) if bias else None
    spec = CompressionSpec(bits=bits, group_size=group, sparsity=sparsity, rank=rank, qa_iterations=0)
    return SQLoRALinear.from_dense(w, b, spec)


def _run(layer: SQLoRALinear, x: torch.Tensor, backend: str) -> torch.Tensor:
    layer.backend = backend
    with torch.no_grad():
        return layer(x)


def _reference_fp32(layer: SQLoRALinear, x: torch.Tensor) -> torch.Tensor:
    return _run(layer, x.to(torch.float32), "reference")


# ---- numerics under the interpreter ------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sparsity", [None, "2:4", "4:8"])
@pytest.mark.parametrize("batch", [1, 3, GEMV_MAX_BATCH + 12])  # dense: row reduction, 16-row and 64-row dot
def test_every_format_option_matches_reference(interpret, bits, sparsity, batch):
    layer = _layer(bits=bits, sparsity=sparsity, rank=3)
    x = torch.randn(batch, layer.in_features)
    torch.testing.assert_close(_run(layer, x, "triton"), _reference_fp32(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,k,group,sparsity,batch", [
    (37, 96, 32, None, 1),      # N not a multiple of any block, K not a multiple of BLOCK_K
    (37, 96, 32, None, 17),
    (5, 320, 64, "4:8", 2),     # fewer rows than a block
    (70, 384, 128, "2:4", 33),  # M not a multiple of BLOCK_M
    (24, 256, 256, None, 1),    # one group per row
])
def test_non_multiple_shapes(interpret, n, k, group, sparsity, batch):
    layer = _layer(n=n, k=k, group=group, sparsity=sparsity, rank=2)
    x = torch.randn(batch, k)
    torch.testing.assert_close(_run(layer, x, "triton"), _reference_fp32(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,group,k,batch,blocks", [
    (4, 128, 384, 3, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64)),    # a group spans two K steps
    (2, 128, 384, 1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32)),     # ... four steps, one block a step
    (4, 32, 320, 5, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256)),    # K not a multiple of BLOCK_K, 8 groups a step
    (3, 256, 512, 1, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=512)),    # two groups a step
    (8, 64, 192, 20, dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128)),   # 8-bit, last step half outside K
    (3, 64, 192, 2, dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64)),      # BLOCK_M = 1 with several rows of x
])
def test_dense_tile_shapes(interpret, bits, group, k, batch, blocks):
    """Every BLOCK_K / group relation the dense decode handles (BLOCK_K and the group size are powers
    of two, so one divides the other), with the blocks forced instead of the launcher's defaults."""
    layer = _layer(n=40, k=k, bits=bits, group=group, rank=2)
    x = torch.randn(batch, k)
    with torch.no_grad():
        out = launch.packed_linear(layer, x, interpret=True, blocks=blocks)
    torch.testing.assert_close(out, _reference_fp32(layer, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 20])
@pytest.mark.parametrize("rank", [0, 1, 40])  # rank 40 > one BLOCK_R chunk on both paths
def test_lowrank_epilogue_and_bias(interpret, batch, rank):
    layer = _layer(n=48, k=128, rank=rank, bias=rank != 1)
    x = torch.randn(batch, 128)
    out = _run(layer, x, "triton")
    torch.testing.assert_close(out, _reference_fp32(layer, x), rtol=1e-5, atol=1e-4)
    if rank:  # the epilogue must really add the correction: without it the output differs
        without = _run(layer, x, "reference") - torch.nn.functional.linear(
            torch.nn.functional.linear(x, layer.lowrank_r.float()), layer.lowrank_l.float())
        assert (out - without).abs().max() > 1e-3


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [1, 24])
@pytest.mark.parametrize("sparsity", [None, "4:8"])
def test_half_precision_activations(interpret, dtype, tolerance, batch, sparsity):
    layer = _layer(n=40, k=192, sparsity=sparsity, rank=4)
    x = torch.randn(batch, 192).to(dtype)
    out = _run(layer, x, "triton")
    assert out.dtype == dtype
    ref = _reference_fp32(layer, x)
    error = (out.float() - ref).norm() / ref.norm()
    assert error < tolerance, f"relative error {error:.2e} for {dtype}"


@pytest.mark.slow  # ~10 s, mostly compressing the model while loading
def test_tiny_model_logits_match_reference(interpret, tiny_model_dirs):
    """Every compressed layer of a tiny Llama on "triton" (2 tokens: the interpreter costs ~70 ms per
    program, and a program per row block and token)."""
    path, kind = tiny_model_dirs["llama"]
    config = SQLoRAConfig(rank=2, memory_budget=None, qa_iterations=0)  # the cheapest compression
    model = auto_class(kind).from_pretrained(path, quantization_config=config)
    layers = [m for m in model.modules() if isinstance(m, SQLoRALinear)]
    assert layers
    ids = torch.randint(0, 256, (1, 2), generator=torch.Generator().manual_seed(1))

    def logits(backend: str) -> torch.Tensor:
        for m in layers:
            m.backend = backend
        with torch.no_grad():
            return model(ids).logits

    torch.testing.assert_close(logits("triton"), logits("reference"), rtol=1e-4, atol=1e-4)


# ---- backend selection rules -------------------------------------------------------------------

def test_triton_is_registered():
    assert "triton" in kernels.backend_names()


def test_cpu_tensor_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = _layer()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _run(layer, torch.randn(1, layer.in_features), "triton")


def test_auto_never_picks_the_interpreter(interpret):
    layer = _layer()
    layer.backend = "auto"
    chosen = kernels.resolve("auto", layer, torch.randn(1, layer.in_features))
    assert chosen.name != "triton"


def test_unsupported_activation_dtype_is_refused(interpret):
    layer = _layer()
    with pytest.raises(RuntimeError, match="triton"):
        _run(layer, torch.randn(1, layer.in_features, dtype=torch.float64), "triton")


def test_device_and_dtype_moves_keep_packed_tensors_and_drop_the_kernel_cache(interpret):
    layer = _layer(rank=2)
    x = torch.randn(2, layer.in_features)
    before = {k: v.clone() for k, v in layer.packed().tensors().items()}
    first = _run(layer, x, "triton")
    assert layer.kernel_cache("triton")  # prepared constants are cached ...
    layer.to("cpu", torch.float16).to(torch.float32)
    assert not layer.kernel_cache("triton")  # ... and dropped when the module moves
    for name, tensor in layer.packed().tensors().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    torch.testing.assert_close(_run(layer, x, "triton"), first, rtol=1e-3, atol=1e-3)  # bias went via fp16


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_round_trip_keeps_the_model_identical(tiny_model_dirs):
    path, kind = tiny_model_dirs["llama"]
    model = auto_class(kind).from_pretrained(path, quantization_config=SQLoRAConfig(rank=2, backend="reference"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu_logits = model(ids).logits
        model.to("cuda")
        for m in model.modules():
            if isinstance(m, SQLoRALinear):
                m.backend = "auto"  # picks the GPU kernels on CUDA tensors
        gpu_logits = model(ids.cuda()).logits.cpu()
        model.to("cpu")
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-3, atol=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits,sparsity", [(4, None), (4, "4:8"), (3, "2:4"), (8, None), (2, None)])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_gpu_kernels_match_reference(bits, sparsity, batch):
    layer = _layer(n=256, k=512, bits=bits, sparsity=sparsity, rank=8).cuda()
    x = torch.randn(batch, 512, device="cuda", dtype=torch.float16)
    out = _run(layer, x, "triton").float()
    ref = _reference_fp32(layer, x)
    assert (out - ref).norm() / ref.norm() < 2e-3


# ---- ahead-of-time compilation (no GPU needed) ---------------------------------------------------

@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variant", [
    aot.Variant("matmul1", 4, False, "fp16"),
    aot.Variant("matmul16", 4, False, "fp16"),
    aot.Variant("gemv", 4, True, "bf16", lowrank=False, bias=False),
    aot.Variant("matmul", 4, False, "fp16"),
], ids=lambda v: v.label() if isinstance(v, aot.Variant) else str(v))
def test_aot_compile_4bit(arch, variant):
    compiled = aot.compile_variant(variant, arch)
    assert len(compiled.asm["cubin"]) > 0
    assert f"sm_{arch}" in compiled.asm["ptx"]


@pytest.mark.slow  # ~40-90 s uncached; compiled kernels are cached in ~/.triton/cache
def test_aot_compile_every_format_option_sm80():
    """Every kernel x bits x dense/sparse (fp16) for sm_80. sm_90 and every activation dtype
    are compiled by scripts/ci_gpu_compile.sh; the fast test above covers both archs."""
    failures = []
    for variant in aot.variants(quick=True):
        if variant.activation != "fp16":
            continue
        try:
            assert len(aot.compile_variant(variant, 80).asm["cubin"]) > 0
        except Exception as error:  # collect all, report together
            failures.append(f"{variant.label()}: {error}")
    assert not failures, "\n".join(failures)
