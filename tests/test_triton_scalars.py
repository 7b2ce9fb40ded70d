"""Float scalars reach the Triton kernels unrounded (fastattn/triton_kernels/scalars.py).

Triton's launcher passes a Python float argument as a float32, which rounded scales, eps and dropout factors in
float64 kernels on a GPU; the interpreter keeps Python floats, so the accuracy tests here never saw it. These
tests check the cure where a CPU can: every launch that scripts/triton_compile.py records passes no Python float
to a runtime argument and never specialises a ``*_bits`` argument, and ``scalar`` decodes bits exactly.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from fastattn.triton_kernels.scalars import scalar, scalar_bits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile.py"

# Run in a subprocess: the script needs the kernels compiled-mode (no TRITON_INTERPRET), conftest.py sets it.
AUDIT = r"""
import json, runpy, sys
script = runpy.run_path(sys.argv[1], run_name="triton_compile")
found = {"kernels": [], "floats": [], "specialised": []}
for case in script["cases"]():
    for launch in script["record"](case, 90):
        kernel = launch.kernel
        found["kernels"].append(kernel.__name__)
        for param, name in zip(kernel.params, kernel.arg_names):
            if param.is_constexpr:
                continue
            where = f"{kernel.__name__}({name}) in {launch.label!r}"
            if isinstance(launch.args[name], float):
                found["floats"].append(f"{where} = {launch.args[name]!r}")
            if name.endswith("_bits") and not param.do_not_specialize:
                found["specialised"].append(where)
found["expected"] = [name for names in script["KERNELS"].values() for name in names]
print(json.dumps(found))
"""


def test_no_launch_passes_a_python_float():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", AUDIT, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"recording the launches of {SCRIPT.name} failed:\n{result.stderr}"
    found = json.loads(result.stdout.splitlines()[-1])
    missing = set(found["expected"]) - set(found["kernels"])
    assert not missing, f"no recorded launch of {sorted(missing)}: the audit does not cover them"
    floats = sorted(set(found["floats"]))
    assert not floats, "Python floats (rounded to float32 by Triton's launcher):\n" + "\n".join(floats)
    specialised = sorted(set(found["specialised"]))
    assert not specialised, "float bits not in do_not_specialize:\n" + "\n".join(specialised)


@triton.jit
def _decode_kernel(bits64, bits32, OUT64, OUT32):
    tl.store(OUT64, scalar(bits64, tl.float64))
    tl.store(OUT32, scalar(bits32, tl.float32))


VALUES = [1 / 3, -2.5, math.pi, 1e300, -1e-40, 5e-324, 0.0, -0.0, math.inf, -math.inf, math.nan]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_bits_decode_exactly(value):
    """float64 bit for bit; float32 rounded as torch rounds (1e300 to inf, 5e-324 to 0). The bits of 0.0 and
    5e-324 fit an int32, as Triton then types them."""
    out64 = torch.empty(1, dtype=torch.float64)
    out32 = torch.empty(1, dtype=torch.float32)
    _decode_kernel[(1,)](scalar_bits(value, torch.float64), scalar_bits(value, torch.float32), out64, out32)
    expected = torch.tensor([value], dtype=torch.float64)
    assert out64.view(torch.int64).item() == expected.view(torch.int64).item(), f"float64: {out64.item()!r}"
    want32 = expected.to(torch.float32)
    assert out32.view(torch.int32).item() == want32.view(torch.int32).item(), f"float32: {out32.item()!r}"
