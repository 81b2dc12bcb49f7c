"""CPU kernel benchmark: packed sqlora "cpu" kernels vs torch F.linear (fp32, bf16), plus end-to-end decode.

Per layer shape and batch, weights are rotated through more memory than the cache holds (as a
model's layers would be), with 1 and 2 threads; the bandwidth roofline (a streaming read of the same
rotation set) is measured in the same run, so every ratio is side by side. Timings on a shared
machine are noisy: every configuration of one shape, batch and thread count is timed once per
repetition, interleaved, and each ratio is the median of the per-repetition ratios; read the
ratios, not the absolute numbers.

    python benchmarks/kernels.py [--quick] [--json PATH] [--no-e2e]
    python benchmarks/kernels.py --device cuda ...   # delegates to benchmarks/kernels_cuda.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# Python puts this folder first on sys.path, where benchmarks/kernels.py would shadow the `kernels`
# package that transformers imports (its hub-kernels integration): take the folder off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 4, 16, 64]
# (bits, group, sparsity, format version): version 2 (bfloat16 NF levels, what compression writes) and,
# for comparison, version 1's float32 levels (the 4-byte-plane lookup); the 3-, 8- and 2-bit layers a
# memory budget gives some layers (NF3 is most of a 3.25 bpw model)
FORMATS = [(4, 64, None, 2), (4, 64, None, 1), (4, 64, "4:8", 2), (3, 64, None, 2), (8, 64, None, 2), (2, 64, None, 2)]


def random_packed(n: int, k: int, bits: int, group: int, sparsity, version: int, gen: torch.Generator) -> dict:
    """Random but valid kernel inputs for one layer (codes are arbitrary bytes; masks keep 4 of 8)."""
    n_stored = k // 2 if sparsity else k
    row_bytes = n_stored if bits == 8 else n_stored // 32 * 4 * bits
    codes = torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // group, generator=gen) * 0.1
    mask = None
    if sparsity:
        keep = torch.rand(n, k // 8, 8, generator=gen).argsort(-1)[..., :4]
        bits_kept = torch.zeros(n, k // 8, 8, dtype=torch.int32).scatter_(-1, keep, 1)
        mask = (bits_kept << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
    from sqlora_hf.formats.codebooks import codebook_for_bits, nf_table

    lut = nf_table(bits, codebook=codebook_for_bits(bits, version)) if bits != 8 else torch.zeros(1)
    return dict(codes=codes, scales=scales, mask=mask, lut=lut,
                bits=bits, group=group, sparsity={None: 0, "2:4": 1, "4:8": 2}[sparsity], n=n)


def packed_bytes(p: dict) -> int:
    """Bytes a call reads: codes, scales (fp32 in memory: the layer's kernel cache widens the stored fp16
    once), mask."""
    return p["codes"].numel() + 4 * p["scales"].numel() + (0 if p["mask"] is None else p["mask"].numel())


def time_rotating(fn, items: list, reps: int) -> float:
    """Median seconds per call, cycling through `items` so each call reads cold weights."""
    fn(items[0])
    times = []
    for r in range(reps):
        item = items[r % len(items)]
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copies_for(nbytes: int, rotate_bytes: int) -> int:
    return max(2, -(-rotate_bytes // nbytes))


def time_interleaved(calls: dict, reps: int) -> dict:
    """Seconds per call of every entry of `calls` ({name: (fn, items)}), repetition by repetition.

    Each repetition times one call of every entry back to back (each on its next cold item), so a
    burst of a neighbour's load or of host CPU steal hits all entries of that repetition alike; ratios
    are then taken per repetition (`median_ratio`)."""
    for fn, items in calls.values():
        fn(items[0])
    times = {name: [] for name in calls}
    # Entries may share one list of copies (a format's variants): every call takes the list's next copy,
    # so no call reads weights the call before it just brought into the cache.
    # The order rotates by one entry per repetition, so every entry takes every position (and follows every
    # neighbour, the large streaming F.linear calls included) equally often: with a fixed order, three
    # identical entries timed 0-9 % apart by position (2026-12-07; part of that was which library copy loaded
    # first, which a one-library run does not have).
    taken = {}
    names = list(calls)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, items = calls[name]
            taken[id(items)] = taken.get(id(items), 0) + 1
            item = items[taken[id(items)] % len(items)]
            t0 = time.perf_counter()
            fn(item)
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(num: list, den: list) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def bench_layers(args) -> list[dict]:
    from sqlora_hf.kernels.cpu import library, ops
    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    batches = [1, 16] if args.quick else BATCHES
    reps = 9 if args.quick else 21
    for n, k in shapes:
        w32 = [torch.randn(n, k, generator=gen) for _ in range(copies_for(n * k * 4, args.rotate_mb << 20))]
        w16 = [w.to(torch.bfloat16) for w in w32[: copies_for(n * k * 2, args.rotate_mb << 20)]]
        packs = {}
        for fmt in FORMATS:
            one = random_packed(n, k, *fmt, gen)
            packs[fmt] = [one] + [random_packed(n, k, *fmt, gen)
                                  for _ in range(copies_for(packed_bytes(one), args.rotate_mb << 20) - 1)]
            for p in packs[fmt]:
                p["described"] = ops.describe(p["codes"], p["scales"], p["mask"], p["lut"], None, None, None,
                                              n, k, p["bits"], p["group"], p["sparsity"])
        # written memory: the pages of a never-touched torch.empty all map the kernel's zero page, and a
        # sum over them measures the cache, not DRAM
        stream = torch.ones((args.rotate_mb << 20) // 4)
        for threads in args.threads:
            torch.set_num_threads(threads)
            os.environ["SQLORA_CPU_THREADS"] = str(threads)
            t = time_rotating(lambda s: s.sum(), [stream], 5)
            roof_gbs = stream.numel() * 4 / t / 1e9
            for m in batches:
                x = torch.randn(m, k, generator=gen)
                xb = x.to(torch.bfloat16)
                calls = {"fp32": (lambda w: F.linear(x, w), w32), "bf16": (lambda w: F.linear(xb, w), w16)}
                for fmt, items in packs.items():
                    variants = [("", None)]
                    if args.int_act and m == 1 and fmt[2] is None and fmt[0] == 4 and fmt[3] == 2:
                        variants += [(" int-act12", "1"), (" int-act8", "8")]
                    if fmt[2] is None and fmt[0] == 4 and fmt[3] == 2:
                        variants += [(" bf16 x", "bf16")]  # a bf16 model's call: the vdpbf16ps kernels where present
                        if m == 1:  # the exact fp32 row beside the default (x split into two bf16 terms)
                            variants += [(" exact", "exact")]
                    for suffix, flag in variants:
                        def call(p, flag=flag):
                            # what SQLoRALinear's eager forward runs: the layer described once (its
                            # kernel cache), then one C call; torch.ops.sqlora_cpu.linear re-validates
                            # every buffer per call (~50 µs), which only tracing and torch.compile pay
                            if flag == "bf16":  # CPUBackend.linear on a bf16 tensor: to fp32 and back included
                                return ops.run_flat(p["described"], xb.float(), bf16_x=True).to(torch.bfloat16)
                            var = "SQLORA_CPU_EXACT" if flag == "exact" else "SQLORA_CPU_INT_ACT"
                            if flag:
                                os.environ[var] = "1" if flag == "exact" else flag
                            try:
                                return ops.run_flat(p["described"], x)
                            finally:
                                os.environ.pop(var, None)
                        calls[(fmt, suffix)] = (call, items)
                times = time_interleaved(calls, reps)
                for key, (_, items) in calls.items():
                    if key in ("fp32", "bf16"):
                        continue
                    record(rows, n, k, m, threads, key[0], key[1], times[key], items, roof_gbs, times["fp32"],
                           times["bf16"], library)
        del w32, w16, packs, stream
    return rows


def record(rows, n, k, m, threads, fmt, suffix, tq, items, roof_gbs, t32, t16, library) -> None:
    """One table row; `tq`, `t32`, `t16`: per-repetition seconds from `time_interleaved`."""
    nbytes = packed_bytes(items[0])
    ms = statistics.median(tq)
    rows.append(dict(
        shape=f"{n}x{k}", batch=m, threads=threads,
        format=f"{fmt[0]}-bit g{fmt[1]} {fmt[2] or 'dense'}{' (v1 levels)' if fmt[3] == 1 else ''}{suffix}",
        isa=library.selected_isa(), ms=ms * 1e3, gbs=nbytes / ms / 1e9,
        roofline_gbs=roof_gbs, roofline_frac=(nbytes / ms / 1e9) / roof_gbs,
        fp32_ms=statistics.median(t32) * 1e3, bf16_ms=statistics.median(t16) * 1e3,
        vs_fp32=median_ratio(t32, tq), vs_bf16=median_ratio(t16, tq),
    ))
    r = rows[-1]
    print(f"{r['shape']:>11} M={m:<3} t={threads} {r['format']:<26} {r['ms']:8.2f} ms "
          f"{r['gbs']:6.1f} GB/s ({100 * r['roofline_frac']:3.0f}% of {roof_gbs:.1f}) "
          f"fp32 {r['fp32_ms']:8.2f} ms x{r['vs_fp32']:.2f}  bf16 {r['bf16_ms']:8.2f} ms x{r['vs_bf16']:.2f}",
          flush=True)


def bench_decode(args) -> dict:
    """Greedy decode tokens/s of SmolLM2-135M compressed (backend "cpu") vs uncompressed fp32.

    Compressed three times: the default (output head left in fp32, as in every peer; also timed with
    SQLORA_CPU_EXACT=1, the exact fp32 kernels in place of x split into two bf16 terms), `head_bits=8`
    (the tied head/embedding packed as int8 rows, docs/benchmarks.md), and `memory_budget="3.25bpw"`
    (mostly NF3 layers: the 3-bit kernels).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqlora_hf import SQLoRAConfig
    from sqlora_hf.evaluation import save_smollm2

    directory = os.path.join(tempfile.gettempdir(), "sqlora_bench_smollm2")
    save_smollm2(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok("The quick brown fox jumps over the lazy dog. Once upon a time", return_tensors="pt").input_ids
    torch.set_num_threads(args.decode_threads)
    os.environ["SQLORA_CPU_THREADS"] = str(args.decode_threads)
    fp32 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    packed = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                  quantization_config=SQLoRAConfig(backend="cpu")).eval()
    head8 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 quantization_config=SQLoRAConfig(backend="cpu", head_bits=8)).eval()
    budget325 = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, quantization_config=SQLoRAConfig(backend="cpu", memory_budget="3.25bpw")).eval()
    # (label, model, environment variable and value set for its calls, or None)
    int_act = "SQLORA_CPU_INT_ACT"
    runs = [("fp32", fp32, None), ("sqlora-cpu", packed, None), ("sqlora-cpu-exact", packed, ("SQLORA_CPU_EXACT", "1")),
            ("sqlora-cpu-head8", head8, None), ("sqlora-cpu-3.25bpw", budget325, None)]
    if args.int_act:
        runs += [("sqlora-cpu-int-act", packed, (int_act, "1")), ("sqlora-cpu-head8-int-act", head8, (int_act, "1")),
                 ("sqlora-cpu-int-act8", packed, (int_act, "8")), ("sqlora-cpu-head8-int-act8", head8, (int_act, "8"))]
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    times = {label: [] for label, _, _ in runs}
    cpu_times = {label: [] for label, _, _ in runs}
    # Interleaved repetitions, median per configuration: on a shared machine a neighbour's burst then
    # hits every configuration alike instead of one whole run.
    for rep in range(args.decode_reps):
        for label, model, flag in runs:
            if flag:
                os.environ[flag[0]] = flag[1]
            try:
                with torch.no_grad():
                    if rep == 0:
                        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
                    t0, c0 = time.perf_counter(), time.process_time()
                    model.generate(ids, **gen_kw)
                    times[label].append(time.perf_counter() - t0)
                    cpu_times[label].append(time.process_time() - c0)
            finally:
                if flag:
                    os.environ.pop(flag[0], None)
    out = {}
    for label, _, _ in runs:
        out[label] = args.new_tokens / statistics.median(times[label])
        # CPU seconds of this process: with one thread, the work done, whatever a neighbour's load
        out[label + "_per_cpu_s"] = args.new_tokens / statistics.median(cpu_times[label])
        print(f"decode {label:<18} {out[label]:7.1f} tokens/s wall, {out[label + '_per_cpu_s']:7.1f} per CPU-second "
              f"(median of {args.decode_reps}, {args.new_tokens} new tokens)", flush=True)
    # Prefill: one forward over a prompt of `--prefill-tokens` tokens of real text (batches of that many
    # rows: the large-batch path of docs/kernels_cpu.md), exact configurations only, interleaved.
    from sqlora_hf.evaluation import reference_text

    prompt = tok(reference_text(20000), return_tensors="pt").input_ids[:, : args.prefill_tokens]
    exact = [(label, model) for label, model, flag in runs if not flag]
    pre = {label: [] for label, _ in exact}
    with torch.no_grad():
        for rep in range(args.decode_reps + 1):
            for label, model in exact:
                t0 = time.perf_counter()
                model(prompt, use_cache=False)
                if rep:  # the first repetition warms up
                    pre[label].append(time.perf_counter() - t0)
    for label, _ in exact:
        out["prefill_" + label + "_ms"] = 1e3 * statistics.median(pre[label])
    del fp32, packed, head8, budget325
    for label, _, _ in runs[1:]:
        key = "speedup" + label[len("sqlora-cpu"):].replace("-", "_").replace(".", "_")
        out[key] = out[label] / out["fp32"]
        out[key + "_cpu_s"] = out[label + "_per_cpu_s"] / out["fp32_per_cpu_s"]
        print(f"decode speed-up {label} / fp32: x{out[key]:.2f} wall, x{out[key + '_cpu_s']:.2f} CPU time")
    for label, _ in exact:
        ms = out["prefill_" + label + "_ms"]
        print(f"prefill {prompt.shape[1]} tokens {label:<18} {ms:8.1f} ms "
              f"(x{out['prefill_fp32_ms'] / ms:.2f} the fp32 model's speed, median of {args.decode_reps})", flush=True)
    out.update(bench_prefill_bf16(args, directory, tok))
    return out


