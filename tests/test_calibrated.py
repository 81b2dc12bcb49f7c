"""Calibrated compression: GPTQ, GPTQ-intrinsic LoRA, sequential block-by-block, calibration input."""
from __future__ import annotations

import json

import pytest
import torch

import sqlora_hf
from sqlora_hf import SQLoRAConfig, SQLoRALinear
from sqlora_hf.compression.calibrated import CalibratedSpec, compress_with_hessian
from sqlora_hf.compression.gptq import gptq, intrinsic_lowrank, output_error, whitened_lowrank
from sqlora_hf.compression.rtn import dequantize_groups, quantize_groups


def _layer(seed: int, n: int = 96, k: int = 256, rank_x: int = 24):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    # activations with a dominant low-rank part and a few outlier channels, like real LLM inputs
    x = torch.randn(1024, rank_x, generator=g) @ torch.randn(rank_x, k, generator=g) + 0.2 * torch.randn(1024, k, generator=g)
    x[:, :4] *= 8
    return w, x.T @ x


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_beats_round_to_nearest_on_output_error(bits):
    w, h = _layer(bits)
    codes, scales = quantize_groups(w, bits, 64)
    rtn = output_error(w, dequantize_groups(codes, scales, bits), h)
    for act_order in (False, True):
        assert output_error(w, gptq(w, h, bits, 64, act_order=act_order).dequantized, h) < 0.5 * rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order,scale_search", [(True, True), (False, False), (False, True)])
def test_c_sweep_matches_the_torch_sweep(bits, act_order, scale_search, monkeypatch):
    """The C column loop (kernels/cpu/gptq_sweep.py) does the torch loop's arithmetic: same codes
    except at rare rounding ties, same scales where they are fixed up front, same output error."""
    from sqlora_hf.kernels.cpu import gptq_sweep, library

    if library.load() is None:
        pytest.skip(f"CPU library not built: {library.load_error()}")
    w, h = _layer(10 + bits, n=70, k=320)  # N not a multiple of the C loop's 64-row chunk, K of the 128-column block
    w[3, :64] = 0.0  # an all-zero group: scale 0 must give zeros, not NaN
    results = {}
    for mode in ("torch", "c"):
        monkeypatch.setenv("SQLORA_GPTQ_SWEEP", mode)
        assert gptq_sweep.available(w, h) == (mode == "c")
        results[mode] = gptq(w, h, bits, 64, act_order=act_order, scale_search=scale_search)
    ref, got = results["torch"], results["c"]
    assert float((ref.codes != got.codes).float().mean()) < 1e-3
    if act_order:
        assert torch.equal(ref.scales, got.scales)
    assert bool(torch.isfinite(got.dequantized).all()) and bool((got.dequantized[3, :64] == 0).all())
    e_ref, e_got = output_error(w, ref.dequantized, h), output_error(w, got.dequantized, h)
    assert abs(e_got - e_ref) <= 1e-3 * e_ref


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kwargs", [dict(act_order=True, scale_search=True), dict(act_order=False),
                                    dict(sparsity="4:8"), dict(sparsity="2:4")])
def test_refine_passes_never_raise_the_error_and_keep_scales_and_mask(bits, kwargs, monkeypatch):
    """Coordinate descent after GPTQ: each pass can only lower the (damped) objective GPTQ minimised; the
    scales and the n:m mask stay as GPTQ chose them; C and torch give the same codes."""
    from sqlora_hf.compression.gptq import _prepare_hessian
    from sqlora_hf.kernels.cpu import library

    w, h = _layer(20 + bits, n=70, k=320)
    damped = _prepare_hessian(h, 0.01)
    errors, results = [], {}
    for passes in (0, 1, 3):
        r = gptq(w, h, bits, 64, refine_passes=passes, **kwargs)
        errors.append(output_error(w, r.dequantized, damped))
        results[passes] = r
    assert errors[1] <= errors[0] * (1 + 1e-6) and errors[2] <= errors[1] * (1 + 1e-6)
    assert errors[2] < errors[0]  # on this layer GPTQ's greedy codes are not a local optimum
    base, refined = results[0], results[3]
    assert torch.equal(base.scales, refined.scales)
    if base.keep is not None:
        assert torch.equal(base.keep, refined.keep) and bool((refined.dequantized[~refined.keep] == 0).all())
    else:  # the result still means exactly what its codes and scales say
        assert torch.equal(dequantize_groups(refined.codes, refined.scales, bits), refined.dequantized)
    if library.load() is not None:
        monkeypatch.setenv("SQLORA_GPTQ_SWEEP", "torch")
        oracle = gptq(w, h, bits, 64, refine_passes=3, **kwargs)
        assert float((oracle.codes != refined.codes).float().mean()) < 1e-3


def test_gptq_sparse_keeps_the_pattern_and_beats_magnitude():
    from sqlora_hf.compression.sparsity import nm_mask

    w, h = _layer(5)
    r = gptq(w, h, 4, 64, sparsity="4:8")
    assert torch.equal(r.keep.view(96, -1, 8).sum(-1), torch.full((96, 32), 4))
    assert bool((r.dequantized[~r.keep] == 0).all())
    keep = nm_mask(w, "4:8")
    codes, scales = quantize_groups(w[keep].view(96, -1), 4, 32)
    magnitude = torch.zeros_like(w)
    magnitude[keep] = dequantize_groups(codes, scales, 4).reshape(-1)
    assert output_error(w, r.dequantized, h) < output_error(w, magnitude, h)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [4, 16])
def test_intrinsic_never_worse_than_gptq_plus_lowrank_afterwards(seed, rank):
    w, h = _layer(seed)
    base = gptq(w, h, 4, 64)
    left, right = whitened_lowrank(w - base.dequantized, h, rank)
    after = output_error(w, base.dequantized + left @ right, h)
    result, l2, r2 = intrinsic_lowrank(w, h, rank, 4, 64)
    assert output_error(w, result.dequantized + l2 @ r2, h) <= after * 1.0001


def test_compress_with_hessian_packs_a_valid_layer():
    w, h = _layer(7)
    for sparsity, criterion in ((None, "sparsegpt"), ("2:4", "sparsegpt"), ("4:8", "wanda")):
        packed, rel = compress_with_hessian(w, h, CalibratedSpec(bits=4, group_size=64, sparsity=sparsity, rank=8,
                                                                 sparsity_criterion=criterion), "blk")
        packed.validate("blk")
        assert 0 < rel < 0.5
        approx = packed.dequantize()
        assert abs(output_error(w, approx, h) / output_error(w, torch.zeros_like(w), h) - rel) < 1e-3


