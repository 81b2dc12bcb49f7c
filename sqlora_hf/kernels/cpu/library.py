"""Finding, building and loading the C library `csrc/sqlora_cpu.c` through ctypes.

The package build (setup.py) compiles it next to this file as `_sqlora_cpu*.so`. When that did not
happen (no compiler at install time, an editable install made before the library existed), and the
C source is reachable (a source checkout), it is compiled once into a cache directory at first use.
Any failure leaves `load()` returning None with `load_error()` saying why: the reference backend
keeps working.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
SOURCE_CANDIDATES = [HERE.parents[2] / "csrc" / "sqlora_cpu.c"]
ABI_VERSION = 6
ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 3, "dotprod": 4}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}
COMPILE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp"]

_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("SQLORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sqlora_hf")
    return Path(root)


def _built_next_to_package() -> Optional[Path]:
    hits = sorted(glob.glob(str(HERE / "_sqlora_cpu*.so")))
    return Path(hits[0]) if hits else None


def jit_build(source: Path) -> Path:
    """Compile `source` into the cache (keyed by its hash) and return the .so path."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"sqlora_cpu_{digest}.so"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) found to build the sqlora CPU kernels")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([cc, *COMPILE_FLAGS, str(source), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {source} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent process sees the whole file or none
    return target


def _dlopen_with_short_spin(path: Path) -> ctypes.CDLL:
    """Load the library with a short OpenMP spin-wait unless the user chose one.

    Our .so links the system libgomp, a second OpenMP runtime beside torch's bundled one. With the
    default long spin, its idle workers keep burning a core after each call and starve torch's
    threads (and ours) on small machines. libgomp reads the variable once, when it is loaded, so it is
    set only around this dlopen and restored afterwards.
    """
    had = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
    if not had:
        os.environ["GOMP_SPINCOUNT"] = "20000"
    try:
        return ctypes.CDLL(str(path))
    finally:
        if not had:
            os.environ.pop("GOMP_SPINCOUNT", None)


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sqlora_cpu_isa_supported.argtypes = [i32]
    lib.sqlora_cpu_isa_supported.restype = i32
    lib.sqlora_cpu_best_isa.restype = i32
    lib.sqlora_cpu_bf16_supported.restype = i32
    lib.sqlora_cpu_bf16_supported.argtypes = []
    lib.sqlora_cpu_abi_version.restype = i32
    lib.sqlora_cpu_linear.restype = i32
    lib.sqlora_cpu_linear.argtypes = [
        i32, i32, vp, i64, i64, i64,  # isa, threads, x, M, N, K
        i32, i32, i32,  # bits, group, sparsity
        vp, i64, vp, i64,  # codes, len, scales, len
        vp, i64, vp, i64,  # mask, len, lut, len
        vp, vp, i64, i64, i64,  # L, R, rank, L_len, R_len
        vp, i64, vp,  # bias, len, y
    ]
    lib.sqlora_cpu_linear_desc.restype = i32
    lib.sqlora_cpu_linear_desc.argtypes = [vp, i32, i32, i32, vp, i64, vp]  # desc, isa, flags, threads, x, M, y
    lib.sqlora_cpu_dequantize_rows_desc.restype = i32
    lib.sqlora_cpu_dequantize_rows_desc.argtypes = [vp, i32, i32, i64, i64, vp]  # desc, isa, threads, n0, n1, w
    lib.sqlora_gptq_columns.restype = i32
    lib.sqlora_gptq_columns.argtypes = [
        i32, i64, i64, i64, i64, vp, i64,  # threads, nb, c0, c1, N, w, ld
        vp, i64, vp, i64, i32,  # hinv, ldh, scale, scale_ld, bits
        vp, vp, vp, vp, vp,  # levels, mids, codes, q, err
    ]
    lib.sqlora_cd_columns.restype = i32
    lib.sqlora_cd_columns.argtypes = [
        i32, i64, i64, vp, vp, vp, i64,  # threads, nb, N, w, e, g, ld
        vp, i64, vp, vp, i32,  # h, ldh, scale, keep, bits
        vp, vp, vp, vp,  # levels, mids, codes, delta
    ]
    lib.sqlora_nearest_codes.restype = i32
    lib.sqlora_nearest_codes.argtypes = [i32, i64, vp, i32, vp, vp]  # threads, n, x, n_mids, mids, codes
    lib.sqlora_scale_errors.restype = i32
    lib.sqlora_scale_errors.argtypes = [
        i32, i64, i64, vp, i64, vp, i32,  # threads, n_groups, g, v, n_cand, scales, bits
        vp, vp, vp, vp, vp,  # levels, mids, err, vc, cc
    ]


def load() -> Optional[ctypes.CDLL]:
    """The loaded library, or None (see `load_error()`)."""
    global _lib, _error, _tried
    if _tried:
        return _lib
    _tried = True
    try:
        path = _built_next_to_package()
        source = next((s for s in SOURCE_CANDIDATES if s.exists()), None)
        # In a source checkout, a build older than csrc/ (edited since `pip install -e .`) is stale.
        if path is None or (source is not None and source.stat().st_mtime > path.stat().st_mtime):
            if source is None:
                raise RuntimeError("the sqlora CPU library was not built at install time and csrc/ is not available")
            path = jit_build(source)
        lib = _dlopen_with_short_spin(path)
        _declare(lib)
        if lib.sqlora_cpu_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path} has ABI {lib.sqlora_cpu_abi_version()}, expected {ABI_VERSION}")
        _lib = lib
    except Exception as exc:  # the reference backend must keep working
        _error = f"{type(exc).__name__}: {exc}"
        _lib = None
    return _lib


def load_error() -> Optional[str]:
    return _error


def supported_isas() -> list[str]:
    lib = load()
    return [] if lib is None else [n for n, c in ISA_CODES.items() if lib.sqlora_cpu_isa_supported(c)]


_best: Optional[str] = None


def selected_isa() -> str:
    """The path the next call runs: `SQLORA_CPU_ISA` if set (must be supported), else the best one."""
    global _best
    forced = os.environ.get("SQLORA_CPU_ISA", "").strip().lower()
    if (not forced or forced == "auto") and _best is not None:
        return _best  # the per-call fast path: the CPU does not change
    lib = load()
    if lib is None:
        raise RuntimeError(f"sqlora CPU kernels are not available: {load_error()}")
    if not forced or forced == "auto":
        _best = ISA_NAMES[lib.sqlora_cpu_best_isa()]
        return _best
    if forced not in ISA_CODES:
        raise ValueError(f"SQLORA_CPU_ISA must be one of {['auto', *ISA_CODES]}, got {forced!r}")
    if not lib.sqlora_cpu_isa_supported(ISA_CODES[forced]):
        raise RuntimeError(f"SQLORA_CPU_ISA={forced} is not supported on this CPU (supported: {supported_isas()})")
    return forced
