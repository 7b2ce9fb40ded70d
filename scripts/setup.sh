#!/usr/bin/env bash
# Sets up a fresh machine for fastattn: a virtual environment in .venv with torch (a CUDA build, so the CUDA
# sources compile even without a GPU), Triton and the test/bench tools, then builds and installs fastattn.
# Re-running it is cheap when everything is already there. Sourced by scripts/test.sh and scripts/bench.sh.
#
#   PYTHON        the interpreter for the venv          (default: python3)
#   TORCH_SPEC    the torch requirement                 (default: torch==2.14.1, the CUDA 13 build)
#   FASTATTN_SKIP_CUDA=1 / FASTATTN_SKIP_EXTENSION=1    see setup.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/common.sh

venv() {
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
}

dependencies() {
  .venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.14.1}" triton setuptools wheel \
    ninja pybind11 numpy pytest hypothesis matplotlib tqdm scikit-learn "transformers>=5.18"
}

sources_hash() {  # what the build depends on, plus the switches that change it
  { cat setup.py pyproject.toml; find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \) \
      -not -path 'csrc/generated/*' | sort | xargs cat; env | grep -E '^(FASTATTN_SKIP|TORCH_CUDA_ARCH|CUDA_HOME)' || true; } \
    | sha256sum | cut -d' ' -f1
}

build() {
  local stamp=.venv/fastattn-build.stamp hash
  hash=$(sources_hash)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] && .venv/bin/python -c 'import fastattn' 2>/dev/null; then
    echo "sources unchanged since the last build: not rebuilding"
  else
    FASTATTN_REQUIRE_EXTENSION=${FASTATTN_REQUIRE_EXTENSION:-1} \
      .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
    echo "$hash" >"$stamp"
  fi
  .venv/bin/python -m fastattn.info
}

step "create .venv" venv
step "install torch, triton and tools" dependencies
step "build fastattn (C++ CPU and CUDA kernels)" build
