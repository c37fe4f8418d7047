#!/usr/bin/env bash
# Set up (scripts/setup.sh), fetch the test data available offline, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Fashion-MNIST for the data and experiment tests: Debian ships it (no internet needed).
FASHION_DIR=${BATCHNORM_TEST_FASHION_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -d "$FASHION_DIR" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "warning: could not install dataset-fashion-mnist; data tests will skip"
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
