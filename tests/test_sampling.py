"""The sampler behind calibration="self": reserved KV cache and inverse-CDF draws, checked against a
full forward of the model over the text it wrote."""
import pytest
import torch

from sqlora_hf.sampling import ReservedLayer, sample_continuations


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_every_sampled_token_is_where_its_uniform_falls_in_the_full_forward_cdf(tiny_model_dirs, arch):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_model_dirs[arch]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(3)
    rows, length, banned = 3, 40, [7, 200]
    start = torch.randint(10, 250, (rows, 1), generator=g)
    uniforms = torch.rand(rows, length - 1, generator=g)
    out = sample_continuations(model, start, length, uniforms, banned=banned)
    assert out.shape == (rows, length) and torch.equal(out[:, :1], start)
    assert not torch.isin(out[:, 1:], torch.tensor(banned)).any()
    with torch.no_grad():
        logits = model(out).logits[:, :-1].double()
    logits[..., banned] = float("-inf")
    cdf = torch.softmax(logits, -1).cumsum(-1)
    tok = out[:, 1:]
    hi = cdf.gather(-1, tok.unsqueeze(-1))[..., 0]
    lo = torch.where(tok > 0, cdf.gather(-1, (tok - 1).clamp(min=0).unsqueeze(-1))[..., 0], torch.zeros_like(hi))
    u = uniforms.double()
    assert ((lo - 1e-5 <= u) & (u <= hi + 1e-5)).all()
    assert len(set(out[:, 1:].flatten().tolist())) > 20  # really sampling, not one token over and over


def test_full_attention_layers_get_reserved_buffers(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    from sqlora_hf.sampling import reserved_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0])
    cache = reserved_cache(model, 16)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert all(isinstance(layer, ReservedLayer) and layer.capacity == 16 for layer in cache.layers)


def test_reserved_layer_matches_concatenation_and_grows():
    layer = ReservedLayer(capacity=2)
    chunks = [torch.randn(2, 3, t, 4) for t in (1, 2, 1, 3)]
    for i, k in enumerate(chunks):
        keys, values = layer.update(k, -k)
        want = torch.cat(chunks[: i + 1], dim=-2)
        assert torch.equal(keys, want) and torch.equal(values, -want)
        assert layer.get_seq_length() == want.shape[-2]


def test_uniforms_of_the_wrong_shape_are_refused(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0])
    with pytest.raises(ValueError, match=r"uniforms must be \[2, 4\]"):
        sample_continuations(model, torch.ones(2, 1, dtype=torch.long), 5, torch.rand(2, 5))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_linear_copies_round_each_product_and_leave_the_model_as_it_was(tiny_model_dirs, monkeypatch, arch):
    """Sampling's bf16 Linears: inside, every Linear is exactly a bf16 product (bias too: Qwen2's q/k/v);
    outside, the fp32 model is untouched (and nothing happens where bf16 is off or memory is short)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from sqlora_hf import mixed_precision

    monkeypatch.setattr(mixed_precision, "cpu_has_native_bf16", lambda: True)  # the same on any CPU
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch][0]).eval()
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        proj = model.model.layers[0].self_attn.q_proj
        assert (proj.bias is not None) == (arch == "qwen2")
        x = torch.randn(3, proj.in_features)
        with mixed_precision.bf16_linear_copies(model) as used:
            assert used
            bias = None if proj.bias is None else proj.bias.bfloat16()
            want = F.linear(x.bfloat16(), proj.weight.bfloat16(), bias).float()
            assert torch.equal(proj(x), want) and proj.weight.dtype == torch.float32
            inside = model(ids).logits
        assert inside.dtype == torch.float32 and not torch.equal(inside, before)
        assert (inside - before).abs().max() < 0.05 * before.abs().max()
        assert "forward" not in vars(proj) and torch.equal(model(ids).logits, before)

        monkeypatch.setattr(mixed_precision, "_available_memory_bytes", lambda: 1000)
        with mixed_precision.bf16_linear_copies(model) as used:
            assert not used and torch.equal(model(ids).logits, before)
        monkeypatch.undo()
        monkeypatch.setattr(mixed_precision, "cpu_has_native_bf16", lambda: True)
        monkeypatch.setenv("SQLORA_CALIBRATION_BF16", "0")
        with mixed_precision.bf16_linear_copies(model) as used:
            assert not used and torch.equal(model(ids).logits, before)


def test_self_generated_windows_with_bf16_copies_are_reproducible_and_restore_the_model(tiny_model_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sqlora_hf import mixed_precision
    from sqlora_hf.calibration import self_generated

    monkeypatch.setattr(mixed_precision, "cpu_has_native_bf16", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0]).eval()
    first = self_generated(model, samples=4, seq_len=12, batch=2)
    assert first.shape == (4, 12) and torch.equal(first, self_generated(model, samples=4, seq_len=12, batch=2))
    assert not any("forward" in vars(m) for m in model.modules())


def test_bf16_linear_copies_failing_half_way_restore_every_linear(tiny_model_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sqlora_hf import mixed_precision

    monkeypatch.setattr(mixed_precision, "cpu_has_native_bf16", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"][0]).eval()
    made = []
    real = mixed_precision._bf16_linear

    def flaky(weight, bias, rows):
        if len(made) == 3:
            raise MemoryError("no room for another copy")
        made.append(1)
        return real(weight, bias, rows)

    monkeypatch.setattr(mixed_precision, "_bf16_linear", flaky)
    with pytest.raises(MemoryError):
        with mixed_precision.bf16_linear_copies(model):
            pass
    assert len(made) == 3 and not any("forward" in vars(m) for m in model.modules())


def test_sampling_batch_shrinks_to_the_memory_its_kv_cache_may_take(tiny_model_dirs, monkeypatch):
    """calibration="self" samples up to 64 windows together, fewer where their reserved keys and values
    would exceed a quarter of the free memory; the windows drawn do not depend on how many go together."""
    from transformers import AutoModelForCausalLM

    from sqlora_hf import calibration, mixed_precision

    path, _ = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_window = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 12 * 4  # fp32, 12 positions
    assert calibration.rows_that_fit(model, 12, 64) == 64
    monkeypatch.setattr(mixed_precision, "_available_memory_bytes", lambda: 4 * 3 * per_window)
    assert calibration.rows_that_fit(model, 12, 64) == 3
    monkeypatch.setattr(mixed_precision, "_available_memory_bytes", lambda: 0)
    assert calibration.rows_that_fit(model, 12, 64) == 1
    monkeypatch.setenv("SQLORA_CALIBRATION_BF16", "0")  # fp32 products: the same numbers at any batch size
    monkeypatch.setattr(mixed_precision, "_available_memory_bytes", lambda: 4 * 2 * per_window)
    two_at_a_time = calibration.self_generated(model, 5, 12)
    monkeypatch.setattr(mixed_precision, "_available_memory_bytes", lambda: 1 << 40)
    all_together = calibration.self_generated(model, 5, 12)
    assert torch.equal(two_at_a_time, all_together)
