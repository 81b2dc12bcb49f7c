"""Calibrated compression of SmolLM2-135M: data-free vs GPTQ vs GPTQ+EoRA vs GPTQ-intrinsic LoRA.

    python3 benchmarks/calibrated.py [--quick] [--json out.json]

Calibration text and evaluation text are disjoint slices of `reference_text()` (the Python docs
shipped with CPython): evaluation uses the first 250k characters, calibration starts at 300k.
Reports bits per weight (everything counted), perplexity ratio to the fp32 model, compression time
and the peak resident memory growth of the compression step, measured side by side in one run.
Peak growth is read from the process's high-water mark, so it is only meaningful for the first row
of a run: use `--rows N` (one row per process) to measure it for each method.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

import sqlora_hf
from sqlora_hf import SQLoRAConfig
from sqlora_hf.evaluation import perplexity, reference_text, save_smollm2

ROWS = [
    # (label, bits, group, sparsity, rank, method or None for data-free)
    ("data-free RTN", 4, 64, None, 0, None),
    ("GPTQ", 4, 64, None, 0, "gptq"),
    ("GPTQ + EoRA r16", 4, 64, None, 16, "eora"),
    ("GPTQ-intrinsic r16", 4, 64, None, 16, "intrinsic"),
    ("data-free RTN 3-bit", 3, 64, None, 0, None),
    ("GPTQ 3-bit", 3, 64, None, 0, "gptq"),
    ("GPTQ + EoRA 3-bit r16", 3, 64, None, 16, "eora"),
    ("GPTQ-intrinsic 3-bit r16", 3, 64, None, 16, "intrinsic"),
    ("GPTQ-intrinsic 4:8 r16", 4, 64, "4:8", 16, "intrinsic"),
    ("GPTQ-intrinsic 2:4 r16", 4, 64, "2:4", 16, "intrinsic"),
    ("GPTQ-intrinsic 2-bit r16", 2, 64, None, 16, "intrinsic"),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 eval windows, 16 calibration samples of 256 tokens, 4-bit rows")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=100, help="evaluation windows of 512 tokens (>= 50k tokens at 100)")
    p.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/sqlora_hf/smollm2-135m-fp32"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.seq_len, args.windows = 16, 256, 8
    rows = ROWS if not args.quick else ROWS[:4]
    if args.rows:
        rows = [ROWS[int(i)] for i in args.rows.split(",")]

    directory = save_smollm2(args.cache)
    tok = AutoTokenizer.from_pretrained(directory)
    text = reference_text()
    eval_ids = tok(text[:250_000], return_tensors="pt").input_ids[0]
    calib_texts = [t for t in text[300_000:].split("\n\n") if len(t) > 100]
    fp = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    base = perplexity(fp, eval_ids, 512, args.windows)
    del fp
    print(f"fp32 perplexity {base:.3f} over {args.windows * 512} tokens; calibration {args.samples} x {args.seq_len}")
    results = []
    header = f"{'method':28}{'bpw':>8}{'ppl':>10}{'ratio':>8}{'time s':>9}{'peak +MB':>10}"
    print(header)
    for label, bits, group, sparsity, rank, method in rows:
        cfg = SQLoRAConfig(bits=bits, group_size=group, sparsity=sparsity, rank=rank, memory_budget=None)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        before = _rss_mb()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        start = time.perf_counter()
        if method is None:
            model.save_pretrained("/tmp/_sqlora_bench_fp")
            model = AutoModelForCausalLM.from_pretrained("/tmp/_sqlora_bench_fp", dtype=torch.float32, quantization_config=cfg)
        else:
            cfg.calibration_samples, cfg.calibration_seq_len, cfg.calibration_method = args.samples, args.seq_len, method
            sqlora_hf.compress(model, cfg, calib_texts, tokenizer=tok)
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        rep = sqlora_hf.report(model)
        ppl = perplexity(model, eval_ids, 512, args.windows)
        row = {"method": label, "bits_per_weight": rep["bits_per_weight"], "perplexity": ppl, "ratio": ppl / base,
               "seconds": elapsed, "peak_growth_mb": max(peak - max(before, peak_before), 0.0)}
        results.append(row)
        print(f"{label:28}{row['bits_per_weight']:8.3f}{ppl:10.3f}{row['ratio']:8.3f}{elapsed:9.1f}{row['peak_growth_mb']:10.0f}",
              flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fp32_perplexity": base, "windows": args.windows, "samples": args.samples,
                       "seq_len": args.seq_len, "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
