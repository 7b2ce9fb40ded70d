#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the benchmarks: prints the table, writes CSV, Markdown and
# plots under bench/results/. Extra arguments go to `python -m bench` (e.g. --ops softmax --quick).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
step "benchmarks" .venv/bin/python -m bench "$@"
