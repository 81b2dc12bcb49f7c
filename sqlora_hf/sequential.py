"""Calibrated compression of a model in memory, one transformer block at a time.

Each block sees the *compressed* outputs of the blocks before it, so later blocks are fitted to what
earlier ones really produce (the GPTQ protocol). Only one block's activations are held. Two ways to
run a block, same result up to which activations each Linear's Hessian sees:

- **one pass** (default when the activations of all samples fit in memory): the block runs once
  over every sample together; a hook on each Linear computes its Hessian `H = XᵀX/T` from the input
  it is called with, compresses it right there and lets the call go on with the compressed weight.
  Later Linears of the block therefore see the compressed outputs of earlier ones ("true
  sequential" GPTQ), and the block costs one forward plus the Hessians.
- **two passes** (large models or many samples): the block runs in mini-batches with hooks that
  accumulate every Linear's Hessian, its Linears are compressed, and it runs again to produce the
  next block's inputs. About twice the forward cost, but only a mini-batch of activations at once.

Linears that share an input (q/k/v, gate/up) share one Hessian computation.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging as hf_logging

from .allocator import reuse_freed_memory
from .calibration import (SELF_SAMPLES, SELF_SEQ_LEN, WALK_SAMPLES, WALK_SEQ_LEN, can_generate_text, is_self,
                          prepare)
from .compression.calibrated import CalibratedSpec, compress_shared_input, compress_with_hessian
from .compression.gptq import HessianCache, float_targets, gram, ridge_factor
from .formats.layer import PackedLayer, layout_problem
from .mixed_precision import forward_autocast, full_precision
from .nn.linear import SQLoRALinear
from .output_head import compress_output_head

logger = hf_logging.get_logger("sqlora_hf")

# One pass holds every sample's activations at once: allow it while they take at most this share
# of the memory available when compression starts.
ONE_PASS_MEMORY_SHARE = 0.4
# Asymmetric calibration carries the float model's stream for this many of the calibration samples,
# and shrinks each target toward the float weight by this ridge (in units of mean(diag H)). SmolLM2 at
# 4.25 bpw (perplexity ratio; docs/calibrated.md): 32 samples with ridge 0.01 / 0.1 / 1 / 10: 1.076 /
# 1.053 / 1.046 / 1.051; 16 with ridge 1: 1.044-1.048; all 128 with ridge 0.01: 1.044 at twice the time.
FLOAT_STREAM_SAMPLES = 16
ASYMMETRIC_RIDGE = 1.0


Inputs = list[tuple[tuple, dict]]  # a block's inputs: (args, kwargs) per chunk of samples


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the largest ModuleList whose items hold Linear layers."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"calibrated compression does not support encoder-decoder models ({type(model).__name__}): "
                         "their two stacks of blocks need two streams of inputs; compress it data-free "
                         "(calibration=None)")
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
    """The block over every chunk of inputs, matrix products in bf16 where the CPU has them
    (`mixed_precision`; hooks that compress or measure switch back to fp32)."""
    outputs = []
    for args, kwargs in inputs:
        hidden_in = args[0] if args else kwargs["hidden_states"]
        with forward_autocast(hidden_in.device, hidden_in.dtype):
            out = block(*args, **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(((hidden,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
    return outputs


class _SharedGram:
    """`XᵀX` (or, with `normalize`, `XᵀX / T`) of the last input seen, so Linears called with the
    same tensor (q/k/v, gate/up) share one computation and one Hessian object.

    With `head_samples`, the Gram of the first `head_samples` samples is kept too (`head`, always
    divided by its own token count): asymmetric calibration needs it for the samples its float stream
    carries, and summing it with the rest's Gram costs nothing extra.
    """

    def __init__(self, normalize: bool = False, head_samples: int = 0) -> None:
        self.normalize = normalize
        self.head_samples = head_samples
        self.x: Optional[torch.Tensor] = None
        self.h: Optional[torch.Tensor] = None
        self.head: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.x is not x:
            rows = x.detach().reshape(-1, x.shape[-1])
            split = self.head_samples * (rows.shape[0] // x.shape[0]) if x.dim() > 2 else 0
            self.head = None
            if 0 < split < rows.shape[0]:
                head = gram(rows[:split])
                h = head + gram(rows[split:])
                self.head = head.div_(split)
            else:
                h = gram(rows)
            self.x, self.h = x, (h / max(rows.shape[0], 1) if self.normalize else h)
        return self.h

    def head_of(self, x: torch.Tensor, samples: int) -> Optional[torch.Tensor]:
        """The Gram of `x`'s first `samples` samples, if this is what was computed for it."""
        return self.head if self.x is x and self.head_samples == samples else None

    def clear(self) -> None:
        self.x = self.h = self.head = None


