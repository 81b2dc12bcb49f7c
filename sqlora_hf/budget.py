"""Model-level glue of the memory budget and elastic rank (the algorithms live in `compression/`).

- `plan_for_budget`: before weights load, map module names to checkpoint keys, count the bytes that
  stay uncompressed, and let `compression.checkpoint_plan` fix one spec per layer.
- `apply_elastic_rank`: after loading, cut the sorted low-rank factors to `rank_keep` or to what a
  (smaller) `memory_budget` allows, without recompressing.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .compression import CompressionSpec
from .compression.checkpoint_plan import LayerToPlan, plan_checkpoint
from .compression.elastic import kept_rank, ranks_for_budget, truncate_rank
from .compression.planner import BudgetError, budget_advice, pareto_front, parse_budget
from .config import SQLoRAConfig
from .mixed_precision import forward_autocast, full_precision


def fixed_bytes(model: nn.Module, converted: Sequence[str]) -> int:
    """Bytes of every parameter and buffer compression leaves alone (tied tensors once), read from
    the meta model: embeddings, norms, biases, the head; the fp weight slots of converted layers
    are excluded."""
    slots = {id(model.get_submodule(name)._parameters.get("weight")) for name in converted}
    # A head tied to the input embedding is stored once, but on the meta model the tie may not be made yet
    # (GPT-2): count the embedding only.
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and emb is not None and getattr(head, "weight", None) is not None \
                and head.weight is not emb.weight and head.weight.shape == emb.weight.shape:
            slots.add(id(head.weight))
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in slots or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def checkpoint_key(name: str, keys: set[str], prefix: str) -> str:
    """The checkpoint key of `name`'s weight, allowing for a base-model prefix added or dropped."""
    candidates = [f"{name}.weight"]
    if prefix and name.startswith(prefix + "."):
        candidates.append(f"{name[len(prefix) + 1:]}.weight")
    if prefix:
        candidates.append(f"{prefix}.{name}.weight")
    for key in candidates:
        if key in keys:
            return key
    return candidates[0]


def planned_tiers(config: SQLoRAConfig) -> list[int]:
    """Bit widths the planner may use. With the default "auto" budget only `bits` itself, and group
    sizes no finer than `group_size` (checkpoint_plan): the plan is then the uniform layout with a
    few groups coarsened to pay for metadata, plus any rank worth its bytes. Measured on SmolLM2,
    letting the data-free error proxy mix tiers or finer groups at 4.25 bpw was worse than uniform
    NF4 g64 (docs/benchmarks_quality.md), so those trades happen only under an explicit budget."""
    if parse_budget(config.memory_budget).auto:
        return [config.bits]
    return sorted({*config.tiers, config.bits})


def plan_for_budget(model: nn.Module, config: SQLoRAConfig, converted: Sequence[str],
                    checkpoint_files: Optional[Sequence[str]]) -> dict[str, CompressionSpec]:
    """{module name: spec} so that the whole model fits `config.memory_budget` with least error."""
    from .compression.checkpoint_plan import find_keys
    from .quantizer import compression_spec

    if not checkpoint_files:
        raise ValueError("SQLoRAConfig.memory_budget needs the checkpoint files to plan; none were given")
    files = [str(f) for f in checkpoint_files]
    if not all(f.endswith(".safetensors") for f in files):
        raise ValueError("SQLoRAConfig.memory_budget plans from safetensors checkpoints only; "
                         "set memory_budget=None to compress a .bin checkpoint")
    keys = set(find_keys(files))
    prefix = getattr(model, "base_model_prefix", "") or ""
    layers = [LayerToPlan(name, checkpoint_key(name, keys, prefix), model.get_submodule(name).transposed_source)
              for name in converted]
    # transformers builds the model under a meta-device context; the planner computes on real tensors.
    with torch.device("cpu"):
        plan = plan_checkpoint(layers, files, parse_budget(config.memory_budget), fixed_bytes(model, converted),
                               compression_spec(config), planned_tiers(config),
                               str(config.memory_budget))
    return plan.specs


