#!/usr/bin/env bash
# Compile the GPU kernels ahead of time for sm_80 and sm_90 without a GPU; fails on any compile error.
# Triton: every kernel variant (kernel x bits x sparsity x activation dtype) through triton.compile.
# CUDA C++: every csrc_cuda/*.cu through nvcc, when both exist (no .cu sources yet: skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

if python -c "import triton" 2>/dev/null; then
    export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
    python -m sqlora_hf.kernels.triton.aot --arch 80 90
else
    echo "ci_gpu_compile: the triton package is not installed (pip install triton)" >&2
    exit 1
fi

shopt -s nullglob
sources=(csrc_cuda/*.cu)
if (( ${#sources[@]} )); then
    if ! command -v nvcc >/dev/null; then
        echo "ci_gpu_compile: CUDA sources exist but nvcc is not on PATH" >&2
        exit 1
    fi
    out="$(mktemp -d)"
    for src in "${sources[@]}"; do
        for arch in sm_80 sm_90; do
            nvcc -O3 -cubin -arch="$arch" -Xptxas -warn-spills "$src" -o "$out/$(basename "$src" .cu).$arch.cubin"
            echo "nvcc $src $arch ok"
        done
    done
    rm -rf "$out"
fi
