#!/usr/bin/env bash
# Set up (scripts/setup.sh, which also installs the offline test data), lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