def _tiny_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a of and to in is it that for on with as was by be this are from at or an which".split()
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


TEXTS = ["the cat is on the mat and it is warm " * 30, "a dog was in the garden with a ball " * 30,
         "this is an example of text for calibration of the model " * 30]


def test_from_pretrained_with_json_built_config_uses_tokenizer_beside_model(tiny_model_dirs, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    model_dir = tmp_path / "m"
    shutil.copytree(path, model_dir)
    _tiny_tokenizer(model_dir)
    as_json = json.loads(json.dumps({"bits": 4, "rank": 4, "calibration": TEXTS, "calibration_samples": 4,
                                     "calibration_seq_len": 32}))
    q = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=SQLoRAConfig(**as_json))
    assert sum(isinstance(m, SQLoRALinear) for m in q.modules()) == 14
    q.save_pretrained(tmp_path / "out")
    saved = json.load(open(tmp_path / "out" / "config.json"))["quantization_config"]["calibration"]
    assert saved["samples"] == 4 and saved["seq_len"] == 32 and len(saved["sha256"]) == 64
    assert "cat" not in json.dumps(saved)  # the texts themselves are never written
    ids = torch.randint(0, 256, (1, 10))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_sequential_feeds_compressed_outputs_to_the_next_block(tiny_model_dirs, asymmetric, monkeypatch):
    """Block 1 is calibrated on block 0's compressed outputs; with asymmetric calibration it also runs,
    first, on the float model's own stream, which must be exactly the uncompressed model's input there.
    (Exactly: with the forward passes in the model's own fp32, not bf16.)"""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SQLORA_CALIBRATION_BF16", "0")

    path, _ = tiny_model_dirs["llama"]
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 16))
    model = AutoModelForCausalLM.from_pretrained(path)
    seen = []
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
    with torch.no_grad():
        model(calib, use_cache=False)
    fp_input = seen.pop()
    seen.clear()
    sqlora_hf.compress(model, SQLoRAConfig(bits=3, rank=0, calibration_samples=4, calibration_seq_len=16,
                                           asymmetric_calibration=asymmetric), calib)
    calls = list(seen)
    seen.clear()
    with torch.no_grad():
        model(calib, use_cache=False)
    compressed_input = seen.pop()
    handle.remove()
    assert len(calls) == (2 if asymmetric else 1)  # one pass each: the float stream first, if any
    torch.testing.assert_close(calls[-1], compressed_input)
    assert not torch.allclose(compressed_input, fp_input, atol=1e-3)
    if asymmetric:
        torch.testing.assert_close(calls[0], fp_input)


def _distorted_streams(t=2048, k=64, n=24, seed=3):
    """(float input, what compressed layers before feed instead, weight) of one layer."""
    g = torch.Generator().manual_seed(seed)
    xf = torch.randn(t, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.3 * torch.randn(t, k, generator=g)
    distortion = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5
    x = xf @ distortion + 0.05 * torch.randn(t, k, generator=g)
    return xf, x, torch.randn(n, k, generator=g)


@pytest.mark.parametrize("ridge", [0.01, 1.0])
def test_float_targets_turn_the_float_outputs_into_a_gptq_target(ridge):
    """Asymmetric calibration: for every Q, ‖X Qᵀ − X_f Wᵀ‖² + λ‖Q − W‖² differs from GPTQ's own
    objective ‖(Q − W*)(H + λI)^{1/2}‖² by a constant, so GPTQ aimed at `W*` fits the float outputs."""
    from sqlora_hf.compression.gptq import float_targets

    xf, x, w = _distorted_streams()
    t, k = x.shape
    h = (x.T @ x) / t
    cross = (xf @ w.T).T @ x / t  # Y_fᵀ X
    lam = ridge * float(torch.diagonal(h).mean())
    target = float_targets([w], [cross], h, ridge)[0].double()
    xd, xfd, wd, hd = x.double(), xf.double(), w.double(), h.double()

    def asymmetric(q):
        return float(((xd @ q.T - xfd @ wd.T) ** 2).sum() / t + lam * ((q - wd) ** 2).sum())

    def gptq_objective(q):
        return output_error(target, q, hd + lam * torch.eye(k, dtype=torch.float64))

    g = torch.Generator().manual_seed(4)
    qs = [wd, target, wd + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64), torch.zeros_like(wd)]
    offsets = [asymmetric(q) - gptq_objective(q) for q in qs]
    assert max(offsets) - min(offsets) < 1e-5 * asymmetric(qs[3])
    # the target fits the float outputs better than the weight itself does
    assert asymmetric(target) < (0.5 if ridge < 0.1 else 0.9) * asymmetric(wd)
    # identical streams: nothing to undo, the target is the weight
    same = float_targets([w], [(x @ w.T).T @ x / t], h, ridge)[0]
    torch.testing.assert_close(same, w, atol=1e-3, rtol=1e-4)


def test_float_targets_are_the_same_from_outputs_or_from_inputs():
    """`_FloatTargets` forms `C = Y_fᵀX` from captured outputs when the layers are narrow and as
    `W X_fᵀX` otherwise: the same targets, also for a group of Linears sharing one input, with a bias,
    and with the float stream covering only the first samples."""
    from sqlora_hf.compression.gptq import float_targets
    from sqlora_hf.sequential import _FloatTargets

    xf, x, w = _distorted_streams(t=4 * 256)
    xf, x = xf.view(4, 256, -1), x.view(4, 256, -1)
    w1, w2 = w[:10], w[10:]
    bias = torch.randn(w2.shape[0])
    outs = {"a": xf @ w1.T, "b": xf @ w2.T + bias}
    h_all = x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1]) / x[:, :, 0].numel()
    for samples in (4, 2):
        inputs = {"a": xf[:samples], "b": xf[:samples]}
        sliced = {m: o[:samples] for m, o in outs.items()}
        from_outputs = _FloatTargets(inputs, sliced, {"a": None, "b": bias}, 1.0)(["a", "b"], x, h_all, [w1, w2])
        from_inputs = _FloatTargets(inputs, {}, {}, 1.0)(["a", "b"], x, h_all, [w1, w2])
        rows, rows_f = x[:samples].reshape(-1, x.shape[-1]), xf[:samples].reshape(-1, x.shape[-1])
        t = rows.shape[0]
        direct = float_targets([w], [w @ (rows_f.T @ rows) / t], rows.T @ rows / t, 1.0)[0]
        for got in (from_outputs, from_inputs):
            torch.testing.assert_close(torch.cat(got), direct, atol=1e-4, rtol=1e-4)
        # one instance asked for each Linear apart (q/k/v given different bits) reuses what depends
        # on the input only, and gives what a fresh instance gives
        reused = _FloatTargets(inputs, {}, {}, 1.0)
        first, second = reused(["a"], x, h_all, [w1]), reused(["b"], x, h_all, [w2])
        fresh = _FloatTargets(inputs, {}, {}, 1.0)(["b"], x, h_all, [w2])
        assert torch.equal(second[0], fresh[0])
        torch.testing.assert_close(torch.cat(first + second), direct, atol=1e-4, rtol=1e-4)