class _FloatTargets:
    """Asymmetric calibration: per group of Linears that read one input, the targets `W*` that make
    them reproduce the float model (`compression.gptq.float_targets`).

    `_float_pass` captured, for each Linear, the float stream's input and (where it is narrower than
    the input) its output; the compressed stream's input arrives with the call. The float stream may
    carry only the first `n` samples: `C` and `H` then both come from those samples' tokens, and GPTQ
    still uses the Hessian of all samples. `C = Y_fᵀX` is formed whichever way is cheaper: from the
    float outputs (`N·K` per token, e.g. down_proj) or as `W (X_fᵀX)` (`K²`, e.g. q/k/v, gate/up).
    What depends only on the input (the float samples' `H`, `X_fᵀX`, the ridge factor) is kept for
    the last input, so Linears that read one tensor but are compressed apart (q/k/v given different
    bits by a budget) compute it once.
    """

    def __init__(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                 biases: dict[str, Optional[torch.Tensor]], ridge: float) -> None:
        self.inputs, self.outputs, self.biases, self.ridge = inputs, outputs, biases, ridge
        self._per_input: dict[str, Any] = {}  # for the input tensors held under "x" and "xf"

    def __call__(self, group: list[str], x: torch.Tensor, h: torch.Tensor, weights: list[torch.Tensor],
                 shared: Optional[_SharedGram] = None) -> Optional[list[torch.Tensor]]:
        """`shared`: the Gram maker that computed `h`; its `head` saves computing the float samples' own."""
        xf = self.inputs.get(group[0])
        if xf is None or x.dim() < 2 or xf.shape[1:] != x.shape[1:] or xf.shape[0] > x.shape[0]:
            return None
        k = x.shape[-1]
        rows = x.detach()[: xf.shape[0]].reshape(-1, k).to(torch.float32)
        tokens = max(rows.shape[0], 1)
        if self._per_input.get("x") is not x or self._per_input.get("xf") is not xf:
            self._per_input = {"x": x, "xf": xf}
        cached = self._per_input
        if xf.shape[0] < x.shape[0]:  # `h` is over all samples: take the float stream's own
            if "h" not in cached:
                head = shared.head_of(x, xf.shape[0]) if shared is not None else None
                cached["h"] = head if head is not None else gram(rows) / tokens
            h = cached["h"]
        weights = [w.to(torch.float32) for w in weights]
        outs = [self.outputs.get(m) for m in group]
        if all(o is not None for o in outs) and sum(w.shape[0] for w in weights) < k:
            crosses = []
            for m, out in zip(group, outs):
                y = out.detach().reshape(-1, out.shape[-1]).to(torch.float32)
                if self.biases.get(m) is not None:
                    y = y - self.biases[m].detach().to(torch.float32)
                crosses.append(y.T @ rows / tokens)
        else:
            if "cross" not in cached:
                cached["cross"] = xf.detach().reshape(-1, k).to(torch.float32).T @ rows / tokens  # X_fᵀX
            crosses = [w @ cached["cross"] for w in weights]
        if "factor" not in cached:
            cached["factor"] = ridge_factor(h, self.ridge)
        return float_targets(weights, crosses, h, self.ridge, factor=cached["factor"])

    def clear(self) -> None:
        self.inputs, self.outputs = {}, {}
        self._per_input = {}


