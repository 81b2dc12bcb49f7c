"""End to end through transformers: quantize while loading, save, reload, generate, and bad checkpoints."""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sqlora_hf
from sqlora_hf import FormatError, SQLoRAConfig, SQLoRALinear

from .conftest import TINY_ARCHS, auto_class


def _inputs():
    torch.manual_seed(123)
    return torch.randint(0, 256, (2, 12))


def _load(path, kind, **kw):
    return auto_class(kind).from_pretrained(path, **kw)


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_quantize_save_reload_bit_identical(arch, tiny_model_dirs, tmp_path):
    path, kind = tiny_model_dirs[arch]
    ids = _inputs()
    fp = _load(path, kind)
    q = _load(path, kind, quantization_config=SQLoRAConfig(rank=4))
    swapped = [n for n, m in q.named_modules() if isinstance(m, SQLoRALinear)]
    assert len(swapped) >= 8, swapped  # attention + MLP projections of both blocks
    ref, got = _out(fp, ids), _out(q, ids)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.3, rel  # random tiny models are harsh; a broken layout gives ~1.0
    q.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))] == []
    assert any(f.endswith(".safetensors") for f in files)
    cfg = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert cfg["quant_method"] == "sqlora" and cfg["rank"] == 4
    again = _load(tmp_path, kind)  # no config argument: pre-quantized path
    assert isinstance(again.get_submodule(swapped[0]), SQLoRALinear)
    assert torch.equal(_out(again, ids), got)
    rep = sqlora_hf.report(again)
    assert rep["compressed_layers"] == len(swapped)
    assert rep["compressed_bytes"] == sum(again.get_submodule(n).storage_bytes() for n in swapped)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_generate_after_reload(arch, tiny_model_dirs, tmp_path):
    path, kind = tiny_model_dirs[arch]
    q = _load(path, kind, quantization_config=SQLoRAConfig(bits=8, rank=0))
    ids = _inputs()[:1]
    a = q.generate(ids, max_new_tokens=6, do_sample=False)
    q.save_pretrained(tmp_path)
    b = _load(tmp_path, kind).generate(ids, max_new_tokens=6, do_sample=False)
    assert a.shape == (1, 18) and torch.equal(a, b)


def test_gpt2_conv1d_transposed_correctly(tiny_model_dirs):
    path, kind = tiny_model_dirs["gpt2"]
    fp = _load(path, kind)
    q = _load(path, kind, quantization_config=SQLoRAConfig(bits=8, rank=0))
    w_fp = fp.transformer.h[0].mlp.c_fc.weight.T  # Conv1D stores [in, out]
    w_q = q.transformer.h[0].mlp.c_fc.dequantize()
    assert w_q.shape == w_fp.shape
    assert float((w_q - w_fp).norm() / w_fp.norm()) < 0.01  # 8-bit: near exact


def test_tied_head_and_embeddings_stay_uncompressed_even_with_explicit_list(tiny_model_dirs, tmp_path):
    path, kind = tiny_model_dirs["llama"]
    q = _load(path, kind, quantization_config=SQLoRAConfig(modules_to_not_convert=[]))
    assert isinstance(q.lm_head, torch.nn.Linear) and not isinstance(q.lm_head, SQLoRALinear)
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert torch.isfinite(_out(q, _inputs())).all()
    q.save_pretrained(tmp_path)
    again = _load(tmp_path, kind)
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_modules_to_not_convert_is_honoured(tiny_model_dirs):
    path, kind = tiny_model_dirs["llama_untied"]
    q = _load(path, kind, quantization_config=SQLoRAConfig(modules_to_not_convert=["down_proj", "model.layers.1"]))
    assert isinstance(q.model.layers[0].self_attn.q_proj, SQLoRALinear)
    assert not isinstance(q.model.layers[0].mlp.down_proj, SQLoRALinear)
    assert not isinstance(q.model.layers[1].self_attn.q_proj, SQLoRALinear)
    assert not isinstance(q.lm_head, SQLoRALinear)  # the output head always stays


def test_layer_whose_input_does_not_fit_the_group_is_left_with_a_warning(tiny_model_dirs, caplog):
    path, kind = tiny_model_dirs["llama"]
    caplog.set_level(logging.WARNING)
    q = _load(path, kind, quantization_config=SQLoRAConfig(group_size=256))  # hidden 128 < 256
    assert not isinstance(q.model.layers[0].self_attn.q_proj, SQLoRALinear)
    assert isinstance(q.model.layers[0].mlp.down_proj, SQLoRALinear)  # in_features 256 fits
    assert "leaving model.layers.0.self_attn.q_proj uncompressed" in caplog.text