def test_shared_gram_keeps_the_float_samples_gram_for_free():
    """`_SharedGram(head_samples=n)` returns the Gram of all samples and keeps that of the first n
    (each divided by its own token count); `_FloatTargets` takes it instead of recomputing it."""
    from sqlora_hf.compression.gptq import gram
    from sqlora_hf.sequential import _FloatTargets, _SharedGram

    xf, x, w = _distorted_streams(t=4 * 256)
    xf, x = xf.view(4, 256, -1), x.view(4, 256, -1)
    shared = _SharedGram(normalize=True, head_samples=2)
    h = shared(x)
    rows = x.reshape(-1, x.shape[-1])
    torch.testing.assert_close(h, gram(rows) / rows.shape[0], atol=1e-5, rtol=1e-5)
    head_rows = x[:2].reshape(-1, x.shape[-1])
    torch.testing.assert_close(shared.head_of(x, 2), gram(head_rows) / head_rows.shape[0], atol=1e-5, rtol=1e-5)
    assert shared.head_of(x, 3) is None and shared.head_of(x.clone(), 2) is None
    inputs = {"a": xf[:2]}
    with_head = _FloatTargets(inputs, {}, {}, 1.0)(["a"], x, h, [w], shared)[0]
    without = _FloatTargets(inputs, {}, {}, 1.0)(["a"], x, h, [w])[0]
    torch.testing.assert_close(with_head, without, atol=1e-4, rtol=1e-4)


def test_hessian_cache_shares_factors_of_one_hessian_only():
    from sqlora_hf.compression.gptq import HessianCache, sweep_factor

    _, h = _layer(3)
    cache = HessianCache()
    f = cache.sweep(h, 0.01, True)
    assert cache.sweep(h, 0.01, True) is f and cache.sweep(h, 0.01, False) is not f
    assert cache.eigh(h) is cache.eigh(h)
    torch.testing.assert_close(f.hinv, sweep_factor(h, 0.01, True).hinv)
    h2 = h.clone()
    assert cache.sweep(h2, 0.01, True) is not f  # another Hessian object: computed afresh


def _linear_io(model, ids):
    """{name: (input, output)} of every Linear (packed or not) for one forward over `ids`."""
    seen = {}

    def keep(name):
        def hook(_module, args, out):
            seen.setdefault(name, (args[0], out))
        return hook

    handles = [mod.register_forward_hook(keep(name)) for name, mod in model.named_modules()
               if isinstance(mod, (torch.nn.Linear, SQLoRALinear))]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("float_samples", [16, 8])
def test_asymmetric_calibration_fits_layers_to_the_float_model(tiny_model_dirs, float_samples, monkeypatch):
    """What asymmetric calibration optimises, layer by layer: the compressed layer fed the compressed
    model's inputs should reproduce the *float* layer fed the float model's inputs."""
    from transformers import AutoModelForCausalLM

    from sqlora_hf import sequential
    from sqlora_hf.sequential import compress_model

    monkeypatch.setattr(sequential, "FLOAT_STREAM_SAMPLES", float_samples)  # all samples, or the first half
    path, _ = tiny_model_dirs["llama"]
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    reference = _linear_io(AutoModelForCausalLM.from_pretrained(path).eval(), calib)
    errors = {}
    for asymmetric in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path)
        cfg = SQLoRAConfig(bits=3, rank=0, calibration_samples=16, calibration_seq_len=64,
                           asymmetric_calibration=asymmetric)
        compress_model(model, cfg, calib, one_pass=True)
        io = _linear_io(model.eval(), calib)
        later = [name for name in reference if ".layers.0." not in name and "lm_head" not in name]
        assert later and all(isinstance(model.get_submodule(name), SQLoRALinear) for name in later)
        errors[asymmetric] = sum(float((io[name][1] - reference[name][1]).pow(2).sum()) for name in later)
    # all samples in the float stream: 1602 -> 945 here; the first half: 1602 -> 1285
    assert errors[True] < (0.75 if float_samples == 16 else 1.0) * errors[False], errors


def test_asymmetric_calibration_falls_back_to_plain_in_two_pass_mode(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    from sqlora_hf.sequential import compress_model

    path, _ = tiny_model_dirs["llama"]
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for asymmetric in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path)
        cfg = SQLoRAConfig(bits=3, rank=0, calibration_samples=4, calibration_seq_len=16,
                           asymmetric_calibration=asymmetric)
        compress_model(model, cfg, calib, batch_size=2, one_pass=False)
        with torch.no_grad():
            logits.append(model(calib).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("data,needle", [
    ([], "empty"),
    (["", "   "], "shorter than one token"),
    ("just one string", "list of texts"),
    ([1, 2, 3], "only strings"),
])
def test_bad_calibration_input_is_a_clear_error(tiny_model_dirs, tmp_path, data, needle):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    tok = _tiny_tokenizer(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match=needle):
        sqlora_hf.compress(model, SQLoRAConfig(calibration_seq_len=8), data, tokenizer=tok)


def test_texts_without_tokenizer_and_dataset_without_text_column(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="tokenizer"):
        sqlora_hf.compress(model, SQLoRAConfig(), TEXTS)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": TEXTS})
    with pytest.raises(ValueError, match="no 'text' column"):
        sqlora_hf.compress(model, SQLoRAConfig(), ds, tokenizer=object())
    with pytest.raises(ValueError, match=r"SQLoRAConfig\.calibration=Dataset\(\{ features.*no 'text' column"):
        SQLoRAConfig(calibration=ds)  # at config time, in one line, before any weight is read


def test_token_ids_outside_the_vocabulary_are_refused_by_name(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0])  # vocabulary of 256
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\).*from 300 to 399"):
        sqlora_hf.compress(model, SQLoRAConfig(), torch.arange(300, 400))


