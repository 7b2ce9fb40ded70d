#!/usr/bin/env bash
# For a GPU machine whose Python already has torch and Triton (no venv, no network): builds fastattn for the
# visible GPU, runs the test suite (GPU backends included) and the benchmarks, with every log under OUT.
#
#   bash scripts/gpu.sh [build|test|bench|all] [OUT]      (default: all, OUT=$OUT or /tmp/fastattn-gpu)
#
# Stages can run as separate commands (each under a time limit); `build` must come first on a fresh machine.
# PYTHON picks the interpreter (default python3); MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

stage=${1:-all}
out=${2:-${OUT:-/tmp/fastattn-gpu}}
python=${PYTHON:-python3}
mkdir -p "$out"

build() {
  MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTATTN_REQUIRE_EXTENSION=1 \
    "$python" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
    || { tail -60 "$out/build.log"; return 1; }
  "$python" -m fastattn.info | tee "$out/info.txt"
}

tests() {
  FASTATTN_EXPECT_CUDA=1 "$python" -m pytest -q 2>&1 | tee "$out/tests.log" | tail -40
  return "${PIPESTATUS[0]}"
}

benchmarks() {
  "$python" -m bench --out "$out/bench" 2>"$out/bench.stderr.log" | tee "$out/bench.log"
}

case "$stage" in
  build) step "build" build ;;
  test) step "tests" tests ;;
  bench) step "benchmarks" benchmarks ;;
  all)  # the benchmarks run even when a test fails; the exit status is the tests'
    step "build" build
    set +e
    step "tests" tests
    status=$?
    set -e
    step "benchmarks" benchmarks
    exit "$status" ;;
  *) echo "usage: bash scripts/gpu.sh [build|test|bench|all] [OUT]" >&2; exit 2 ;;
esac
