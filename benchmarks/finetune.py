"""LoRA fine-tuning of SmolLM2-135M: compressed (sqlora) base vs uncompressed fp32 base.

    python benchmarks/finetune.py [--steps 20] [--json out.json]

Each configuration runs in its own fresh process, so its peak resident memory (`ru_maxrss`) is its
own: load the model, add a LoRA adapter (same r, targets, batch, sequence length, learning rate and
data order for both), train `--steps` steps, then measure held-out perplexity. The compressed run
also merges the adapter (`sqlora_hf.merge_and_unload`) and reports the merge error (relative, fp32
logits) and whether codes/scales/masks stayed byte-identical. The compressed checkpoint is made once
and cached (`--cache`), so its process loads packed weights and never holds the fp32 model.
With `--init-from-correction` the compressed run starts its adapters from the layers' own low-rank
corrections (LoftQ-style; use a checkpoint that has corrections, e.g. `--compressed-dir` of a calibrated
compression with `rank=16`).

Text: the Python documentation topics shipped with CPython (`sqlora_hf.evaluation.reference_text`),
the first 90 % of tokens for training, the last 10 % held out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time

# Python puts this folder first on sys.path, where benchmarks/kernels.py would shadow the `kernels`
# package that transformers imports (its hub-kernels integration): take the folder off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

DEFAULT_CACHE = os.path.expanduser("~/.cache/sqlora_hf")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def token_splits(tokenizer, held_out_fraction: float = 0.1):
    """(train, held-out) 1-D token tensors of the reference text, split by position (no overlap)."""
    from sqlora_hf.evaluation import reference_text

    ids = tokenizer(reference_text(), return_tensors="pt").input_ids[0]
    cut = int(len(ids) * (1 - held_out_fraction))
    return ids[:cut], ids[cut:]


def train_batches(train_ids, steps: int, batch: int, seq_len: int, seed: int = 0):
    """`steps` batches of `batch` random windows of `seq_len` tokens, the same for every configuration."""
    import torch

    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train_ids) - seq_len, (steps, batch), generator=g)
    for row in starts:
        yield torch.stack([train_ids[s:s + seq_len] for s in row.tolist()])


def child(args) -> dict:
    """One configuration, in this (fresh) process; returns its measurements."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sqlora_hf
    from sqlora_hf.evaluation import perplexity

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.fp_dir)
    train_ids, held_out = token_splits(tokenizer)
    base_rss = rss_mib()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    targets = sqlora_hf.peft_integration.all_linear_names(model)
    config = sqlora_hf.lora_config(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                   init_from_correction=args.init_from_correction and args.child == "compressed")
    peft_model = get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    peft_model.eval()
    # The adapters start as a no-op: zero, or the correction moved out of the base.
    ppl_before = perplexity(peft_model, held_out, args.seq_len, args.eval_windows)
    peft_model.train()
    losses, start = [], None
    for step, ids in enumerate(train_batches(train_ids, args.steps + 1, args.batch, args.seq_len)):
        if step == 1:
            start = time.perf_counter()  # the first step (allocator warm-up) is not timed
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    steps_per_s = args.steps / (time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peft_model.eval()
    ppl = perplexity(peft_model, held_out, args.seq_len, args.eval_windows)
    out = {"label": args.child, "steps": args.steps, "steps_per_s": steps_per_s, "peak_rss_mib": peak_mib,
           "rss_before_model_mib": base_rss, "peak_over_baseline_mib": peak_mib - base_rss,
           "first_loss": losses[0], "last_loss": losses[-1], "held_out_ppl_before": ppl_before, "held_out_ppl": ppl}
    if args.child == "compressed":
        out.update(merge_check(peft_model, held_out[: args.seq_len].unsqueeze(0)))
    return out


def merge_check(peft_model, ids) -> dict:
    import torch

    import sqlora_hf
    from sqlora_hf import SQLoRALinear

    def packed(m):  # in module order: PEFT's wrapper renames the modules, the order stays
        return [getattr(mod, k).numpy().tobytes() for mod in m.modules() if isinstance(mod, SQLoRALinear)
                for k in ("qcodes", "qscales", "qmask") if getattr(mod, k) is not None]

    with torch.no_grad():
        unmerged = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
        before = packed(peft_model)
        merged = sqlora_hf.merge_and_unload(peft_model)
        after = merged(ids).logits
    return {"merge_rel_error": float((after - unmerged).norm() / unmerged.norm()),
            "adapter_effect_rel": float((unmerged - base).norm() / unmerged.norm()),
            "codes_scales_masks_identical": before == packed(merged), "packed_tensors": len(before)}


def prepare(cache: str) -> tuple[str, str]:
    """(fp32 dir, compressed dir), written once under `cache`."""
    import torch
    from transformers import AutoModelForCausalLM

    import sqlora_hf
    from sqlora_hf.evaluation import save_smollm2

    fp_dir = save_smollm2(os.path.join(cache, "smollm2-135m-fp32"))
    q_dir = os.path.join(cache, "smollm2-135m-sqlora-default")
    if not os.path.exists(os.path.join(q_dir, "config.json")):
        print(f"compressing SmolLM2 once into {q_dir} ...", flush=True)
        model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32,
                                                     quantization_config=sqlora_hf.SQLoRAConfig())
        model.save_pretrained(q_dir)
    return fp_dir, q_dir