def test_self_generated_calibration_needs_no_data_and_is_reproducible(tiny_model_dirs, tmp_path):
    """calibration="self": the text is sampled from the model (no tokenizer beside this one), the same
    each time, without touching the caller's RNG, and recorded as such in config.json."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    own = SQLoRAConfig(calibration="self")
    assert (own.calibration_samples, own.calibration_seq_len, SQLoRAConfig().calibration_samples) == (64, 128, 128)
    too_long = SQLoRAConfig(calibration="self", calibration_seq_len=512)
    with pytest.raises(ValueError, match=r"calibration_seq_len=512 is longer than the model's 128 positions"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=too_long)  # the tiny model has 128

    def load():
        cfg = SQLoRAConfig(bits=4, rank=2, calibration="self", calibration_samples=3, calibration_seq_len=12)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)

    rng = torch.get_rng_state()
    q = load()
    assert torch.equal(torch.get_rng_state(), rng)
    assert sum(isinstance(m, SQLoRALinear) for m in q.modules()) == 14
    q.save_pretrained(tmp_path / "out")
    record = json.load(open(tmp_path / "out" / "config.json"))["quantization_config"]["calibration"]
    assert (record["source"], record["samples"], record["seq_len"]) == ("self-generated", 3, 12)
    again = load()
    assert again.config.quantization_config.calibration["sha256"] == record["sha256"]
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, q(ids).logits)


def test_self_generated_windows_start_from_varied_ordinary_tokens(tiny_model_dirs):
    """Each window starts from a random non-special token (not BOS every time), and is seq_len long."""
    from transformers import AutoModelForCausalLM

    from sqlora_hf.calibration import self_generated

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path)
    special = {model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id}
    windows = self_generated(model, samples=40, seq_len=6, batch=16)
    assert windows.shape == (40, 6)
    starts = set(windows[:, 0].tolist())
    assert len(starts) >= 20 and not starts & special
    assert torch.equal(windows, self_generated(model, samples=40, seq_len=6, batch=16))
    assert not torch.equal(windows, self_generated(model, samples=40, seq_len=6, batch=16, seed=1))
    with pytest.raises(ValueError, match="calibration_seq_len must be at least 2"):
        self_generated(model, samples=2, seq_len=1)


def _wordpiece_tokenizer(directory=None, content=()):
    """A BERT-style tokenizer over English function words, punctuation and `content` words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sqlora_hf.embedding_walks import FUNCTION_WORDS

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = special + [",", ".", "(", ")", "-", ":", "'", '"'] + list(FUNCTION_WORDS) + list(content)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def test_embedding_walks_stay_on_a_topic_between_function_words_and_punctuation():
    """Two clusters of content words in the embeddings: a walk's content words stay in one cluster
    (neighbours of its topic), with function words, commas and a full stop every 18 tokens between."""
    from sqlora_hf.embedding_walks import SENTENCE_LENGTH, embedding_walks

    cluster_a = [f"alpha{c}{d}" for c in "abcdefg" for d in "hijklmn"][:45]
    cluster_b = [f"beta{c}{d}" for c in "abcdefg" for d in "hijklmn"][:45]
    tok = _wordpiece_tokenizer(content=cluster_a + cluster_b)
    vocab = len(tok)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(vocab, 16, generator=g)
    ids_a = tok.convert_tokens_to_ids(cluster_a)
    ids_b = tok.convert_tokens_to_ids(cluster_b)
    emb[ids_a] = 0.3 * emb[ids_a] + 4 * torch.nn.functional.one_hot(torch.tensor(0), 16)
    emb[ids_b] = 0.3 * emb[ids_b] + 4 * torch.nn.functional.one_hot(torch.tensor(1), 16)
    special = set(tok.all_special_ids)
    rng = torch.get_rng_state()
    windows = embedding_walks(emb, tok, samples=12, seq_len=64, special_ids=special, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(windows, embedding_walks(emb, tok, samples=12, seq_len=64, special_ids=special, seed=3))
    assert windows.shape == (12, 64)
    assert (windows[:, 0] == tok.cls_token_id).all() and (windows[:, -1] == tok.sep_token_id).all()
    inner = windows[:, 1:-1]
    assert not any(int(t) in special for t in inner.flatten())
    stop = tok.convert_tokens_to_ids(".")
    assert (inner[:, SENTENCE_LENGTH - 1] == stop).all()
    same = pairs = 0
    in_a, in_b = set(ids_a), set(ids_b)
    for row in inner.tolist():
        content = [t for t in row if t in in_a or t in in_b]
        assert len(content) > 8
        for x, y in zip(content, content[1:]):
            pairs += 1
            same += (x in in_a) == (y in in_a)
    assert same / pairs > 0.95
    with pytest.raises(ValueError, match="calibration_seq_len must be at least 3"):
        embedding_walks(emb, tok, samples=1, seq_len=2, special_ids=special)


def test_self_calibration_of_an_encoder_walks_its_token_embeddings(tiny_model_dirs, tmp_path):
    """An encoder cannot generate: with its tokenizer beside it, "self" builds 2048 x 32 walks over its
    token embeddings; without a tokenizer it is a clear error."""
    import shutil

    from transformers import AutoModel

    from sqlora_hf.calibration import self_walks

    path, _ = tiny_model_dirs["bert"]
    # no tokenizer files: transformers builds a BERT tokenizer with only its special tokens
    with pytest.raises(ValueError, match="needs a tokenizer with English words and punctuation"):
        AutoModel.from_pretrained(path, quantization_config=SQLoRAConfig(calibration="self"))
    with pytest.raises(ValueError, match="needs its tokenizer"):
        self_walks(AutoModel.from_pretrained(path), None, 4, 16)
    model_dir = tmp_path / "bert"
    shutil.copytree(path, model_dir)
    _wordpiece_tokenizer(model_dir, content=[f"zq{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"])
    model = AutoModel.from_pretrained(model_dir, quantization_config=SQLoRAConfig(calibration="self"))
    assert sum(isinstance(m, SQLoRALinear) for m in model.modules()) == 13  # 12 in the blocks + the pooler
    record = model.config.quantization_config.calibration
    assert (record["source"], record["samples"], record["seq_len"]) == ("self-generated (embedding walks)", 2048, 32)
    given = AutoModel.from_pretrained(model_dir, quantization_config=SQLoRAConfig(
        calibration="self", calibration_samples=4, calibration_seq_len=32))
    assert (given.config.quantization_config.calibration["samples"],
            given.config.quantization_config.calibration["seq_len"]) == (4, 32)


def test_dataset_with_text_column_works(tiny_model_dirs, tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    tok = _tiny_tokenizer(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = SQLoRAConfig(rank=2, calibration_samples=2, calibration_seq_len=16)
    sqlora_hf.compress(model, cfg, datasets.Dataset.from_dict({"text": TEXTS}), tokenizer=tok)
    assert model.config.quantization_config.to_dict()["calibration"]["source"].startswith("datasets.Dataset")


@pytest.mark.parametrize("budget, hessians_fit", [("3.0bpw", True), ("4.25bpw", True), ("4.25bpw", False)])
def test_calibrated_budget_is_met_and_mixes_configurations(tiny_model_dirs, budget, hessians_fit, monkeypatch):
    """Both planning paths: Hessians from the sensitivity pass, or (when they would not all fit in
    memory) from a separate block-by-block pass."""
    from transformers import AutoModelForCausalLM

    import sqlora_hf.budget

    monkeypatch.setattr(sqlora_hf.budget, "hessians_fit", lambda blocks: hessians_fit)

    path, _ = tiny_model_dirs["llama"]
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 32))
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = SQLoRAConfig(memory_budget=budget, tiers=[2, 3, 4, 8], group_size=32, calibration_samples=4,
                       calibration_seq_len=32)
    sqlora_hf.compress(model, cfg, calib)
    rep = sqlora_hf.report(model)
    target = float(budget[:-3])
    assert target * 0.97 <= rep["bits_per_weight"] <= target
    configs = {(m.bits, m.group_size, m.rank) for m in model.modules() if isinstance(m, SQLoRALinear)}
    assert len(configs) > 1  # the knapsack traded bytes between layers


@pytest.mark.parametrize("rank", ["auto", 2])
def test_calibrated_default_budget_keeps_bits_and_lands_at_the_nominal_size(tiny_model_dirs, rank):
    """The default "auto" budget with calibration: every layer keeps `bits`, no group finer than
    `group_size`, `rank="auto"` means no correction, a pinned rank is kept, and the model lands at or
    below the nominal bits per weight (4.25 for NF4 g64) plus the pinned rank, metadata included."""
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 32))
    model = AutoModelForCausalLM.from_pretrained(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    pinned = 0 if rank == "auto" else rank
    nominal_bytes = sum(4.25 * m.weight.numel() / 8 + 2 * pinned * sum(m.weight.shape) for m in linears.values())
    sqlora_hf.compress(model, SQLoRAConfig(group_size=64, rank=rank, calibration_samples=4, calibration_seq_len=32),
                       calib)
    layers = [m for m in model.modules() if isinstance(m, SQLoRALinear)]
    assert len(layers) == len(linears)
    assert {m.bits for m in layers} == {4}
    assert {m.rank for m in layers} == {pinned}
    assert min(m.group_size for m in layers) >= 64
    assert any(m.group_size > 64 for m in layers)  # metadata paid for by coarser groups
    assert sum(m.packed().nbytes() for m in layers) <= nominal_bytes


def test_rank_gain_survives_a_hessian_from_fewer_tokens_than_inputs():
    """Short calibration windows give a wide layer a singular Hessian (64 tokens for 768 inputs, with one
    dominant direction as in real activations), which fp32 leaves short of positive definite even with
    the usual jitter: the planner's rank gains still come out, finite and sorted."""
    from sqlora_hf.compression.planner import _whitened_energy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g) * 100 * torch.randn(1, 768, generator=g) + torch.randn(64, 768, generator=g)
    h = x.T @ x / 64
    assert int(torch.linalg.cholesky_ex(h + 1e-5 * float(torch.diagonal(h).mean()) * torch.eye(768))[1]) != 0
    e = torch.randn(64, 768, generator=g)
    gains = _whitened_energy(e, h, 8)
    assert gains.shape == (8,) and bool(torch.isfinite(gains).all())
    assert bool((gains[:-1] >= gains[1:] - 1e-6 * gains[0]).all())


