"""Calibrated compression of a model in memory, one transformer block at a time.

For each block: run the calibration activations through it with hooks that accumulate
`H = Σ xᵀx` for every Linear, compress those Linears with their own H, then run the activations
through the *compressed* block to produce the next block's inputs — so later blocks learn to
correct what earlier ones lost (the GPTQ protocol). Only one block's activations are held.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging as hf_logging

from .calibration import prepare
from .compression.calibrated import CalibratedSpec, compress_with_hessian
from .formats.layer import layout_problem
from .nn.linear import SQLoRALinear

logger = hf_logging.get_logger("sqlora_hf")


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the largest ModuleList whose items hold Linear layers."""
    best: Optional[tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(isinstance(m, (nn.Linear, Conv1D)) for m in module[0].modules()):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise ValueError("calibrated compression needs a model made of repeated blocks (no ModuleList of layers found)")
    return best


def _capture_inputs(model: nn.Module, first: nn.Module, input_ids: torch.Tensor, batch_size: int
                    ) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(((hidden,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
    return outputs


def compress_model(model: nn.Module, config: Any, calibration_data: Any = None, tokenizer: Any = None,
                   batch_size: int = 8) -> nn.Module:
    """Compress `model` in place with calibration data; see `sqlora_hf.compress`."""
    from .quantizer import modules_to_skip

    data = calibration_data if calibration_data is not None else config.calibration
    batch = prepare(data, tokenizer, config.calibration_samples, config.calibration_seq_len)
    spec = CalibratedSpec(bits=config.bits, group_size=config.group_size, sparsity=config.sparsity, rank=config.rank,
                          method=config.calibration_method, sparsity_criterion=config.sparsity_criterion)
    skip = modules_to_skip(model, config)
    prefix, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = _capture_inputs(model, blocks[0], batch.input_ids, batch_size)
        for index in hf_logging.tqdm(range(len(blocks)), desc="sqlora: calibrated compression", unit="block"):
            block = blocks[index]
            targets = _eligible(block, f"{prefix}.{index}", skip, config)
            hessians = {name: None for name in targets}
            counts = {name: 0 for name in targets}
            handles = [mod.register_forward_hook(_accumulate(name, hessians, counts)) for name, mod in targets.items()]
            try:
                _run_block(block, inputs)
            finally:
                for h in handles:
                    h.remove()
            for name, mod in targets.items():
                full = f"{prefix}.{index}.{name}"
                weight = mod.weight.t() if isinstance(mod, Conv1D) else mod.weight
                h = hessians[name] / max(counts[name], 1)
                packed, rel = compress_with_hessian(weight, h, spec, full)
                new = SQLoRALinear(weight.shape[1], weight.shape[0], bias=mod.bias is not None,
                                   compute_dtype=config.torch_compute_dtype, backend=config.backend,
                                   transposed_source=isinstance(mod, Conv1D))
                if mod.bias is not None:
                    new.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
                new.set_packed(packed)
                new.to(weight.device)
                new.compression_info = {"method": spec.method, "rel_output_error": rel}
                block.set_submodule(name, new)
            inputs = _run_block(block, inputs)
    model.train(was_training)
    config.calibration = batch.record  # the texts are not kept, only what identifies them
    model.config.quantization_config = config
    return model


def _eligible(block: nn.Module, block_name: str, skip: list[str], config: Any) -> dict[str, nn.Module]:
    out = {}
    for name, mod in block.named_modules():
        if not isinstance(mod, (nn.Linear, Conv1D)) or isinstance(mod, SQLoRALinear):
            continue
        full = f"{block_name}.{name}"
        if not should_convert_module(full, skip):
            continue
        in_f = mod.weight.shape[0] if isinstance(mod, Conv1D) else mod.in_features
        problem = layout_problem(config.bits, config.group_size, config.sparsity, in_f)
        if problem:
            logger.warning(f"sqlora: leaving {full} uncompressed: {problem}")
            continue
        out[name] = mod
    return out


def _accumulate(name: str, hessians: dict, counts: dict):
    def hook(_module, args, _output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
        h = x.T @ x
        hessians[name] = h if hessians[name] is None else hessians[name] + h
        counts[name] += x.shape[0]
    return hook