def prepare_calibrated(cache: str, fp_dir: str, fields_json: str, samples: int = 128, seq_len: int = 512) -> str:
    """A calibrated compression of SmolLM2 (`SQLoRAConfig(**fields)` + `sqlora_hf.compress`), written once.

    Calibration text: `calibration_texts()` (the standard library's docstrings), disjoint from the
    training and held-out text. The directory name is a hash of the fields, so each base is made once.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sqlora_hf
    from sqlora_hf.evaluation import calibration_texts

    fields = json.loads(fields_json)
    if not isinstance(fields, dict):
        raise SystemExit(f"--calibrated must be a JSON object of SQLoRAConfig fields, got {fields_json!r}")
    key = hashlib.sha1(json.dumps([fields, samples, seq_len], sort_keys=True).encode()).hexdigest()[:10]
    q_dir = os.path.join(cache, f"smollm2-135m-sqlora-calibrated-{key}")
    if not os.path.exists(os.path.join(q_dir, "config.json")):
        config = sqlora_hf.SQLoRAConfig(**fields)
        config.calibration_samples, config.calibration_seq_len = samples, seq_len
        print(f"compressing SmolLM2 with {fields} and {samples} x {seq_len} calibration tokens into {q_dir} ...",
              flush=True)
        tokenizer = AutoTokenizer.from_pretrained(fp_dir)
        model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
        start = time.perf_counter()
        sqlora_hf.compress(model, config, calibration_texts(), tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        model.save_pretrained(q_dir)
        tokenizer.save_pretrained(q_dir)
        with open(os.path.join(q_dir, "sqlora_benchmark_base.json"), "w") as f:
            json.dump({"fields": fields, "samples": samples, "seq_len": seq_len, "seconds": seconds,
                       "bits_per_weight": sqlora_hf.report(model)["bits_per_weight"]}, f, indent=2)
    return q_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration (default 5)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16, help="LoRA r (alpha = 2r); all linear layers targeted")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep every block's activations (they then dominate memory for both runs)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="do not set MALLOC_ARENA_MAX=1 / MALLOC_MMAP_THRESHOLD_=131072 for the runs")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where the checkpoints are written once")
    parser.add_argument("--compressed-dir", default=None,
                        help="an existing sqlora checkpoint to fine-tune instead of the cached default "
                             "SQLoRAConfig() one (e.g. a calibrated compression saved with save_pretrained)")
    parser.add_argument("--calibrated", default=None, metavar="JSON",
                        help="compressed run: first compress SmolLM2 with calibration (128 x 512 tokens of the "
                             "standard library's docstrings) and these SQLoRAConfig fields, e.g. "
                             "'{\"rank\": 16, \"memory_budget\": null, \"head_bits\": 8}'; cached under --cache")
    parser.add_argument("--init-from-correction", action="store_true",
                        help="compressed run: start each adapter from the layer's own low-rank correction "
                             "(LoftQ-style; the fp32 run keeps PEFT's zero-initialised adapter)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", choices=["fp32", "compressed"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--fp-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    fp_dir, q_dir = prepare(args.cache)
    if args.calibrated and args.compressed_dir:
        sys.exit("give --calibrated or --compressed-dir, not both")
    if args.calibrated:
        q_dir = prepare_calibrated(args.cache, fp_dir, args.calibrated)
    q_dir = args.compressed_dir or q_dir
    results = []
    for label, directory in (("fp32", fp_dir), ("compressed", q_dir)):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", label, "--model-dir", directory,
               "--fp-dir", fp_dir, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--lr", str(args.lr),
               "--eval-windows", str(args.eval_windows), "--threads", str(args.threads)]
        if not args.gradient_checkpointing:
            cmd.append("--no-gradient-checkpointing")
        if args.init_from_correction:
            cmd.append("--init-from-correction")
        print(f"running {label} ...", flush=True)
        env = dict(os.environ)
        if not args.default_malloc:
            # glibc otherwise keeps freed transient buffers (per-thread arenas, a growing mmap threshold),
            # and peak RSS then measures fragmentation rather than what training needs. Same for both runs.
            env.update(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{label} run failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))

    fp, q = results
    summary = {
        "peak_rss_ratio": q["peak_rss_mib"] / fp["peak_rss_mib"],
        "peak_over_baseline_ratio": q["peak_over_baseline_mib"] / fp["peak_over_baseline_mib"],
        "steps_per_s_ratio": q["steps_per_s"] / fp["steps_per_s"],
        "held_out_ppl_ratio": q["held_out_ppl"] / fp["held_out_ppl"],
    }
    print(f"\nSmolLM2-135M, LoRA r={args.rank} on all linear layers, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.steps} steps, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.threads} threads (shared machine: timings are noisy)\n")
    print(f"compressed base: {q_dir}" + (" (adapters start from the layers' corrections)" if args.init_from_correction else ""))
    print(f"{'':<12}{'peak RSS MiB':>14}{'over baseline':>15}{'steps/s':>10}{'loss first→last':>20}"
          f"{'held-out ppl before→after':>28}")
    for r in results:
        print(f"{r['label']:<12}{r['peak_rss_mib']:>14.0f}{r['peak_over_baseline_mib']:>15.0f}{r['steps_per_s']:>10.3f}"
              f"{r['first_loss']:>11.3f}→{r['last_loss']:<8.3f}{r['held_out_ppl_before']:>18.3f}→{r['held_out_ppl']:<9.3f}")
    print(f"\ncompressed / fp32: peak RSS {summary['peak_rss_ratio']:.2f}, peak over baseline "
          f"{summary['peak_over_baseline_ratio']:.2f}, steps/s {summary['steps_per_s_ratio']:.2f}, "
          f"held-out ppl {summary['held_out_ppl_ratio']:.3f}")
    print(f"merge: relative logit error {q['merge_rel_error']:.2e} (adapter moved logits by "
          f"{q['adapter_effect_rel']:.2e}); codes/scales/masks byte-identical: {q['codes_scales_masks_identical']} "
          f"({q['packed_tensors']} tensors)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "compressed_dir": q_dir,
                   "args": {k: v for k, v in vars(args).items() if k not in ("child", "model_dir", "fp_dir")},
                       "runs": results, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