def _float_pass(block: nn.Module, float_inputs: Inputs, targets: dict[str, nn.Module], ridge: float
                ) -> tuple[_FloatTargets, Inputs]:
    """Run the still-uncompressed block on the float model's stream: (the targets maker, holding each
    Linear's float input and, where it is narrower, its output, both at its first call; the block's
    outputs, i.e. the float stream for the next block)."""
    names = {id(mod): name for name, mod in targets.items()}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def pre_hook(mod, args):
        inputs.setdefault(names[id(mod)], args[0])

    def hook(mod, args, out):
        weight = _dense_weight(mod)
        if weight.shape[0] < weight.shape[1]:
            outputs.setdefault(names[id(mod)], out)

    handles = [mod.register_forward_pre_hook(pre_hook) for mod in targets.values()]
    handles += [mod.register_forward_hook(hook) for mod in targets.values()]
    try:
        block_outputs = _run_block(block, float_inputs)
    finally:
        for handle in handles:
            handle.remove()
    biases = {name: mod.bias for name, mod in targets.items()}
    return _FloatTargets(inputs, outputs, biases, ridge), block_outputs


def _samples(inputs: Inputs) -> int:
    """How many samples a block's inputs carry (over all chunks)."""
    return sum((args[0] if args else kwargs["hidden_states"]).shape[0] for args, kwargs in inputs)


def _dense_weight(mod: nn.Module) -> torch.Tensor:
    """`[out, in]` whatever the module stores (GPT-2's Conv1D keeps `[in, out]`)."""
    return mod.weight.t() if isinstance(mod, Conv1D) else mod.weight


def one_pass_fits(tokens: int, block: nn.Module, float_tokens: int = 0) -> bool:
    """Whether every sample's activations of one block fit `ONE_PASS_MEMORY_SHARE` of free memory."""
    linears = [m for m in block.modules() if isinstance(m, (nn.Linear, Conv1D))]
    widths = [max(_dense_weight(m).shape) for m in linears]
    # hidden states in and out, an MLP's intermediate tensors (gate, up, their product), and the freed
    # tensors `reuse_freed_memory` keeps for reuse: SmolLM2 at 128 × 512 grew by 3.2 GB (estimate 3.6)
    need = tokens * max(widths, default=0) * 4 * 9
    # asymmetric calibration: the float stream's hidden states, every Linear's float input and the
    # narrower outputs, held together
    need += float_tokens * 4 * (2 * max(widths, default=0) + sum(min(_dense_weight(m).shape) for m in linears)
                                + sum(_dense_weight(m).shape[1] for m in linears))
    return need <= ONE_PASS_MEMORY_SHARE * _available_bytes()


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


SpecFor = Callable[[str], CalibratedSpec]


Groups = list[list[str]]  # names of Linears that read one input tensor, in call order