def apply_elastic_rank(model: nn.Module, config: SQLoRAConfig, converted: Sequence[str],
                       pre_quantized: bool) -> None:
    """Truncate the corrections to `rank_keep`, then (reload only) to a whole-model byte budget."""
    modules = {name: model.get_submodule(name) for name in converted}
    if config.rank_keep is not None and config.rank_keep < 1:
        for name, module in modules.items():
            p = module.packed()
            if p.rank:
                module.set_packed(truncate_rank(p, kept_rank(p.rank, config.rank_keep), name))
        # Applied once: the truncated factors are what a later save_pretrained writes, so the saved
        # config must not ask for another cut on the next reload.
        config.rank_keep = None
    if not pre_quantized or config.memory_budget in (None, "auto"):
        return
    from .report import report

    summary = report(model)
    budget = parse_budget(config.memory_budget)
    compressed = summary["compressed_bytes"]
    rest = summary["total_bytes"] - compressed
    layer_budget = budget.layer_bytes(summary["compressed_weights"], rest)
    if compressed <= layer_budget:
        return
    layers = {name: m.packed() for name, m in modules.items()}
    try:
        ranks = ranks_for_budget(layers, layer_budget)
    except ValueError as err:
        raise BudgetError(f"SQLoRAConfig.memory_budget={config.memory_budget!r} cannot be met on reload by "
                          f"truncating the low-rank corrections: {err}. Recompress the fp model with this "
                          "budget instead.") from None
    for name, rank in ranks.items():
        if rank != layers[name].rank:
            modules[name].set_packed(truncate_rank(layers[name], rank, name))


def plan_calibrated_auto(config: SQLoRAConfig, base, per_block: Sequence[tuple[str, dict[str, nn.Module]]]
                         ) -> dict:
    """{full module name: CalibratedSpec} for calibrated compression under the default "auto" budget.

    The same layout as data-free "auto" (`checkpoint_plan`): every layer keeps `bits`, at the nominal
    size of `bits`/`group_size` plus a pinned int rank, with the per-layer metadata paid for by
    coarsening the groups where round-to-nearest says it costs least. `rank="auto"` means rank 0 here:
    the calibrated planner, free to buy rank under explicit budgets, gave every SmolLM2 layer rank 0 at
    3.0 and 4.25 bpw (finer groups or a higher tier always lowered the loss more per byte), and the
    old meaning of "auto" with calibration (rank up to 16, ≤ 0.25 bit per weight) put the default at
    ~4.5 bpw. No pass over the calibration data is needed, so this costs seconds, where the explicit
    budget planner's loss-gradient pass and candidate scoring cost ~35 s on SmolLM2 for a plan that
    was 0.4 % better at 4.25 bpw (docs/calibrated.md).
    """
    from dataclasses import replace

    from .compression.planner import auto_target_bytes, layer_candidates, solve_budget
    from .sequential import _dense_weight

    rank = base.rank if isinstance(base.rank, int) else 0
    names, fronts = [], []
    target = 0
    for block_name, targets in per_block:
        for name, mod in targets.items():
            weight = _dense_weight(mod)
            n, k = weight.shape
            # a pinned rank adds the same bytes to every grid of the layer: choose the grid without it
            cands = [replace(c, rank=rank, nbytes=c.nbytes + 2 * rank * (n + k))
                     for c in layer_candidates(weight, [base.bits], base.sparsity, 0, scale_search=False,
                                               min_group_size=base.group_size)]
            if not cands:
                raise ValueError(f"{block_name}.{name}: {base.bits}-bit groups of {base.group_size} cannot pack "
                                 f"in_features={k}")
            names.append(f"{block_name}.{name}")
            fronts.append(pareto_front(cands))
            target += auto_target_bytes(n, k, base.bits, base.group_size, base.sparsity, rank)
    if not fronts:
        return {}
    least = sum(f[0].nbytes for f in fronts)
    choice = solve_budget(fronts, max(target, least))
    return {name: replace(base, group_size=front[j].group_size, rank=front[j].rank)
            for name, front, j in zip(names, fronts, choice)}


# Samples the calibrated planner runs through the fp model; its errors only need to rank candidates.
PLAN_SAMPLES = 16
# Samples of the forward + backward pass that weighs each layer's output error by the loss (about three
# forwards' work per sample) and, when they fit, collects the Hessians the candidates are scored on.
# SmolLM2, 4.25 / 3.0 bpw: 16 samples gave 1.057x / 1.682x, 8 gave 1.061x / 1.703x (within the
# plan-to-plan spread of ~0.5 %) in half the time (26 s against 50 s), so the planner uses 8.
SENSITIVITY_SAMPLES = 8