def test_nan_weight_is_an_error_naming_the_layer(tiny_model_dirs, tmp_path):
    path, kind = tiny_model_dirs["llama"]
    shutil.copytree(path, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN"):
        _load(tmp_path / "m", kind, quantization_config=SQLoRAConfig())


@pytest.fixture
def saved_quantized(tiny_model_dirs, tmp_path):
    path, kind = tiny_model_dirs["llama"]
    q = _load(path, kind, quantization_config=SQLoRAConfig(sparsity="4:8", rank=2))
    out = tmp_path / "q"
    q.save_pretrained(out)
    return out, kind


def _edit_checkpoint(directory, fn):
    f = directory / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,needle", [
    (lambda sd: sd.pop("model.layers.0.mlp.up_proj.qscales"), r"model\.layers\.0\.mlp\.up_proj\.qscales is missing"),
    (lambda sd: sd.pop("model.layers.0.mlp.up_proj.qmask"), r"model\.layers\.0\.mlp\.up_proj\.qmask is missing"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.qcodes",
                               sd["model.layers.0.self_attn.k_proj.qcodes"][:, :-4].contiguous()),
     r"model\.layers\.0\.self_attn\.k_proj\.qcodes must be"),
    (lambda sd: sd.__setitem__("model.layers.1.self_attn.o_proj.qscales",
                               sd["model.layers.1.self_attn.o_proj.qscales"].float()),
     r"model\.layers\.1\.self_attn\.o_proj\.qscales must be torch\.float16"),
    (lambda sd: sd["model.layers.1.mlp.gate_proj.qmeta"].__setitem__(0, 7),
     r"model\.layers\.1\.mlp\.gate_proj\.qmeta says format version 7"),
    (lambda sd: sd.__setitem__("model.layers.0.mlp.gate_proj.qcodes",
                               sd["model.layers.0.mlp.gate_proj.qcodes"].to(torch.int32)),
     r"model\.layers\.0\.mlp\.gate_proj\.qcodes must be torch\.uint8"),
    # a self-consistent layer of the wrong size (up_proj's tensors under down_proj's name)
    (lambda sd: [sd.__setitem__(k.replace("up_proj", "down_proj"), sd[k].clone()) for k in list(sd)
                 if k.startswith("model.layers.0.mlp.up_proj.")],
     r"model\.layers\.0\.mlp\.down_proj: the checkpoint's packed layer is 256 x 128 .* this model's layer is 128 x 256"),
])
def test_broken_prequantized_checkpoint_is_an_error_naming_the_tensor(saved_quantized, edit, needle):
    directory, kind = saved_quantized
    _edit_checkpoint(directory, edit)
    with pytest.raises(FormatError, match=needle):
        _load(directory, kind)


def test_newer_format_version_in_config_is_refused(saved_quantized):
    directory, kind = saved_quantized
    cfg = json.load(open(directory / "config.json"))
    cfg["quantization_config"]["format_version"] = 4
    json.dump(cfg, open(directory / "config.json", "w"))
    with pytest.raises(ValueError, match="format_version=4 is newer"):
        _load(directory, kind)


