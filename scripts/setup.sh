#!/usr/bin/env bash
# Create .venv and install batchnorm with its development extras; where there is no internet
# (this project's machines), install Debian's Fashion-MNIST, which the loaders find on their own.
# TORCH_SPEC picks the torch build (default: the CPU wheel this project is tested with;
# on a GPU machine use e.g. TORCH_SPEC="torch" to get the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
# Hold torch at the build just installed: torchvision's newest release pins a newer torch, and
# without this pip would replace the CPU build with another.
TORCH_PIN=$(.venv/bin/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')
.venv/bin/python -m pip install -q -e ".[dev]" --constraint <(echo "$TORCH_PIN")
FASHION_DIR=/usr/share/datasets/fashion-mnist
if [ ! -d "$FASHION_DIR" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "note: dataset-fashion-mnist not installed; the loaders will download instead"
fi
.venv/bin/python -c "import batchnorm, torch; print(f'batchnorm {batchnorm.__version__} with torch {torch.__version__} ready in .venv')"
