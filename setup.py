"""Builds the optional C kernels (csrc/sqlora_cpu.c) during `pip install .` and `pip install -e .`.

Everything else about the package lives in pyproject.toml. The library is loaded with ctypes (it has
no Python or torch ABI dependency), so it is built as a plain extension file next to its loader. A
missing compiler or a failed build prints a clear message and the install still succeeds: the
reference backend works without it, and `sqlora_hf/kernels/cpu/library.py` retries a build into a
cache directory at first use when the source is at hand.
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing, OpenMP missing, ...
            sys.stderr.write(
                "\n*** sqlora_hf: building the CPU kernels (csrc/sqlora_cpu.c) failed: "
                f"{exc}\n*** The package is installed without them; the 'reference' backend still works.\n"
                "*** Install gcc (with OpenMP) and reinstall to get the fast 'cpu' backend.\n\n"
            )

    def get_export_symbols(self, ext):
        return []  # a ctypes library, not a Python module: no PyInit_ symbol to export


is_msvc = sys.platform == "win32"
cpu_kernels = Extension(
    "sqlora_hf.kernels.cpu._sqlora_cpu",
    sources=["csrc/sqlora_cpu.c"],
    extra_compile_args=[] if is_msvc else ["-O3", "-std=c11", "-fopenmp"],
    extra_link_args=[] if is_msvc else ["-fopenmp"],
    optional=True,
)

setup(ext_modules=[cpu_kernels], cmdclass={"build_ext": OptionalBuildExt})