def test_calibrated_budget_hessian_errors_rank_like_the_output_error():
    """Without the GPTQ ratio, a candidate's error is its round-to-nearest relative output error under H."""
    from sqlora_hf.compression.planner import hessian_candidates

    w, h = _layer(11)
    cands = {(c.bits, c.group_size, c.rank): c
             for c in hessian_candidates(w, h, [3, 4], None, 0, sample_every=1, gptq_ratio=False)}
    codes, scales = quantize_groups(w, 3, 64)
    expected = output_error(w, dequantize_groups(codes, scales, 3), h) / output_error(w, torch.zeros_like(w), h)
    assert abs(cands[(3, 64, 0)].error - expected) < 1e-6 * max(expected, 1)
    assert cands[(4, 64, 0)].error < cands[(3, 64, 0)].error


def test_sensitivity_weighted_errors_are_the_weighted_output_error():
    """With per-output-channel loss sensitivities f the error is Σ_n f_n (E H Eᵀ)_nn, not a ratio."""
    from sqlora_hf.compression.planner import hessian_candidates

    w, h = _layer(12)
    f = torch.rand(w.shape[0]) ** 4  # very unequal channel weights
    cands = {(c.bits, c.group_size, c.rank): c
             for c in hessian_candidates(w, h, [3, 4], None, 0, sample_every=1, sensitivity=f, gptq_ratio=False)}
    codes, scales = quantize_groups(w, 3, 64)
    e = (w - dequantize_groups(codes, scales, 3)).double()
    expected = float((((e @ h.double()) * e).sum(1) * f.double()).sum())
    assert abs(cands[(3, 64, 0)].error - expected) < 1e-5 * expected
    # sampling every 4th row estimates the same total
    sampled = {(c.bits, c.group_size, c.rank): c
               for c in hessian_candidates(w, h, [3], None, 0, sample_every=4, sensitivity=torch.ones(w.shape[0]),
                                           gptq_ratio=False)}
    full = float(((e @ h.double()) * e).sum())
    assert 0.5 * full < sampled[(3, 64, 0)].error < 2.0 * full