def test_format_version_1_checkpoint_still_loads_with_its_own_codebook(saved_quantized, tiny_model_dirs):
    """A checkpoint written by a version-1 sqlora_hf (float32 NF levels, codebook 0) loads and computes
    with those levels; compressing a new model as version 1 is refused (only the current one is written)."""
    from sqlora_hf.formats import CODEBOOK_NF, nf_table

    directory, kind = saved_quantized

    def to_v1(sd):
        for key in [k for k in sd if k.endswith(".qmeta")]:
            meta = sd[key].clone()
            if int(meta[1]) != 8:
                meta[0], meta[7] = 1, CODEBOOK_NF
            sd[key] = meta

    _edit_checkpoint(directory, to_v1)
    cfg = json.load(open(directory / "config.json"))
    cfg["quantization_config"]["format_version"] = 1
    json.dump(cfg, open(directory / "config.json", "w"))
    model = _load(directory, kind)
    layer = model.model.layers[0].mlp.up_proj
    packed = layer.packed()
    assert packed.version == 1 and packed.codebook == CODEBOOK_NF
    from sqlora_hf.formats import unpack_codes, unpack_mask

    values = nf_table(4, codebook=CODEBOOK_NF)[unpack_codes(packed.qcodes, 4, packed.n_stored).long()]
    values = values * packed.qscales.float().repeat_interleave(packed.group_size // 2, dim=1)
    dense = torch.zeros(packed.out_features, packed.in_features)
    dense[unpack_mask(packed.qmask)] = values.reshape(-1)
    assert torch.equal(packed.dequantize_quantized(), dense)
    x = torch.randn(3, packed.in_features)
    torch.testing.assert_close(layer(x), x @ (dense + packed.lowrank_product()).T + (layer.bias if layer.bias is not None else 0),
                               rtol=1e-4, atol=1e-5)
    path, _ = tiny_model_dirs["llama"]
    with pytest.raises(ValueError, match="format_version=1: this sqlora_hf writes format version 3"):
        _load(path, kind, quantization_config=SQLoRAConfig(format_version=1))


def test_truncated_checkpoint_is_an_error(saved_quantized):
    directory, kind = saved_quantized
    f = directory / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as err:
        _load(directory, kind)
    assert "safetensors" in str(err.value).lower() or "incomplete" in str(err.value).lower() or "file" in str(err.value).lower()


def test_packed_tensors_survive_dtype_casts(tiny_model_dirs, tmp_path):
    path, kind = tiny_model_dirs["llama"]
    q = _load(path, kind, quantization_config=SQLoRAConfig(rank=2))
    layer = q.model.layers[0].self_attn.q_proj
    before = {k: v.clone() for k, v in layer.packed().tensors().items()}
    q.to(torch.bfloat16)
    for k, v in layer.packed().tensors().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert _out(q, _inputs()).dtype == torch.bfloat16


def test_dequantize_model_back_to_linear(tiny_model_dirs):
    path, kind = tiny_model_dirs["llama"]
    q = _load(path, kind, quantization_config=SQLoRAConfig(rank=2))
    ids = _inputs()
    ref = _out(q, ids)
    dense = q.dequantize()
    assert not any(isinstance(m, SQLoRALinear) for m in dense.modules())
    torch.testing.assert_close(_out(dense, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,cfg", [("gpt2", {}), ("llama", {"head_bits": 8})])
def test_dequantized_model_saves_and_reloads_without_sqlora(tiny_model_dirs, tmp_path, arch, cfg):
    """GPT-2's Conv1D comes back as a Conv1D (weight `[in, out]`; as an nn.Linear its square layers would
    reload transposed without an error), and the `head_bits` embedding as an nn.Embedding with its own rows
    (a PackedEmbedding saves nothing, so the reload would get random embeddings)."""
    from transformers.pytorch_utils import Conv1D

    from sqlora_hf.nn.embedding import PackedEmbedding

    path, kind = tiny_model_dirs[arch]
    q = _load(path, kind, quantization_config=SQLoRAConfig(rank=2, **cfg))
    ids = _inputs()
    ref = _out(q, ids)
    dense = q.dequantize()
    assert not any(isinstance(m, (SQLoRALinear, PackedEmbedding)) for m in dense.modules())
    if arch == "gpt2":
        assert isinstance(dense.transformer.h[0].attn.c_proj, Conv1D)
    torch.testing.assert_close(_out(dense, ids), ref, rtol=1e-4, atol=1e-4)
    dense.save_pretrained(tmp_path / "dense")
    again = auto_class(kind).from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, (SQLoRALinear, PackedEmbedding)) for m in again.modules())
    torch.testing.assert_close(_out(again, ids), _out(dense, ids), rtol=0, atol=0)


def test_saved_header_names_match_format(saved_quantized):
    directory, _ = saved_quantized
    with safe_open(directory / "model.safetensors", "pt") as h:
        keys = set(h.keys())
    prefix = "model.layers.0.self_attn.q_proj."
    assert {prefix + n for n in ("qmeta", "qcodes", "qscales", "qmask", "lowrank_l", "lowrank_r")} <= keys
    assert prefix + "weight" not in keys


@pytest.mark.parametrize("cfg,needle", [
    (dict(group_size=256, modules_to_not_convert=["down_proj"]),
     r"none of the \d+ eligible Linear layers can be packed with group_size=256,.*in_features are \[128\]"),
    (dict(modules_to_not_convert=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
     r"all \d+ Linear layers are skipped"),
    (dict(group_size=256, modules_to_not_convert=["down_proj"], calibration=[torch.arange(64) % 256]),
     r"none of the \d+ eligible Linear layers"),
])
def test_a_config_that_compresses_nothing_is_an_error(tiny_model_dirs, cfg, needle):
    """Not a "sqlora" model of 0 layers at 0.0 bits per weight (the tiny Llama's in_features are 128, and 256
    for down_proj, which the cases with group_size=256 skip)."""
    path, kind = tiny_model_dirs["llama"]
    with pytest.raises(ValueError, match=needle):
        _load(path, kind, quantization_config=SQLoRAConfig(**cfg))


def test_reload_applies_a_passed_backend_and_compute_dtype(saved_quantized):
    directory, kind = saved_quantized
    again = _load(directory, kind, quantization_config=SQLoRAConfig(backend="reference", compute_dtype="bfloat16"))
    layers = [m for m in again.modules() if isinstance(m, SQLoRALinear)]
    assert layers and {m.backend for m in layers} == {"reference"}
    assert {m.compute_dtype for m in layers} == {torch.bfloat16}
    kept = _load(directory, kind, quantization_config=SQLoRAConfig(rank_keep=0.5))  # leaves them as saved
    assert {m.backend for m in kept.modules() if isinstance(m, SQLoRALinear)} == {"auto"}


def test_a_rank_larger_than_a_layer_is_refused_before_loading(tiny_model_dirs):
    path, kind = tiny_model_dirs["llama"]
    with pytest.raises(ValueError, match=r"SQLoRAConfig\.rank=1000 is larger than \d+ layer\(s\) allow; first: "
                                         r"model\.layers\.0\.self_attn\.q_proj \(128 x 128\) allows at most 128"):
        _load(path, kind, quantization_config=SQLoRAConfig(rank=1000))
