"""Fine-tune a LoRA adapter on a compressed SmolLM2-135M with the transformers Trainer, then merge it.

    python examples/finetune_peft.py [--steps 200] [--out /tmp/smollm2-sqlora-finetuned]

1. compress SmolLM2-135M-Instruct (default `SQLoRAConfig()`: 4-bit g64, 4.244 bpw; at that budget the
   automatic rank finds no low-rank correction worth its bytes) while loading it (once; cached);
2. add a LoRA adapter to every compressed linear layer (`sqlora_hf.lora_config` + PEFT's
   `get_peft_model`), with gradient checkpointing enabled by hand;
3. train it with `Trainer` on the Python documentation that ships with CPython (first 90 % of the
   tokens), and report loss and held-out perplexity (last 10 %) before and after;
4. merge the adapter exactly into the layers' low-rank factors (`sqlora_hf.merge_and_unload`),
   save the merged model as an ordinary sqlora checkpoint, reload it with `from_pretrained`, and
   check that the reloaded model gives the same logits.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import sqlora_hf
from sqlora_hf import SQLoRAConfig, SQLoRALinear
from sqlora_hf.evaluation import perplexity, reference_text, save_smollm2


def split_tokens(tokenizer, held_out_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of the reference text, split by position into train and held-out parts."""
    ids = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
    cut = int(len(ids) * (1 - held_out_fraction))
    return ids[:cut], ids[cut:]


def blocks(ids: torch.Tensor, seq_len: int) -> list[dict]:
    """Non-overlapping training examples of `seq_len` tokens (labels = inputs: causal LM loss)."""
    n = len(ids) // seq_len
    chunks = ids[: n * seq_len].reshape(n, seq_len)
    return [{"input_ids": row, "labels": row} for row in chunks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of --seq-len tokens")
    parser.add_argument("--from-correction", action="store_true",
                        help="start the adapter from each layer's low-rank correction instead of zero (needs a checkpoint "
                             "compressed with a rank: the default one has none, and a warning says so)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/sqlora_hf/smollm2-135m-fp32"),
                        help="where the uncompressed checkpoint is written once")
    parser.add_argument("--compressed", default=os.path.expanduser("~/.cache/sqlora_hf/smollm2-135m-sqlora-default"),
                        help="the compressed checkpoint, made once here (SQLoRAConfig() defaults) and reused")
    parser.add_argument("--out", default=None, help="where to save the merged model (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)

    directory = save_smollm2(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    train_ids, held_out = split_tokens(tokenizer)
    print(f"text: {len(train_ids)} training tokens, {len(held_out)} held-out tokens (CPython docs)")

    if not os.path.exists(os.path.join(args.compressed, "config.json")):
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                     quantization_config=SQLoRAConfig())
        print(f"compressed in {time.perf_counter() - start:.0f} s; saved to {args.compressed} for the next run")
        model.save_pretrained(args.compressed)
    model = AutoModelForCausalLM.from_pretrained(args.compressed)  # packed weights only
    print(f"compressed model: {sqlora_hf.report(model)['compressed_layers']} compressed layers")
    ppl_before = perplexity(model, held_out, args.seq_len, args.eval_windows)

    # Gradient checkpointing by hand: PEFT's prepare_model_for_kbit_training does not know "sqlora".
    sqlora_hf.peft_integration.gradient_checkpointing_recipe(model)
    config = sqlora_hf.lora_config(model, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                   target_modules="all-linear", init_from_correction=args.from_correction)
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()

    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=os.path.join(scratch, "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=min(20, args.steps // 10),
            logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], use_cpu=True,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, seed=0,
        )
        trainer = Trainer(model=peft_model, args=training, train_dataset=blocks(train_ids, args.seq_len))
        result = trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peft_model.eval()
    ppl_after = perplexity(peft_model, held_out, args.seq_len, args.eval_windows)

    probe = held_out[: args.seq_len].unsqueeze(0)
    with torch.no_grad():
        adapter_logits = peft_model(probe).logits
    merged = sqlora_hf.merge_and_unload(peft_model)  # exact: adapter folded into lowrank_l / lowrank_r
    with torch.no_grad():
        merged_logits = merged(probe).logits
    merge_error = float((merged_logits - adapter_logits).norm() / adapter_logits.norm())

    out = args.out or tempfile.mkdtemp(prefix="smollm2-sqlora-finetuned-")
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # an ordinary sqlora checkpoint
    with torch.no_grad():
        reloaded_logits = reloaded(probe).logits
    ranks = sorted({m.rank for m in reloaded.modules() if isinstance(m, SQLoRALinear)})

    print()
    print(f"training: {result.global_step} steps in {result.metrics['train_runtime']:.0f} s, "
          f"loss {losses[0]:.3f} (first log) -> {losses[-1]:.3f} (last log)")
    print(f"held-out perplexity: {ppl_before:.3f} before -> {ppl_after:.3f} after "
          f"(loss {math.log(ppl_before):.3f} -> {math.log(ppl_after):.3f})")
    print(f"merge: relative logit change {merge_error:.2e}; merged layer ranks now {ranks}")
    print(f"saved to {out}; reloaded logits identical: {torch.equal(reloaded_logits, merged_logits)}")


if __name__ == "__main__":
    main()
