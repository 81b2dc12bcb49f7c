"""PEFT LoRA on compressed models: training touches only adapters, merges are exact and reversible.

The tiny llama fixture is compressed once per module (dense 4-bit and 4:8 sparse) and saved; every
test reloads the saved checkpoint, which is fast and gives each test fresh, identical weights.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import sqlora_hf
from sqlora_hf import SQLoRAConfig, SQLoRALinear
from sqlora_hf.peft_integration.layer import SQLoRALoraLinear

from .conftest import auto_class

PACKED = ("qcodes", "qscales", "qmask")


@pytest.fixture(scope="module")
def compressed_dirs(tiny_model_dirs, tmp_path_factory):
    """{"dense": dir, "4:8": dir} of the tiny llama compressed with a rank-8 correction."""
    path, kind = tiny_model_dirs["llama"]
    out = {}
    for label, sparsity in (("dense", None), ("4:8", "4:8")):
        model = auto_class(kind).from_pretrained(path, quantization_config=SQLoRAConfig(rank=8, sparsity=sparsity))
        target = tmp_path_factory.mktemp(f"peft_{label.replace(':', '_')}")
        model.save_pretrained(target)
        out[label] = str(target)
    return out


def _load(directory):
    return auto_class("AutoModelForCausalLM").from_pretrained(directory)


def _ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _assert_merge_close(merged, unmerged, base) -> None:
    """The merge error is float16 rounding of the adapter's factors: tiny next to the adapter's effect.

    Measured against what the adapter changes (not the whole output), so the check does not get
    easier with a weaker adapter; float16's unit roundoff is 4.9e-4.
    """
    effect = float((unmerged - base).norm())
    assert effect > 0
    assert float((merged - unmerged).norm()) < 2e-3 * effect


def _packed_bytes(model) -> dict[str, bytes]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SQLoRALinear):
            for leaf in PACKED:
                t = getattr(module, leaf)
                if t is not None:
                    # the name without PEFT's wrapper, so wrapped and unwrapped models compare
                    out[f"{name.replace('.base_layer', '')}.{leaf}"] = t.numpy().tobytes()
    return out


def _randomise_adapters(model, seed: int = 1, scale: float = 0.02) -> None:
    """Give B non-zero values so that merge tests merge something (fresh adapters have B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---- the layer behaves like PEFT's LoRA on nn.Linear -----------------------------------------------
class _OneLayer(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        self.unused = nn.Parameter(torch.zeros(1))  # PEFT reads the device from the first parameter

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_on_compressed_layer_matches_lora_on_dense_equivalent(compressed_dirs, use_rslora):
    layer = _load(compressed_dirs["dense"]).model.layers[0].mlp.down_proj  # 256 -> 128, rank-8 correction
    dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize())
    kw = dict(r=4, lora_alpha=16, target_modules=["proj"], use_rslora=use_rslora)
    ours = get_peft_model(_OneLayer(layer), sqlora_hf.lora_config(**kw))
    ref = get_peft_model(_OneLayer(dense), LoraConfig(**kw))
    assert isinstance(ours.base_model.model.proj, SQLoRALoraLinear)
    for model in (ours, ref):
        model.add_adapter("second", LoraConfig(**{**kw, "r": 2, "lora_alpha": 3}) if model is ref
                          else sqlora_hf.lora_config(**{**kw, "r": 2, "lora_alpha": 3}))
    _randomise_adapters(ref, scale=0.1)
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(3, 5, layer.in_features)
    for adapter in ("default", "second"):
        ours.set_adapter(adapter)
        ref.set_adapter(adapter)
        assert ours.base_model.model.proj.scaling[adapter] == ref.base_model.model.proj.scaling[adapter]
        assert _rel(ours(x).detach(), ref(x).detach()) < 1e-5
    with ours.disable_adapter(), ref.disable_adapter():
        assert _rel(ours(x).detach(), ref(x).detach()) < 1e-5
        assert torch.equal(ours(x), layer(x))


def test_backward_through_compressed_layer_is_exact_and_keeps_no_dense_weight(compressed_dirs):
    layer = _load(compressed_dirs["4:8"]).model.layers[0].mlp.up_proj  # 128 -> 256
    w = layer.dequantize()
    x = torch.randn(6, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.nn.functional.linear(x_ref, w).backward(grad_y)
    assert _rel(y.detach(), x_ref.detach() @ w.T) < 1e-5
    assert _rel(x.grad, x_ref.grad) < 1e-5
    assert (layer.out_features, layer.in_features) not in saved_shapes  # nothing dense kept for backward
    assert all(not t.requires_grad for t in layer.buffers())


@pytest.mark.parametrize("label", ["dense", "4:8"])
def test_backward_in_row_slices_equals_one_piece(compressed_dirs, label, monkeypatch):
    """A layer larger than the backward's piece size (a packed output head) is dequantized in row slices."""
    from sqlora_hf.formats.layer import PackedLayer
    from sqlora_hf.nn import linear as linear_mod

    layer = _load(compressed_dirs[label]).model.layers[0].mlp.up_proj  # 128 -> 256
    layer.backend = "reference"  # the oracle's dequantizer (the "cpu" backend has its own: next test)
    x = torch.randn(5, layer.in_features)
    grads, largest = [], []
    original = PackedLayer.dequantize_quantized

    def recording(self, dtype=torch.float32):
        out = original(self, dtype)
        largest[-1] = max(largest[-1], out.numel())
        return out

    monkeypatch.setattr(PackedLayer, "dequantize_quantized", recording)
    for chunk in (1 << 30, 3 * layer.in_features, 1):  # one piece; 3-row slices (uneven: 256 = 85·3 + 1); 1 row
        monkeypatch.setattr(linear_mod, "BACKWARD_CHUNK_ELEMENTS", chunk)
        xg = x.clone().requires_grad_(True)
        largest.append(0)
        y = layer(xg)
        largest[-1] = 0  # only what the backward dequantizes (the reference forward dequantizes too)
        y.backward(torch.ones(5, layer.out_features))
        grads.append(xg.grad)
    assert largest == [layer.out_features * layer.in_features, 3 * layer.in_features, layer.in_features]
    w = layer.dequantize()
    assert _rel(grads[0], torch.ones(5, layer.out_features) @ w) < 1e-5
    assert _rel(grads[1], grads[0]) < 1e-6 and _rel(grads[2], grads[0]) < 1e-6


@pytest.mark.parametrize("label", ["dense", "4:8"])
def test_cpu_backward_dequantizes_with_the_c_decoders(compressed_dirs, label, monkeypatch):
    """On the "cpu" backend the backward takes Ŵ's row slices from the C decoders: the same gradient as
    the oracle's, in the same slices."""
    from sqlora_hf.kernels.cpu import library, ops
    from sqlora_hf.nn import linear as linear_mod

    if library.load() is None:
        pytest.skip(f"CPU kernels not built: {library.load_error()}")
    layer = _load(compressed_dirs[label]).model.layers[0].mlp.up_proj  # 128 -> 256
    x = torch.randn(5, layer.in_features)
    grad_y = torch.randn(5, layer.out_features)
    pieces = []
    original = ops.dequantize_rows

    def recording(d, start, stop):
        pieces.append(stop - start)
        return original(d, start, stop)

    monkeypatch.setattr(ops, "dequantize_rows", recording)
    grads = {}
    for backend in ("reference", "cpu"):
        layer.backend = backend
        monkeypatch.setattr(linear_mod, "BACKWARD_CHUNK_ELEMENTS", 3 * layer.in_features)
        xg = x.clone().requires_grad_(True)
        layer(xg).backward(grad_y)
        grads[backend] = xg.grad
    assert pieces == [3] * 85 + [1]  # 256 rows in slices of 3, all from the C path
    assert torch.equal(grads["cpu"], grads["reference"])


# ---- training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["dense", "4:8"])
def test_training_updates_only_adapters_and_loss_falls(compressed_dirs, label):
    model = _load(compressed_dirs[label])
    before = _packed_bytes(model)
    factors = {n: (m.lowrank_l.clone(), m.lowrank_r.clone()) for n, m in model.named_modules()
               if isinstance(m, SQLoRALinear)}
    peft_model = get_peft_model(model, sqlora_hf.lora_config(model, r=8, lora_alpha=16, target_modules="all-linear"))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    ids = _ids(length=32)
    losses = []
    for _ in range(8):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert _packed_bytes(model) == before
    for name, module in model.named_modules():
        if isinstance(module, SQLoRALinear):
            name = name.replace(".base_layer", "")
            assert torch.equal(module.lowrank_l, factors[name][0]) and torch.equal(module.lowrank_r, factors[name][1])


def test_trainer_with_gradient_checkpointing(compressed_dirs, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _load(compressed_dirs["dense"])
    sqlora_hf.peft_integration.gradient_checkpointing_recipe(model)
    peft_model = get_peft_model(model, sqlora_hf.lora_config(model, r=4, target_modules=["q_proj", "v_proj"]))
    assert model.is_gradient_checkpointing
    ids = _ids(batch=8, length=32)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             gradient_checkpointing=True)
    before = _packed_bytes(model)
    result = Trainer(model=peft_model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    assert _packed_bytes(model) == before
    assert any(float(p.detach().abs().sum()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


# ---- merging -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", ["dense", "4:8"])
def test_merge_unmerge_exact_and_merged_checkpoint_reloads(compressed_dirs, label, tmp_path):
    model = _load(compressed_dirs[label])
    peft_model = get_peft_model(model, sqlora_hf.lora_config(model, r=4, lora_alpha=8, target_modules="all-linear"))
    _randomise_adapters(peft_model)
    ids = _ids()
    unmerged = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = _logits(peft_model, ids)
    before = _packed_bytes(model)
    q_proj = model.model.layers[0].self_attn.q_proj.get_base_layer()
    original = {n: getattr(q_proj, n).clone() for n in ("qmeta", "lowrank_l", "lowrank_r")}
    peft_model.merge_adapter()
    assert q_proj.rank == 8 + 4 and int(q_proj.qmeta[6]) == 12
    _assert_merge_close(_logits(peft_model, ids), unmerged, base)
    assert _packed_bytes(model) == before
    peft_model.unmerge_adapter()
    assert torch.equal(_logits(peft_model, ids), unmerged)
    for n, t in original.items():
        assert torch.equal(getattr(q_proj, n), t)

    merged = sqlora_hf.merge_and_unload(peft_model)
    assert not any(isinstance(m, SQLoRALoraLinear) for m in merged.modules())
    merged_logits = _logits(merged, ids)
    _assert_merge_close(merged_logits, unmerged, base)
    assert _packed_bytes(merged) == before
    merged.save_pretrained(tmp_path)
    again = _load(tmp_path)
    assert torch.equal(_logits(again, ids), merged_logits)
    assert _packed_bytes(again) == before


def test_merge_with_rank_truncation(compressed_dirs):
    model = _load(compressed_dirs["dense"])
    peft_model = get_peft_model(model, sqlora_hf.lora_config(r=4, target_modules=["q_proj"]))
    _randomise_adapters(peft_model, scale=0.05)
    ids = _ids()
    unmerged = _logits(peft_model, ids)
    with peft_model.disable_adapter():
        base = _logits(peft_model, ids)
    merged = sqlora_hf.merge_and_unload(copy.deepcopy(peft_model), rank="keep")
    assert all(merged.model.layers[i].self_attn.q_proj.rank == 8 for i in range(2))
    assert all(merged.model.layers[i].self_attn.k_proj.rank == 8 for i in range(2))  # not targeted
    assert _rel(_logits(merged, ids), unmerged) < 0.05  # lossy by choice, but close
    full = sqlora_hf.merge_and_unload(copy.deepcopy(peft_model), rank=12)  # = combined rank: exact again
    _assert_merge_close(_logits(full, ids), unmerged, base)
    with pytest.raises(ValueError, match=r"rank=129.*int in \[1, 128\].*nothing was merged"):
        sqlora_hf.merge_and_unload(peft_model, rank=129)
    # refused before any layer was merged: the PEFT model is intact and still usable
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())
    torch.testing.assert_close(_logits(peft_model, ids), unmerged, rtol=0, atol=0)


# ---- adapter files -------------------------------------------------------------------------------------
def test_adapter_save_and_reload(compressed_dirs, tmp_path):
    model = _load(compressed_dirs["dense"])
    peft_model = get_peft_model(model, sqlora_hf.lora_config(r=4, lora_dropout=0.1,
                                                             target_modules=["q_proj", "down_proj"]))
    _randomise_adapters(peft_model)
    peft_model.eval()
    ids = _ids()
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    reloaded = sqlora_hf.load_adapter(_load(compressed_dirs["dense"]), str(tmp_path))
    assert isinstance(reloaded, PeftModel)
    assert isinstance(reloaded.base_model.model.model.layers[1].mlp.down_proj, SQLoRALoraLinear)
    assert torch.equal(_logits(reloaded, ids), expected)
    # a second adapter loaded into an existing PeftModel, then switched to
    sqlora_hf.load_adapter(reloaded, str(tmp_path), adapter_name="again")
    reloaded.set_adapter("again")
    assert torch.equal(_logits(reloaded, ids), expected)


# ---- adapter from the correction -------------------------------------------------------------------------
@pytest.mark.parametrize("label,r,alpha", [("dense", 8, 8), ("4:8", 4, 16)])
def test_adapter_from_correction_starts_at_the_compressed_model(compressed_dirs, label, r, alpha, tmp_path):
    model = _load(compressed_dirs[label])
    ids = _ids()
    start = _logits(model, ids)
    config = sqlora_hf.lora_config(model, r=r, lora_alpha=alpha, init_from_correction=True, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    q_proj = model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert q_proj.rank == 8 - r  # the leading r components moved into the adapter
    lora = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert float(lora.lora_B["default"].weight.detach().abs().sum()) > 0
    assert _rel(_logits(peft_model, ids), start) < 1e-5
    # training changes the correction; the adapter file reloads onto a fresh compressed model
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(2):
        peft_model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = sqlora_hf.load_adapter(_load(compressed_dirs[label]), str(tmp_path / "adapter"))
    assert _rel(_logits(reloaded, ids), trained) < 1e-6
    merged = sqlora_hf.merge_and_unload(peft_model)
    assert merged.model.layers[0].self_attn.q_proj.rank == 8
    assert _rel(_logits(merged, ids), trained) < 1e-3  # the whole correction is re-rounded to float16


# ---- clear errors -----------------------------------------------------------------------------------------
def test_bad_adapter_configs_are_clear_errors(compressed_dirs):
    model = _load(compressed_dirs["dense"])
    with pytest.raises(ValueError, match="not_a_module"):
        get_peft_model(model, sqlora_hf.lora_config(r=4, target_modules=["not_a_module"]))
    with pytest.raises(ValueError, match=r"r=256 .*min\(in_features=128, out_features=128\) = 128"):
        get_peft_model(_load(compressed_dirs["dense"]), sqlora_hf.lora_config(r=256, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="all-linear"):
        sqlora_hf.lora_config(r=4, target_modules="all-linear")
    with pytest.raises(ValueError, match="use_dora"):
        get_peft_model(_load(compressed_dirs["dense"]), sqlora_hf.lora_config(r=4, use_dora=True,
                                                                                  target_modules=["q_proj"]))


def test_merge_keep_restores_the_compressed_rank_and_refuses_rank_0_layers(compressed_dirs, tiny_model_dirs):
    """"keep" is the rank the layer was compressed with, counting what init_from_correction moved into the
    adapter (it was 8 - 4 = 4 before, dropping half the correction); on rank-0 layers (the default 4.25 bpw
    compression) there is no size to keep: refused before any layer is merged."""
    ids = _ids()
    model = _load(compressed_dirs["dense"])
    peft_model = get_peft_model(model, sqlora_hf.lora_config(r=4, target_modules=["q_proj"], init_from_correction=True))
    _randomise_adapters(peft_model, scale=0.01)
    adapted = _logits(peft_model, ids)
    merged = sqlora_hf.merge_and_unload(peft_model, rank="keep")
    assert all(merged.model.layers[i].self_attn.q_proj.rank == 8 for i in range(2))
    assert _rel(_logits(merged, ids), adapted) < 5e-3

    plain = auto_class("AutoModelForCausalLM").from_pretrained(tiny_model_dirs["llama"][0],
                                                               quantization_config=SQLoRAConfig())
    assert all(m.rank == 0 for m in plain.modules() if isinstance(m, SQLoRALinear))
    peft_model = get_peft_model(plain, sqlora_hf.lora_config(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise_adapters(peft_model, scale=0.05)
    before = _logits(peft_model, ids)
    with pytest.raises(ValueError, match=r"rank='keep'.*no low-rank correction.*Nothing was merged"):
        sqlora_hf.merge_and_unload(peft_model, rank="keep")
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())
    torch.testing.assert_close(_logits(peft_model, ids), before, rtol=0, atol=0)