def _compress_block_one_pass(block: nn.Module, block_name: str, inputs: Inputs, targets: dict[str, nn.Module],
                             spec_for: SpecFor, siblings: Optional[Groups] = None,
                             float_inputs: Optional[Inputs] = None
                             ) -> tuple[dict[str, tuple[PackedLayer, float]], Inputs, Groups, Optional[Inputs]]:
    """Compress `block` in one forward pass: (results, the block's outputs, the groups of Linears seen
    reading one input, the float stream's outputs when `float_inputs` is given).

    `siblings` are the groups the previous block showed (q/k/v, gate/up): when the first Linear of a
    group runs, the whole group is compressed at once (`compress_shared_input`: one stacked GPTQ
    sweep instead of one per Linear). The others' results wait until their own call, and are used
    only if that call reads the very same tensor; otherwise that Linear is compressed on its own.
    With `float_inputs` (asymmetric calibration) the uncompressed block first runs on the float
    model's stream, and each Linear is then fitted to the float model's outputs (`_FloatTargets`).
    """
    names = {id(mod): name for name, mod in targets.items()}
    float_outputs = None
    to_float = None
    if float_inputs is not None:
        to_float, float_outputs = _float_pass(block, float_inputs, targets, ASYMMETRIC_RIDGE)
    shared = _SharedGram(normalize=True, head_samples=_samples(float_inputs) if float_inputs else 0)
    cache = HessianCache()
    done: dict[str, tuple[PackedLayer, float]] = {}
    pending: dict[str, tuple[torch.Tensor, tuple[PackedLayer, float]]] = {}
    group_of = {name: group for group in siblings or [] for name in group}
    seen: Groups = []

    def install(mod: nn.Module, name: str, result: tuple[PackedLayer, float]) -> None:
        approx = result[0].dequantize(torch.float32).to(mod.weight.dtype)
        # The rest of this call (and of the block) runs on what the compressed layer computes.
        mod.weight.data = approx.t().contiguous() if isinstance(mod, Conv1D) else approx
        done[name] = result

    def hook(mod, args):
        with full_precision():
            return compress_on_call(mod, args)

    def compress_on_call(mod, args):
        name = names[id(mod)]
        if name in done:  # a Linear called twice keeps the compression of its first call
            return None
        x = args[0]
        if seen and shared.x is x:
            seen[-1].append(name)
        else:
            seen.append([name])
        if name in pending:
            wanted, result = pending.pop(name)
            if wanted is x:
                install(mod, name, result)
                return None
        spec = spec_for(name)
        group = [name] + [m for m in group_of.get(name, []) if m != name and m in targets and m not in done
                          and m not in pending and spec_for(m) == spec]
        h = shared(x)
        weights = [_dense_weight(targets[m]) for m in group]
        aimed = to_float(group, x, h, weights, shared) if to_float is not None else None
        weights = aimed if aimed is not None else weights
        results = compress_shared_input(weights, h, spec, [f"{block_name}.{m}" for m in group], cache)
        install(mod, name, results[0])
        pending.update((m, (x, r)) for m, r in zip(group[1:], results[1:]))
        return None

    handles = [mod.register_forward_pre_hook(hook) for mod in targets.values()]
    try:
        outputs = _run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
        shared.clear()
        pending.clear()
        if to_float is not None:
            to_float.clear()
    return done, outputs, [g for g in seen if len(g) > 1], float_outputs


def collect_hessians(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: dict[str, nn.Module]
                     ) -> tuple[dict[str, torch.Tensor], list[tuple[tuple, dict]]]:
    """({name: H = XᵀX / T} over every call of each target Linear, the block's outputs) for one block run."""
    hessians: dict[str, torch.Tensor] = {}
    counts = {name: 0 for name in targets}
    shared = _SharedGram()

    def accumulate(name: str):
        def hook(_module, args, _output):
            x = args[0]
            with full_precision():
                h = shared(x)
            hessians[name] = h.clone() if name not in hessians else hessians[name].add_(h)
            counts[name] += x.numel() // x.shape[-1]
        return hook

    handles = [mod.register_forward_hook(accumulate(name)) for name, mod in targets.items()]
    try:
        outputs = _run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
        shared.clear()
    return {name: h.div_(max(counts[name], 1)) for name, h in hessians.items()}, outputs


def _compress_block_two_pass(block: nn.Module, block_name: str, inputs: Inputs, targets: dict[str, nn.Module],
                             spec_for: SpecFor, siblings: Optional[Groups] = None,
                             float_inputs: Optional[Inputs] = None
                             ) -> tuple[dict[str, tuple[PackedLayer, float]], None, Groups, None]:
    if float_inputs is not None:
        raise ValueError("asymmetric calibration needs the one-pass mode")  # _compress_model never asks
    hessians, _ = collect_hessians(block, inputs, targets)
    done = {}
    for name, mod in targets.items():
        if name in hessians:
            done[name] = compress_with_hessian(_dense_weight(mod), hessians.pop(name), spec_for(name),
                                               f"{block_name}.{name}")
    return done, None, [], None


def compress_model(model: nn.Module, config: Any, calibration_data: Any = None, tokenizer: Any = None,
                   batch_size: int = 8, one_pass: Optional[bool] = None) -> nn.Module:
    """Compress `model` in place with calibration data; see `sqlora_hf.compress`.

    `one_pass=None` picks the one-pass mode when all samples' activations fit in memory.
    """
    with reuse_freed_memory():
        return _compress_model(model, config, calibration_data, tokenizer, batch_size, one_pass)