def has_language_model_loss(model: nn.Module) -> bool:
    """Whether `model(ids, labels=ids)` is a next-token loss (a causal LM head), which the
    sensitivity pass needs; encoders and bare base models are planned on relative errors."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate()) and not getattr(model.config, "is_encoder_decoder", False)


def output_sensitivity(model: nn.Module, input_ids: torch.Tensor, names: Sequence[str], chunk: int = 2,
                       hessians: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """{name: mean over tokens of (∂loss/∂y_n)²} for each listed Linear's output channels y_n.

    The diagonal empirical Fisher of the next-token loss at each layer output: a perturbation δy of
    that output raises the loss by about ½ Σ_n f_n δy_n², so `Σ_n f_n (E H Eᵀ)_nn` puts every layer's
    output error in the same unit (loss), which the relative error `tr(E H Eᵀ) / tr(W H Wᵀ)` does
    not: a 1 % error in a down projection and in a key projection cost the model very different
    amounts. Only input gradients are computed (weights are frozen for the pass).

    With `hessians` (a dict to fill) the same forward also collects each layer's `H = XᵀX / T`, so
    the planner needs no second pass; Linears reading one tensor (q/k/v) share one H object.

    The pass runs under `mixed_precision.forward_autocast` (bf16 products where the CPU has them; the
    Hessians are still fp32 products of the activations): the sensitivities only weigh candidates
    against each other, and on SmolLM2 the bf16 pass chose nearly the plans of an fp32 one (2 and 4 of
    210 layers differed, near ties; perplexity 1.5046x against 1.5038x at 3.25 bpw; docs/calibrated.md).
    """
    from .sequential import _SharedGram

    wanted = set(names)
    sums: dict[str, torch.Tensor] = {}
    shared = _SharedGram()
    last: list = [None, None]  # the Gram last accumulated, and the name whose accumulator took it

    def on_input(name: str, x: torch.Tensor) -> None:
        h = shared(x)
        if h is last[0]:  # a sibling reading the same tensor already added it: share its accumulator
            hessians[name] = hessians[last[1]]
            return
        last[:] = [h, name]
        if name in hessians:
            hessians[name].add_(h)
        else:
            hessians[name] = h.clone()

    def on_output(name: str):
        def hook(_module, args, out):
            if hessians is not None:
                with full_precision():  # the Hessians stay fp32 products under the pass's autocast
                    on_input(name, args[0])
            if isinstance(out, torch.Tensor) and out.requires_grad:
                def on_grad(g: torch.Tensor) -> None:
                    s = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                    sums[name] = s if name not in sums else sums[name].add_(s)
                out.register_hook(on_grad)
        return hook

    handles = [mod.register_forward_hook(on_output(name)) for name, mod in model.named_modules() if name in wanted]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    first = next(model.parameters())
    try:
        with torch.enable_grad(), forward_autocast(first.device, first.dtype):
            for start in hf_logging.tqdm(range(0, input_ids.shape[0], chunk), desc="sqlora: weighing layers by the loss",
                                         unit="chunk"):
                ids = input_ids[start:start + chunk].to(first.device)
                model(ids, labels=ids, use_cache=False).loss.backward()
                shared.clear()
                last[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    tokens = input_ids.numel()
    if hessians is not None:
        for h in {id(h): h for h in hessians.values()}.values():
            h.div_(tokens)
    return {name: s.div_(tokens) for name, s in sums.items()}


def hessians_fit(blocks: nn.ModuleList, share: float = 0.125) -> bool:
    """Whether every Linear's `K × K` Hessian of the model (one per distinct input width and block,
    counted generously as one per Linear) fits `share` of free memory, so the sensitivity pass can
    collect them all at once."""
    from transformers.pytorch_utils import Conv1D

    from .sequential import _available_bytes, _dense_weight

    need = sum(4 * _dense_weight(m).shape[1] ** 2 for block in blocks for m in block.modules()
               if isinstance(m, (nn.Linear, Conv1D)))
    return need <= share * _available_bytes()


def plan_calibrated_budget(model: nn.Module, config: SQLoRAConfig, input_ids: torch.Tensor, base, skip: list[str],
                           prefix: str, blocks: nn.ModuleList,
                           per_block: Optional[list[tuple[str, dict[str, nn.Module]]]] = None) -> dict:
    """{full module name: CalibratedSpec} so that the compressed model fits `config.memory_budget`.

    For a causal LM: one forward + backward pass of the uncompressed model over the first
    `SENSITIVITY_SAMPLES` samples (`output_sensitivity`), so each candidate's error is the loss it is
    expected to cost, and which also collects every Linear's Hessian when they all fit in memory
    (`hessians_fit`). Otherwise (other models, or Hessians too big to hold at once) one forward pass
    over the first `PLAN_SAMPLES` samples, block by block, collects a block's Hessians, scores its
    candidates and drops them; without a sensitivity pass the errors are relative output errors.
    Then the same Pareto front + exact knapsack as the data-free planner
    (`compression.planner.hessian_candidates`, `solve_budget`).
    """
    from dataclasses import replace

    from .compression.gptq import HessianCache
    from .compression.planner import hessian_candidates, solve_budget
    from .sequential import _capture_inputs, _dense_weight, _eligible, collect_hessians

    budget = parse_budget(config.memory_budget)
    tiers = sorted({*config.tiers, config.bits})
    names: list[str] = []
    fronts = []
    n_weights = 0
    if per_block is None:
        per_block = [(f"{prefix}.{i}", _eligible(block, f"{prefix}.{i}", skip, config)) for i, block in enumerate(blocks)]

    cache = HessianCache()  # q/k/v (and gate/up) share one Hessian object, so one inverse

    def score(block_name: str, targets: dict[str, nn.Module], hessians: dict[str, torch.Tensor]) -> None:
        nonlocal n_weights
        for name, mod in targets.items():
            if name not in hessians:
                continue
            weight = _dense_weight(mod)
            cands = hessian_candidates(weight, hessians.pop(name), tiers, base.sparsity, base.rank,
                                       sensitivity=sensitivity.get(f"{block_name}.{name}"), cache=cache)
            if not cands:
                raise ValueError(f"{block_name}.{name}: no tier in {tiers} can pack in_features={weight.shape[1]}")
            names.append(f"{block_name}.{name}")
            fronts.append(pareto_front(cands))
            n_weights += weight.numel()

    sensitivity: dict[str, torch.Tensor] = {}
    collected: Optional[dict[str, torch.Tensor]] = None
    if has_language_model_loss(model):
        all_targets = [f"{block_name}.{name}" for block_name, targets in per_block for name in targets]
        # One forward + backward gives the sensitivities, and (when they fit) every Hessian too.
        collected = {} if hessians_fit(blocks) else None
        sensitivity = output_sensitivity(model, input_ids[:SENSITIVITY_SAMPLES], all_targets, hessians=collected)
    if collected is not None:
        for block_name, targets in hf_logging.tqdm(per_block, desc="sqlora: planning the budget", unit="block"):
            score(block_name, targets, {name: collected.pop(f"{block_name}.{name}") for name in targets
                                        if f"{block_name}.{name}" in collected})
    else:  # no sensitivity pass, or its Hessians would not all fit: one forward block by block
        ids = input_ids[:PLAN_SAMPLES]
        with torch.no_grad():
            inputs = _capture_inputs(model, blocks[0], ids, ids.shape[0])
            for index in hf_logging.tqdm(range(len(blocks)), desc="sqlora: planning the budget", unit="block"):
                block_name, targets = per_block[index]
                hessians, inputs = collect_hessians(blocks[index], inputs, targets)
                score(block_name, targets, hessians)
    fixed = fixed_bytes(model, names)
    layer_budget = budget.layer_bytes(n_weights, fixed)
    least = sum(f[0].nbytes for f in fronts)
    if least > layer_budget:
        raise BudgetError(
            f"SQLoRAConfig.memory_budget={config.memory_budget!r} cannot be met: the smallest achievable is "
            f"{least + fixed} bytes for the whole model ({8 * least / max(n_weights, 1):.3f} bits per weight over "
            f"the compressed layers, with tiers {tiers}); the uncompressed parts alone take {fixed} bytes. "
            + budget_advice(tiers, config.rank, config.sparsity))
    choice = solve_budget(fronts, layer_budget)
    return {name: replace(base, bits=front[j].bits, group_size=front[j].group_size, rank=front[j].rank)
            for name, front, j in zip(names, fronts, choice)}
