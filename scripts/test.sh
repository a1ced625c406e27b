#!/usr/bin/env bash
# Set up .venv and run the test suite (pass pytest arguments through, e.g. -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
python -m pytest -q "$@"