def test_planner_errors_are_what_gptq_leaves_of_each_tier():
    """By default a tier's errors are scaled by GPTQ/RTN on that layer, measured, never above RTN."""
    from sqlora_hf.compression.planner import hessian_candidates

    w, h = _layer(13)
    plain = {(c.bits, c.group_size, c.rank): c.error
             for c in hessian_candidates(w, h, [3, 4], None, 0, sample_every=1, gptq_ratio=False)}
    scaled = {(c.bits, c.group_size, c.rank): c.error for c in hessian_candidates(w, h, [3, 4], None, 0, sample_every=1)}
    assert plain.keys() == scaled.keys()
    norm = output_error(w, torch.zeros_like(w), h)
    for bits in (3, 4):
        g = min(gg for b, gg, _ in plain if b == bits)
        r = gptq(w, h, bits, g, act_order=True)
        expected = output_error(w, r.dequantized, h) / norm
        assert abs(scaled[(bits, g, 0)] - expected) < 1e-4 * expected
        ratio = scaled[(bits, g, 0)] / plain[(bits, g, 0)]
        assert ratio < 0.9  # this layer's correlated inputs are what GPTQ exploits
        for (b, gg, rank), e in scaled.items():
            if b == bits:  # the same ratio for every group size of the tier
                assert abs(e / plain[(b, gg, rank)] - ratio) < 1e-6


def test_sweep_factor_reuse_gives_the_same_sweep():
    from sqlora_hf.compression.gptq import sweep_factor

    w, h = _layer(14)
    for act_order in (False, True):
        f = sweep_factor(h, act_order=act_order)
        for bits in (3, 4):
            a = gptq(w, h, bits, 64, act_order=act_order)
            b = gptq(w, h, bits, 64, act_order=act_order, factor=f)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.dequantized, b.dequantized)
    with pytest.raises(ValueError, match="act_order"):
        gptq(w, h, 4, 64, act_order=True, factor=sweep_factor(h, act_order=False))


def test_output_sensitivity_is_the_squared_loss_gradient_at_each_layer_output(tiny_model_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModel

    from sqlora_hf.budget import has_language_model_loss, output_sensitivity

    monkeypatch.setenv("SQLORA_CALIBRATION_BF16", "0")  # fp32 products, to compare with plain autograd exactly

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    sens = output_sensitivity(model, ids, [name, "model.layers.0.self_attn.k_proj"], chunk=2)
    assert set(sens) == {name, "model.layers.0.self_attn.k_proj"}
    assert all(p.requires_grad for p in model.parameters())  # restored after the pass
    # reference: the gradient at that output, chunk by chunk, by plain autograd
    outputs = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _a, out: outputs.append(out) or out.retain_grad())
    expected = torch.zeros(model.get_submodule(name).out_features)
    for start in (0, 2):
        outputs.clear()
        model(ids[start:start + 2], labels=ids[start:start + 2], use_cache=False).loss.backward()
        expected += outputs[0].grad.pow(2).reshape(-1, expected.numel()).sum(0)
    handle.remove()
    torch.testing.assert_close(sens[name], expected / ids.numel(), rtol=1e-4, atol=1e-12)
    assert has_language_model_loss(model)
    bert_path, _ = tiny_model_dirs["bert"]
    assert not has_language_model_loss(AutoModel.from_pretrained(bert_path))


def test_bf16_sensitivity_pass_stays_close_and_keeps_fp32_hessians(tiny_model_dirs, monkeypatch):
    """Where the CPU has native bf16 the loss pass runs under autocast: its weights for the planner move by
    bf16 rounding only, and the Hessians it collects are still fp32 Gram matrices."""
    from transformers import AutoModelForCausalLM

    from sqlora_hf import mixed_precision
    from sqlora_hf.budget import output_sensitivity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0]).eval()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SQLORA_CALIBRATION_BF16", flag)
        monkeypatch.setattr(mixed_precision, "cpu_has_native_bf16", lambda: True)
        hessians = {}
        runs[flag] = output_sensitivity(model, ids, names, chunk=2, hessians=hessians), hessians
    (fp32, h32), (bf16, h16) = runs["0"], runs["1"]
    for name in names:
        assert h16[name].dtype == torch.float32 and bf16[name].dtype == torch.float32
        assert not torch.equal(bf16[name], fp32[name])  # bf16 products really ran
        assert (bf16[name] - fp32[name]).norm() < 0.05 * fp32[name].norm()
        assert (h16[name] - h32[name]).norm() < 0.02 * h32[name].norm()
    # the first layer's Hessian is exact: its input (the embeddings, normed) is fp32 either way
    torch.testing.assert_close(h16[names[0]], h32[names[0]], rtol=1e-5, atol=1e-6)


def test_sensitivity_pass_collects_the_same_hessians_as_the_block_pass(tiny_model_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SQLORA_CALIBRATION_BF16", "0")  # the same products in both passes, to compare exactly

    from sqlora_hf.budget import output_sensitivity
    from sqlora_hf.sequential import _capture_inputs, _eligible, collect_hessians, find_blocks

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    prefix, blocks = find_blocks(model)
    per_block = [(f"{prefix}.{i}", _eligible(b, f"{prefix}.{i}", [], SQLoRAConfig())) for i, b in enumerate(blocks)]
    collected = {}
    output_sensitivity(model, ids, [f"{bn}.{n}" for bn, t in per_block for n in t], chunk=2, hessians=collected)
    with torch.no_grad():
        inputs = _capture_inputs(model, blocks[0], ids, 4)
        for (block_name, targets), block in zip(per_block, blocks):
            reference, inputs = collect_hessians(block, inputs, targets)
            for name, h in reference.items():
                torch.testing.assert_close(collected[f"{block_name}.{name}"], h, rtol=1e-4, atol=1e-6)
    q, k = collected[f"{prefix}.0.self_attn.q_proj"], collected[f"{prefix}.0.self_attn.k_proj"]
    assert q is k  # siblings reading one tensor share one accumulator
    assert collected[f"{prefix}.0.mlp.gate_proj"] is not q and collected[f"{prefix}.1.self_attn.q_proj"] is not q


def test_impossible_calibrated_budget_is_a_clear_error(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = SQLoRAConfig(memory_budget="2.5bpw", tiers=[3, 4], calibration_samples=2, calibration_seq_len=16)
    with pytest.raises(ValueError, match="cannot be met.*smallest achievable"):
        sqlora_hf.compress(model, cfg, torch.randint(0, 256, (2, 16)))


def test_two_pass_mode_matches_one_pass_closely(tiny_model_dirs):
    """The fallback for activations that do not fit memory compresses every Linear too, with the
    same Hessians up to the order within a block, so its error is like the one-pass model's."""
    from transformers import AutoModelForCausalLM

    from sqlora_hf.sequential import compress_model

    path, _ = tiny_model_dirs["llama"]
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 32))
    ids = torch.randint(0, 256, (1, 16))
    logits = {}
    for one_pass in (True, False):
        model = AutoModelForCausalLM.from_pretrained(path)
        compress_model(model, SQLoRAConfig(bits=4, rank=2, calibration_samples=4, calibration_seq_len=32), calib,
                       one_pass=one_pass)
        assert sum(isinstance(m, SQLoRALinear) for m in model.modules()) == 14
        with torch.no_grad():
            logits[one_pass] = model(ids).logits
    fp = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        ref = fp(ids).logits
    one, two = ((logits[mode] - ref).norm() / ref.norm() for mode in (True, False))
    assert 0 < two < 1.5 * one and 0 < one < 1.5 * two
    assert not torch.equal(logits[True], logits[False])  # really two different code paths