def window_shape(config: Any, data: Any, model: nn.Module) -> tuple[int, int]:
    """Calibration windows (samples, tokens): what the user set, else the default for this data. A
    `[samples, tokens]` id tensor is taken as the windows it already is; `"self"` samples 64 x 128 from a
    causal LM and walks 2048 x 32 over an encoder's embeddings; anything else 128 x 512. Decided here, not
    when the config was built, because `sqlora_hf.compress` may bring the data (or "self") itself."""
    if is_self(data):
        default = (SELF_SAMPLES, SELF_SEQ_LEN) if can_generate_text(model) else (WALK_SAMPLES, WALK_SEQ_LEN)
    elif isinstance(data, torch.Tensor) and data.dim() == 2:
        default = (int(data.shape[0]), int(data.shape[1]))
    else:
        default = (128, 512)
    return (config.calibration_samples if getattr(config, "_calibration_samples_given", True) else default[0],
            config.calibration_seq_len if getattr(config, "_calibration_seq_len_given", True) else default[1])


def _compress_model(model: nn.Module, config: Any, calibration_data: Any, tokenizer: Any, batch_size: int,
                    one_pass: Optional[bool]) -> nn.Module:
    from .quantizer import check_rank_fits, modules_to_skip, nothing_to_compress

    config.check_writable()
    data = calibration_data if calibration_data is not None else config.calibration
    samples, seq_len = window_shape(config, data, model)
    config.calibration_samples, config.calibration_seq_len = samples, seq_len  # what config.json records
    skip = modules_to_skip(model, config)
    prefix, blocks = find_blocks(model)
    # what each block compresses, decided once (and its warnings given once), before minutes of sampling
    per_block = [(f"{prefix}.{i}", _eligible(block, f"{prefix}.{i}", skip, config)) for i, block in enumerate(blocks)]
    if config.head_bits is None and not any(targets for _, targets in per_block):
        raise ValueError(nothing_to_compress(model, config, skip))
    check_rank_fits(config.rank, [(f"{name}.{n}", m) for name, targets in per_block for n, m in targets.items()])
    batch = prepare(data, tokenizer, samples, seq_len, model=model)
    base = CalibratedSpec(bits=config.bits, group_size=config.group_size, sparsity=config.sparsity, rank=config.rank,
                          method=config.calibration_method, sparsity_criterion=config.sparsity_criterion,
                          scale_search=config.uses_scale_search(calibrated=True),
                          refine_passes=config.resolved_refine_passes())
    was_training = model.training
    model.eval()
    specs: dict[str, CalibratedSpec] = {}
    specs_from_budget = False  # an explicit budget plans the blocks' layers only (see _compress_outside_blocks)
    if config.memory_budget is not None:
        from .budget import plan_calibrated_auto, plan_calibrated_budget
        from .compression.planner import parse_budget

        if parse_budget(config.memory_budget).auto:
            specs = plan_calibrated_auto(config, base, per_block)
        else:
            specs = plan_calibrated_budget(model, config, batch.input_ids, base, skip, prefix, blocks, per_block)
            specs_from_budget = True

    def spec_for(full_name: str) -> CalibratedSpec:
        return specs.get(full_name, base)

    ids = batch.input_ids
    float_samples = min(FLOAT_STREAM_SAMPLES, ids.shape[0]) if config.resolved_asymmetric_calibration() else 0
    if one_pass is None:
        one_pass = one_pass_fits(ids.numel(), blocks[0], float_samples * ids.shape[1])
    if float_samples and not one_pass:
        # Two passes compress a block's Linears together after collecting their inputs from the
        # uncompressed block, so a later Linear (o_proj, gate/up) would correct again, toward the
        # float model, the drift that the ones before it in the block have already corrected.
        logger.warning("sqlora: asymmetric_calibration needs the one-pass mode (this model's activations "
                       "do not fit in memory for it); compressing without it")
        float_samples = 0
    try:
        compress_block = _compress_block_one_pass if one_pass else _compress_block_two_pass
        with torch.no_grad():
            inputs = _capture_inputs(model, blocks[0], ids, ids.shape[0] if one_pass else batch_size)
            # asymmetric calibration: the float model's stream over the first samples, from the same embeddings
            float_inputs = None
            if float_samples:
                float_inputs = _capture_inputs(model, blocks[0], ids[:float_samples],
                                               float_samples if one_pass else batch_size)
            siblings: Groups = []
            for index in hf_logging.tqdm(range(len(blocks)), desc="sqlora: calibrated compression", unit="block"):
                block = blocks[index]
                block_name, targets = per_block[index]
                done, outputs, siblings, float_inputs = compress_block(
                    block, block_name, inputs, targets, lambda name: spec_for(f"{block_name}.{name}"), siblings,
                    float_inputs)
                for name, mod in targets.items():
                    if name not in done:
                        logger.warning(f"sqlora: {block_name}.{name} never ran on the calibration data; left uncompressed")
                        continue
                    packed, rel = done[name]
                    _swap_in(block, name, mod, packed, rel, config)
                inputs = outputs if outputs is not None else _run_block(block, inputs)
    except Exception as err:
        err.add_note("sqlora: the model was being compressed in place; the layers before the error are already "
                     "changed, so reload it before trying again")
        raise
    _compress_outside_blocks(model, config, skip, prefix, budgeted=specs_from_budget)
    compress_output_head(model, config)
    model.train(was_training)
    config.calibration = batch.record  # the texts are not kept, only what identifies them
    model.config.quantization_config = config
    return model


