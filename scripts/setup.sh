#!/usr/bin/env bash
# Create .venv and install instructkit with the CPU build of torch (a plain `torch` requirement
# would pull a multi-GB CUDA build). Usage: bash scripts/setup.sh [extras, e.g. dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # Pinned: on the project's CI machines this release lies on disk as a CPU build.
  python -m pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
