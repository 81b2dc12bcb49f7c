"""GPU benchmark of the packed kernels (issue 6): packed layer vs torch fp16 `F.linear`, same run.

    python benchmarks/kernels_cuda.py [--backend triton] [--json out.json]
    python benchmarks/kernels.py --device cuda ...        (delegates here)

For each shape (N, K) ∈ {(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)}, each format option
and each batch in {1, 4, 16, 64, 256} it prints the median time of the packed layer, of fp16
`F.linear`, their ratio (>1 = packed is faster), and the packed layer's achieved GB/s against the
GPU's peak bandwidth. Weights rotate through enough copies to exceed the L2 cache, so every call
streams its weights from HBM as in a real model (one hot matrix would sit in the 50 MB L2).
Weights are random but format-valid (random codes, scales and 4:8 masks): timing does not depend
on the values. Needs a CUDA device; exits with a message otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Optional

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
BATCHES = [1, 4, 16, 64, 256]
# (label, bits, group size, sparsity)
OPTIONS = [("4-bit g64", 4, 64, None), ("4-bit g128", 4, 128, None), ("4-bit 4:8 g64", 4, 64, "4:8"),
           ("3-bit g64", 3, 64, None), ("8-bit g64", 8, 64, None)]
TARGETS = "H100 targets: 4-bit dense b1 >= 3x, 4:8 b1 >= 3.5x, b16 >= 2x, b256 >= 0.9x fp16"
# Peak HBM bandwidth (GB/s) by device-name fragment, used when torch does not report clocks.
KNOWN_BANDWIDTH = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555,
                   "L40S": 864, "A10": 600, "4090": 1008}
ROTATE_BYTES = 256 << 20


def peak_bandwidth_gbs(props) -> Optional[float]:
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for fragment, gbs in KNOWN_BANDWIDTH.items():
        if fragment in props.name:
            return float(gbs)
    return None


def random_layer(n: int, k: int, bits: int, group: int, sparsity: Optional[str], device, backend: str):
    """A format-valid packed layer with random contents, built directly on `device`."""
    from sqlora_hf.formats import PackedLayer, pack_codes, pack_mask
    from sqlora_hf.nn.linear import SQLoRALinear

    kc = k // 2 if sparsity else k
    if bits == 8:
        codes = torch.randint(-127, 128, (n, kc), device=device, dtype=torch.int8)
    else:
        codes = torch.randint(0, 1 << bits, (n, kc), device=device, dtype=torch.int32)
    qcodes = pack_codes(codes, bits)
    qscales = (torch.rand(n, k // group, device=device) * 0.02 + 0.01).to(torch.float16)
    qmask = None
    if sparsity:  # keep the 4 (4:8) columns with the largest random scores of every 8
        span = 8 if sparsity == "4:8" else 4
        scores = torch.rand(n, k // span, span, device=device)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(-1, scores.topk(span // 2, dim=-1).indices, True)
        qmask = pack_mask(keep.reshape(n, k))
    meta = PackedLayer.make_meta(bits, group, sparsity, n, k, 0).to(device)
    layer = SQLoRALinear(k, n, bias=False, backend=backend)
    layer.set_packed(PackedLayer(meta, qcodes, qscales, qmask))
    return layer


def time_calls(fn, copies: int, reps: int) -> float:
    """Median milliseconds of one eager `fn(i)` (host overhead included), i cycling through `copies`
    weight copies. Every copy is called once first: the first call of a layer builds its kernel
    constants (and the first call of a shape runs Triton's autotuner), which is not steady state."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for rep in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(rep % copies)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(fn, copies: int, reps: int) -> Optional[float]:
    """Milliseconds per call of `fn(i)` replayed from a CUDA graph over all copies: the device time
    without Python and launch overhead (what a graph-captured or compiled decode loop sees).
    None when the call cannot be captured."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(copies):
                fn(i)
    except Exception as exc:  # noqa: BLE001  (report, do not abort the table)
        print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(3, reps // 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / copies)
    return statistics.median(times)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Packed GPU kernels vs torch fp16 F.linear")
    parser.add_argument("--backend", default="triton", help="kernel backend to time (triton, cuda, auto)")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--shapes", nargs="+", default=None, help="NxK, e.g. 4096x4096")
    parser.add_argument("--options", nargs="+", default=None, help=f"subset of {[o[0] for o in OPTIONS]}")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="override the GPU's peak GB/s")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph (device time) columns")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # accepted for delegation
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/kernels_cuda.py needs a CUDA GPU and torch with CUDA; none is available here "
              f"(torch {torch.__version__}). Run it on a GPU machine.", file=sys.stderr)
        return 2
    import sqlora_hf  # noqa: F401  (registers backends)
    from sqlora_hf import kernels

    if args.backend != "auto" and args.backend not in kernels.backend_names():
        print(f"backend {args.backend!r} is not available; registered: {kernels.backend_names()}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    peak = args.bandwidth_gbs or peak_bandwidth_gbs(props)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    options = [o for o in OPTIONS if args.options is None or o[0] in args.options]
    print(f"device: {props.name}, peak bandwidth {peak or '?'} GB/s, torch {torch.__version__}, backend {args.backend}")
    print(TARGETS)
    header = (f"{'N x K':>12} {'option':>14} {'batch':>5} {'packed ms':>10} {'fp16 ms':>9} {'speedup':>8} "
              f"{'graph ms':>9} {'fp16 gr':>8} {'gr spd':>7} {'GB/s':>7} {'% peak':>7}")
    print("eager = one call timed with host overhead; graph = CUDA-graph replay (device time only); "
          "GB/s and % peak from the graph time")
    print(header)
    rows = []
    with torch.no_grad():
        for n, k in shapes:
            fp16_copies = max(1, math.ceil(ROTATE_BYTES / (n * k * 2)))
            dense = [torch.randn(n, k, device=device, dtype=torch.float16) for _ in range(fp16_copies)]
            for label, bits, group, sparsity in options:
                probe = random_layer(n, k, bits, group, sparsity, device, args.backend)
                copies = max(1, math.ceil(ROTATE_BYTES / probe.storage_bytes()))
                layers = [probe] + [random_layer(n, k, bits, group, sparsity, device, args.backend)
                                    for _ in range(copies - 1)]
                for batch in args.batches:
                    x = torch.randn(batch, k, device=device, dtype=torch.float16)
                    packed_ms = time_calls(lambda i: layers[i](x), copies, args.reps)
                    fp16_ms = time_calls(lambda i: F.linear(x, dense[i]), fp16_copies, args.reps)
                    graph_ms = fp16_graph_ms = None
                    if not args.no_graph:
                        graph_ms = time_graph(lambda i: layers[i](x), copies, args.reps)
                        fp16_graph_ms = time_graph(lambda i: F.linear(x, dense[i]), fp16_copies, args.reps)
                    moved = probe.storage_bytes() + x.numel() * 2 + batch * n * 2
                    gbs = moved / ((graph_ms or packed_ms) * 1e-3) / 1e9
                    graph_speedup = fp16_graph_ms / graph_ms if graph_ms and fp16_graph_ms else None
                    row = dict(device=props.name, backend=args.backend, n=n, k=k, option=label, batch=batch,
                               packed_ms=packed_ms, fp16_ms=fp16_ms, speedup=fp16_ms / packed_ms,
                               graph_ms=graph_ms, fp16_graph_ms=fp16_graph_ms, graph_speedup=graph_speedup,
                               gbs=gbs, peak_gbs=peak, pct_peak=100 * gbs / peak if peak else None)
                    rows.append(row)
                    pct = f"{row['pct_peak']:.0f}" if peak else "?"
                    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
                    print(f"{f'{n}x{k}':>12} {label:>14} {batch:>5} {packed_ms:>10.4f} {fp16_ms:>9.4f} "
                          f"{row['speedup']:>7.2f}x {fmt(graph_ms, '>9.4f'):>9} {fmt(fp16_graph_ms, '>8.4f'):>8} "
                          f"{fmt(graph_speedup, '>6.2f'):>6}x {gbs:>7.0f} {pct:>7}")
                del layers, probe
            del dense
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "peak_gbs": peak, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