def bench_prefill_bf16(args, directory: str, tok) -> dict:
    """Prefill of SmolLM2 loaded in bfloat16, compressed vs not: the compressed model's 4-bit layers get
    bf16 activations, which the vdpbf16ps kernel takes on AVX-512 BF16 CPUs (docs/kernels_cpu.md)."""
    from transformers import AutoModelForCausalLM

    from sqlora_hf import SQLoRAConfig
    from sqlora_hf.evaluation import reference_text
    from sqlora_hf.kernels.cpu import ops

    bf16 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    packed = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                  quantization_config=SQLoRAConfig(backend="cpu")).eval()
    text = tok(reference_text(20000), return_tensors="pt").input_ids
    out = {"prefill_bf16_kernel": ops.bf16_kernel_available()}
    for n in sorted({16, 64, args.prefill_tokens}):
        prompt = text[:, :n]
        t = {"bf16": [], "sqlora-cpu-bf16": []}
        with torch.no_grad():
            for rep in range(args.decode_reps + 1):
                for label, model in (("bf16", bf16), ("sqlora-cpu-bf16", packed)):
                    t0 = time.perf_counter()
                    model(prompt, use_cache=False)
                    if rep:
                        t[label].append(time.perf_counter() - t0)
        a, b = statistics.median(t["bf16"]) * 1e3, statistics.median(t["sqlora-cpu-bf16"]) * 1e3
        out[f"prefill_bf16_{n}_ms"], out[f"prefill_sqlora_bf16_{n}_ms"] = a, b
        print(f"prefill {n} tokens, bf16 model {a:8.1f} ms, compressed bf16 model {b:8.1f} ms (x{a / b:.2f}; "
              f"bf16 kernel {'on' if out['prefill_bf16_kernel'] else 'not available'})", flush=True)
    return out