def _compress_outside_blocks(model: nn.Module, config: Any, skip: list[str], prefix: str, budgeted: bool) -> None:
    """Linears outside the repeated blocks (BERT's pooler and prediction transform, a classifier; the output
    head is skipped unless `head_bits`) get no calibration inputs block by block: compressed data-free at the
    config's bits and group size, as `from_pretrained` without calibration would, rather than left in fp32.
    Not under an explicit memory budget: its plan covers the blocks' layers and counts these as fixed bytes,
    and a layer added at the nominal width afterwards could raise the bits per weight past the budget."""
    from .compression import compress_weight
    from .quantizer import compression_spec

    spec = compression_spec(config)
    names = []
    for name, mod in list(model.named_modules()):
        if (not isinstance(mod, (nn.Linear, Conv1D)) or isinstance(mod, SQLoRALinear) or name.startswith(prefix + ".")
                or not should_convert_module(name, skip)):
            continue
        if budgeted:
            logger.info(f"sqlora: {name} is outside the repeated blocks and the budget's plan: left uncompressed")
            continue
        weight = _dense_weight(mod)
        problem = layout_problem(config.bits, config.group_size, config.sparsity, weight.shape[1])
        if problem:
            logger.warning(f"sqlora: leaving {name} uncompressed: {problem}")
            continue
        model.set_submodule(name, _packed_module(mod, compress_weight(weight.detach().float(), spec, name), config))
        names.append(name)
    if names:
        logger.info(f"sqlora: {len(names)} Linear layer(s) outside the repeated blocks compressed data-free "
                    f"(first: {names[0]})")


def _packed_module(mod: nn.Module, packed: PackedLayer, config: Any) -> SQLoRALinear:
    """The `SQLoRALinear` that replaces the Linear/Conv1D `mod`, holding `packed` and `mod`'s bias."""
    weight = _dense_weight(mod)
    new = SQLoRALinear(weight.shape[1], weight.shape[0], bias=mod.bias is not None,
                       compute_dtype=config.torch_compute_dtype, backend=config.backend,
                       transposed_source=isinstance(mod, Conv1D))
    if mod.bias is not None:
        new.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
    new.set_packed(packed)
    return new.to(weight.device)


def _swap_in(block: nn.Module, name: str, mod: nn.Module, packed: PackedLayer, rel: float, config: Any) -> None:
    new = _packed_module(mod, packed, config)
    new.compression_info = {"method": config.calibration_method, "rel_output_error": rel,
                            "bits": packed.bits, "group_size": packed.group_size, "rank": packed.rank}
    block.set_submodule(name, new)


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
