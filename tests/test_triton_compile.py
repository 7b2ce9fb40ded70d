"""Triton's real compiler over the quick subset of scripts/triton_compile.py, for sm_90, with no GPU needed.

The other Triton tests here run the kernels through the interpreter, which never compiles them: a kernel can pass
them all and still fail to compile on a GPU. This test compiles the riskiest specialisations (every attention
feature at once at the largest 16-bit tiles, float64 with a bool mask and dropout, the KV-cache kernels, a masked
softmax, the LSTM and LayerNorm-LSTM cells) down to a cubin. It runs the script in a subprocess because conftest.py
sets TRITON_INTERPRET=1, under which the kernels are interpreter functions with nothing to compile. A missing ptxas
or Triton CUDA backend fails the test: it is never skipped.
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile.py"


def test_quick_subset_compiles_for_sm90():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--quick"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"Triton compilation failed for sm_90 ({SCRIPT.name} --arch 90 --quick):\n{report}"
    compiled = [line for line in result.stdout.splitlines() if line.startswith("sm_90 ")]
    assert compiled and all(" ok " in line for line in compiled), report