def int_act_perplexity(args) -> dict:
    """Perplexity cost of the opt-in integer-activation paths (SQLORA_CPU_INT_ACT=1 and =8) on SmolLM2-135M.

    That path only runs at batch 1, so perplexity is measured by teacher-forced token-by-token decoding
    (KV cache, one token per call) over `--ppl-windows` windows of `--ppl-context` tokens of
    `reference_text()`, for the same compressed model (default SQLoRAConfig, backend "cpu") with the
    exact path and with each integer path, and for the fp32 model with the same procedure.
    """
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqlora_hf import SQLoRAConfig
    from sqlora_hf.evaluation import reference_text, save_smollm2

    directory = os.path.join(tempfile.gettempdir(), "sqlora_bench_smollm2")
    save_smollm2(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok(reference_text(), return_tensors="pt").input_ids.reshape(-1)
    ctx, n_win = args.ppl_context, args.ppl_windows
    torch.set_num_threads(args.decode_threads)
    os.environ["SQLORA_CPU_THREADS"] = str(args.decode_threads)

    def stepwise_ppl(model) -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for w in range(n_win):
                window = ids[w * ctx:(w + 1) * ctx]
                past = None
                for i in range(ctx - 1):
                    out = model(window[i:i + 1].view(1, 1), past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    nll -= torch.log_softmax(out.logits[0, -1].float(), -1)[window[i + 1]].item()
                    count += 1
        return math.exp(nll / count)

    out = {}
    fp32 = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out["fp32"] = stepwise_ppl(fp32)
    del fp32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 quantization_config=SQLoRAConfig(backend="cpu")).eval()
    old = os.environ.pop("SQLORA_CPU_INT_ACT", None)
    out["sqlora_exact"] = stepwise_ppl(model)
    try:
        for key, flag in (("sqlora_int_act", "1"), ("sqlora_int_act8", "8")):
            os.environ["SQLORA_CPU_INT_ACT"] = flag
            out[key] = stepwise_ppl(model)
    finally:
        os.environ.pop("SQLORA_CPU_INT_ACT")
        if old is not None:
            os.environ["SQLORA_CPU_INT_ACT"] = old
    out["tokens"] = n_win * (ctx - 1)
    print(f"step-wise perplexity over {out['tokens']} tokens: fp32 {out['fp32']:.4f}, compressed exact "
          f"{out['sqlora_exact']:.4f}, + 12-bit activations {out['sqlora_int_act']:.4f} "
          f"(x{out['sqlora_int_act'] / out['sqlora_exact']:.4f} of exact), + 8-bit activations "
          f"{out['sqlora_int_act8']:.4f} (x{out['sqlora_int_act8'] / out['sqlora_exact']:.4f})", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="two shapes, batches 1 and 16, fewer repetitions")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rotate-mb", type=int, default=256, help="weight memory cycled through per config")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="threads for the decode benchmark (1: on a shared box, 2-thread barriers stall)")
    parser.add_argument("--prefill-tokens", type=int, default=256,
                        help="prompt length of the prefill measurement (one forward after the decode runs)")
    parser.add_argument("--decode-reps", type=int, default=3, help="interleaved decode repetitions (median)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer benchmark")
    parser.add_argument("--no-e2e", action="store_true", help="skip the SmolLM2 decode benchmark")
    parser.add_argument("--int-act", action="store_true",
                        help="also time the opt-in integer-activation paths (SQLORA_CPU_INT_ACT=1, =8) at batch 1 and in decode")
    parser.add_argument("--int-act-ppl", action="store_true",
                        help="measure the perplexity cost of SQLORA_CPU_INT_ACT=1 and =8 on SmolLM2 (token by token; slow)")
    parser.add_argument("--ppl-context", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=2)
    args, rest = parser.parse_known_args(argv)
    if args.device == "cuda":
        import importlib.util

        spec = importlib.util.spec_from_file_location("kernels_cuda", os.path.join(_HERE, "kernels_cuda.py"))
        kernels_cuda = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels_cuda)

        return kernels_cuda.main([a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--device", "cuda")])
    if rest:
        parser.error(f"unrecognized arguments: {rest}")
    import sqlora_hf.kernels.cpu  # noqa: F401  (registers the op)

    if args.quick:
        args.rotate_mb = min(args.rotate_mb, 128)
        args.new_tokens = min(args.new_tokens, 24)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "layers": [] if args.no_layers else bench_layers(args)}
    if not args.no_e2e:
        results["decode"] = bench_decode(args)
    if args.int_act_ppl:
        results["int_act_perplexity"] = int_act_perplexity(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
