#!/usr/bin/env bash
# For a GPU machine whose Python already has torch and Triton (no venv, no network): builds fastattn for the
# visible GPU, runs the test suite (GPU backends included) and the benchmarks, with every log under OUT.
#
#   bash scripts/gpu.sh [build|test|bench|all|lease] [OUT]      (default: all, OUT=$OUT or /tmp/fastattn-gpu)
#
# Stages can run as separate commands (each under a time limit); `build` must come first on a fresh machine.
# `lease` does all three within LEASE_SECONDS (default 540) for a short GPU loan: it builds while the Triton
# tests run, then runs the extension's tests, then the benchmarks until the deadline, and packs them into
# OUT/bench.tgz (a loan returns few files).
# PYTHON picks the interpreter (default python3); MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured;
# BENCH_ARGS are added to `python -m bench` (e.g. "--ops attention kvcache --skip torch.compile").
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
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  "$python" -m bench --out "$out/bench" ${BENCH_ARGS:-} 2>"$out/bench.stderr.log" | tee "$out/bench.log"
}

GPU_TESTS=(tests/ops tests/nn tests/models tests/integrations)
# -v: a verdict line per test as it finishes, so a run cut short by its time limit still names its failures
PYTEST_LEASE=(-v -p no:benchmark --timeout 120 --tb=short -rfE)

lease() {
  local budget=${LEASE_SECONDS:-540} build_pid triton_pid
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >"$out/info.txt" 2>&1 || true
  (MAX_JOBS=${MAX_JOBS:-14} FASTATTN_REQUIRE_EXTENSION=1 "$python" setup.py build_ext --inplace >"$out/build.log" 2>&1
   echo "build exit status $? after $SECONDS s" >>"$out/build.log") &
  build_pid=$!
  # The Triton kernels need no extension: test them while it builds, on few workers (the build is the long pole).
  timeout $((budget / 2)) "$python" -m pytest -n 4 "${PYTEST_LEASE[@]}" -k triton-cuda "${GPU_TESTS[@]}" \
    >"$out/tests-triton.log" 2>&1 &
  triton_pid=$!
  wait "$build_pid" || true
  tail -1 "$out/build.log"
  "$python" -m fastattn.info >>"$out/info.txt" 2>&1 || true
  # the extension's tests took under a minute on 10 workers (2026-12-04)
  FASTATTN_EXPECT_CUDA=1 timeout 90 "$python" -m pytest -n 10 "${PYTEST_LEASE[@]}" -k "cuda and not triton-cuda" \
    tests/test_build.py "${GPU_TESTS[@]}" >"$out/tests-cuda.log" 2>&1 || true
  wait "$triton_pid" || true
  { grep -h " FAILED \|^FAILED\| passed\| failed" "$out/tests-triton.log" "$out/tests-cuda.log" || true; } |
    sort | uniq | tail -n 40
  # test workers a timeout left behind must not share the GPU with the timings
  nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null || true
  BENCH_ARGS="--deadline $((budget - 30 - SECONDS)) ${BENCH_ARGS:-}" benchmarks >/dev/null || true
  tar czf "$out/bench.tgz" -C "$out" bench && rm -rf "$out/bench"
  grep -h -A3 "Target" "$out/bench.log" | head -80 || true
}

case "$stage" in
  build) step "build" build ;;
  test) step "tests" tests ;;
  bench) step "benchmarks" benchmarks ;;
  lease) step "lease" lease ;;
  all)  # the benchmarks run even when a test fails; the exit status is the tests'
    step "build" build
    set +e
    step "tests" tests
    status=$?
    set -e
    step "benchmarks" benchmarks
    exit "$status" ;;
  *) echo "usage: bash scripts/gpu.sh [build|test|bench|all|lease] [OUT]" >&2; exit 2 ;;
esac
