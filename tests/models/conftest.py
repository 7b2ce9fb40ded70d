"""Fixtures of the model tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small models run as fast on one thread, and do not stall when the machine's cores are busy (the kernels'
    multi-threaded row splits are tested in tests/ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