@pytest.mark.parametrize("method", ["intrinsic", "eora", "gptq"])
@pytest.mark.parametrize("sparsity,criterion", [(None, "sparsegpt"), ("2:4", "sparsegpt"), ("4:8", "wanda")])
def test_shared_input_layers_compressed_together_match_one_by_one(method, sparsity, criterion):
    """q/k/v-like layers (different widths, hence different auto ranks) swept as one stacked GPTQ
    give the layers that compressing each alone gives (rows are independent in GPTQ)."""
    from sqlora_hf.compression.calibrated import compress_shared_input

    _, h = _layer(11)
    g = torch.Generator().manual_seed(12)
    weights = [torch.randn(n, 256, generator=g) * 0.05 for n in (96, 32, 32)]
    spec = CalibratedSpec(bits=4, group_size=64, sparsity=sparsity, rank="auto", method=method,
                          sparsity_criterion=criterion, scale_search=sparsity is None)
    together = compress_shared_input(weights, h, spec, ["q", "k", "v"])
    for w, name, (packed, rel) in zip(weights, "qkv", together):
        alone, rel_alone = compress_with_hessian(w, h, spec, name)
        assert packed.rank == alone.rank
        assert (packed.qcodes == alone.qcodes).float().mean() > 0.999  # equal up to float rounding ties
        assert torch.equal(packed.qmask, alone.qmask) if sparsity else packed.qmask is None
        assert rel == pytest.approx(rel_alone, rel=1e-3)


def test_one_pass_groups_shared_input_linears_and_a_wrong_guess_changes_nothing(tiny_model_dirs):
    """Each block reports which Linears read one tensor; the next block compresses such a group in
    one go. A guess that is wrong (the two Linears read different tensors) must not change any layer."""
    import copy

    from transformers import AutoModelForCausalLM

    from sqlora_hf.sequential import _capture_inputs, _compress_block_one_pass, _eligible

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    spec = CalibratedSpec(bits=4, group_size=32, rank=2)
    with torch.no_grad():
        inputs = _capture_inputs(model, model.model.layers[0], calib, 4)
        packed = {}
        for guess in (None, [["self_attn.q_proj", "mlp.gate_proj"]], [["self_attn.q_proj", "self_attn.k_proj"]]):
            block = copy.deepcopy(model.model.layers[0])
            targets = _eligible(block, "model.layers.0", [], SQLoRAConfig(bits=4, group_size=32))
            done, _, groups, _ = _compress_block_one_pass(block, "model.layers.0", inputs, targets, lambda _: spec, guess)
            packed[str(guess)] = {name: p.qcodes for name, (p, _) in done.items()}
            assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                              ["mlp.gate_proj", "mlp.up_proj"]]
    alone, wrong, right = packed.values()
    assert len(alone) == 7 and alone.keys() == wrong.keys() == right.keys()
    for name in alone:
        assert torch.equal(alone[name], wrong[name]), name
        assert (alone[name] == right[name]).float().mean() > 0.999, name


def test_reusing_freed_memory_is_active_on_glibc_and_changes_no_result(tiny_model_dirs, monkeypatch):
    import platform

    from transformers import AutoModelForCausalLM

    from sqlora_hf import allocator

    if platform.libc_ver()[0] == "glibc":
        assert allocator._glibc() is not None  # the speed-up must not be silently off where it applies
    path, _ = tiny_model_dirs["llama"]
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    codes = []
    for env in ("1", "0"):
        monkeypatch.setenv("SQLORA_REUSE_FREED_MEMORY", env)
        model = AutoModelForCausalLM.from_pretrained(path)
        sqlora_hf.compress(model, SQLoRAConfig(bits=4, rank=2, calibration_samples=4, calibration_seq_len=32), calib)
        codes.append([m.qcodes.clone() for m in model.modules() if isinstance(m, SQLoRALinear)])
    assert allocator._glibc() is None  # the opt-out is honoured
    assert len(codes[0]) == 14 and all(torch.equal(a, b) for a, b in zip(*codes))


def test_bf16_forward_passes_compress_as_well_as_fp32(tiny_model_dirs, monkeypatch):
    """Where the CPU has native bf16, the calibration forward passes run their matrix products in bf16
    (`mixed_precision`): the Linears inside see bf16 activations, while GPTQ and the Gram matrices stay
    in fp32. The compressed model must be as close to the float model as with fp32 forward passes."""
    from transformers import AutoModelForCausalLM

    from sqlora_hf.mixed_precision import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("bf16 forward passes are used only on CPUs with native bf16")
    path, _ = tiny_model_dirs["llama"]
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path)(ids).logits
    errors, dtypes = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SQLORA_CALIBRATION_BF16", flag)
        model = AutoModelForCausalLM.from_pretrained(path)
        seen = []
        handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
        sqlora_hf.compress(model, SQLoRAConfig(bits=3, rank=0, memory_budget="3.5bpw", calibration_samples=8,
                                               calibration_seq_len=32), calib)
        handle.remove()
        dtypes[flag] = set(seen)
        with torch.no_grad():
            out = model(ids).logits
        errors[flag] = float((out - ref).norm() / ref.norm())
    # the planner's loss-gradient pass stays fp32 (bf16 there changed the plan: docs/calibrated.md)
    assert dtypes["0"] == {torch.float32} and torch.bfloat16 in dtypes["1"]
    assert 0 < errors["1"] < 1.2 * errors["0"]


def test_inverse_cholesky_factor_matches_the_factor_of_the_inverse():
    """GPTQ's `U` (upper, `Uᵀ U = H⁻¹`) comes from one Cholesky of the order-reversed H; it must be the
    Cholesky factor of H⁻¹ itself, and a singular H gets damped until it factorises."""
    from sqlora_hf.compression.gptq import _inverse_cholesky_upper

    g = torch.Generator().manual_seed(5)
    k = 97
    x = torch.randn(3 * k, k, generator=g) * torch.rand(k, generator=g) ** 3  # badly scaled inputs
    h = x.T @ x / (3 * k)
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    u = _inverse_cholesky_upper(h)
    assert torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())
    reference = torch.linalg.cholesky(torch.linalg.inv(h.double()), upper=True)
    assert float((u.double() - reference).norm() / reference.norm()) < 1e-5
    torch.testing.assert_close((u.double().T @ u.double()) @ h.double(), torch.eye(k, dtype=torch.float64),
                               atol=1e-3, rtol=0)
    singular = x[:10].T @ x[:10]  # rank 10 of 97: needs the damping loop
    u = _inverse_cholesky_upper(singular)
    assert bool(torch.isfinite(u).all()) and bool((torch.diagonal(u) > 0).all())


