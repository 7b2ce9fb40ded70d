"""The build: the extension loaded, with CUDA kernels where the build was asked to compile them."""

import os

import pytest

from fastattn import backends


def test_extension_loads():
    if os.environ.get("FASTATTN_SKIP_EXTENSION") == "1":
        pytest.skip("FASTATTN_SKIP_EXTENSION=1: installed without the extension on purpose")
    module, reason = backends.extension()
    assert module is not None, reason


@pytest.mark.skipif(os.environ.get("FASTATTN_EXPECT_CUDA") != "1", reason="FASTATTN_EXPECT_CUDA=1 not set (CI sets it)")
def test_cuda_kernels_compiled():
    module, reason = backends.extension()
    assert module is not None, reason
    info = module.build_info()
    assert info["cuda"], f"the CUDA sources were not compiled: {info['cuda_status']}"
    assert info["cuda_archs"]