def test_a_config_is_not_changed_by_compressing_and_a_saved_record_is_not_data(tiny_model_dirs):
    """The caller's config keeps its data (it used to be replaced by the record, and a second from_pretrained
    with it then ran data-free while config.json claimed the calibration); a record read back from a saved
    model is refused as calibration data."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs["llama"][0]
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    config = SQLoRAConfig(bits=3, rank=0, calibration=calib, calibration_samples=4, calibration_seq_len=16)
    first = sqlora_hf.compress(AutoModelForCausalLM.from_pretrained(path), config)
    assert config.calibration is calib and first.config.quantization_config is not config
    second = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    assert config.calibration is calib
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = SQLoRAConfig.from_dict(first.config.quantization_config.to_dict())
    assert record.calibration["source"] == "token-ids"
    with pytest.raises(ValueError, match="only the record of a past calibration .*pass the data again"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=record)
    with pytest.raises(ValueError, match="only the record of a past calibration"):
        sqlora_hf.compress(AutoModelForCausalLM.from_pretrained(path), record)


def test_compress_marks_the_model_quantized_and_refuses_impossible_configs_before_sampling(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs["llama"][0]
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(rank=0, calibration_samples=4, calibration_seq_len=16)
    model = sqlora_hf.compress(AutoModelForCausalLM.from_pretrained(path), SQLoRAConfig(**kw), calib)
    assert model.is_quantized and model.hf_quantizer is not None
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
        dense = model.dequantize()
        assert not any(isinstance(m, SQLoRALinear) for m in dense.modules())
        torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-4, atol=1e-4)
    fresh = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="found no layer to compress"):
        sqlora_hf.compress(fresh, SQLoRAConfig(**{**kw, "group_size": 256}, modules_to_not_convert=["down_proj"]), calib)
    with pytest.raises(ValueError, match=r"SQLoRAConfig\.rank=1000 is larger"):
        sqlora_hf.compress(fresh, SQLoRAConfig(**{**kw, "rank": 1000}), "self")  # refused before any sampling
    assert not any(isinstance(m, SQLoRALinear) for m in fresh.modules())


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_float16_models_with_layernorm_calibrate(tiny_model_dirs, arch):
    """The bf16 autocast of the block passes is for fp32 models: an fp16 LayerNorm refused its bf16 input."""
    from .conftest import auto_class

    path, kind = tiny_model_dirs[arch]
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = auto_class(kind).from_pretrained(path, dtype=torch.float16, quantization_config=SQLoRAConfig(
        rank=0, calibration=calib, calibration_samples=4, calibration_seq_len=16))
    assert any(isinstance(m, SQLoRALinear) for m in model.modules())
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 10)))
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert hidden.dtype == torch.float16 and torch.isfinite(hidden).all()


def test_window_shapes_outside_linears_and_refused_inputs(tiny_model_dirs, tmp_path):
    """A [samples, tokens] id tensor is used as those windows; compress(..., "self") samples "self"'s default
    shape; Linears outside the blocks (BERT's pooler) are compressed data-free, not left in fp32; an
    IterableDataset and a tokenizer that turns the text into unknown tokens are refused by name."""
    from transformers import AutoModel, AutoModelForCausalLM, BertTokenizer

    from sqlora_hf.calibration import SELF_SAMPLES, SELF_SEQ_LEN

    llama = tiny_model_dirs["llama"][0]
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    model = sqlora_hf.compress(AutoModelForCausalLM.from_pretrained(llama), SQLoRAConfig(rank=0), calib)
    record = model.config.quantization_config.calibration
    assert (record["samples"], record["seq_len"]) == (6, 24)
    assert (model.config.quantization_config.calibration_samples, model.config.quantization_config.calibration_seq_len) == (6, 24)
    model = sqlora_hf.compress(AutoModelForCausalLM.from_pretrained(llama), SQLoRAConfig(rank=0), "self")
    record = model.config.quantization_config.calibration
    assert (record["samples"], record["seq_len"]) == (SELF_SAMPLES, SELF_SEQ_LEN)

    bert = AutoModel.from_pretrained(tiny_model_dirs["bert"][0], quantization_config=SQLoRAConfig(
        rank=0, calibration=calib, calibration_samples=6, calibration_seq_len=24))
    assert isinstance(bert.pooler.dense, SQLoRALinear)

    datasets = pytest.importorskip("datasets")
    iterable = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset()
    with pytest.raises(ValueError, match="IterableDataset cannot be measured.*pass a Dataset"):
        SQLoRAConfig(calibration=iterable)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    empty = BertTokenizer(str(vocab))
    with pytest.raises(ValueError, match=r"turns 100% of the calibration text into its unknown token '\[UNK\]'"):
        sqlora_hf.compress(AutoModelForCausalLM.from_pretrained(llama), SQLoRAConfig(calibration_seq_len=8), TEXTS,
                           tokenizer=empty)


def test_encoder_decoder_models_are_refused_by_name(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                        d_kv=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support encoder-decoder models.*compress it data-free"):
        T5ForConditionalGeneration.from_pretrained(tmp_path, quantization_config=SQLoRAConfig(
            calibration=torch.randint(0, 256, (4, 16)), calibration_samples=4, calibration_seq_len=16))


def test_an_explicit_budget_is_kept_with_linears_outside_the_blocks(tiny_model_dirs):
    """The calibrated budget plans the blocks' layers; BERT's pooler, outside them, stays uncompressed there
    (compressed at the nominal width afterwards it raised a 3.25 bpw MiniLM to 3.263)."""
    from torch import nn
    from transformers import AutoModel

    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = AutoModel.from_pretrained(tiny_model_dirs["bert"][0], quantization_config=SQLoRAConfig(
        memory_budget="3.25bpw", rank=0, calibration=calib, calibration_samples=4, calibration_seq_len=16))
    assert type(model.pooler.dense) is nn.Linear
    assert sqlora_hf.report(model)["bits_per_weight"] <= 3.25
