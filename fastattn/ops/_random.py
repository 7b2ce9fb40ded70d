"""Dropout seeds for the kernels' counter-based (Philox) dropout."""

import torch


def dropout_seed(dropout_p: float) -> int:
    """A 62-bit dropout seed from torch's CPU generator (0 without dropout): torch.manual_seed reproduces it,
    and drawing it costs a GPU caller no device synchronisation."""
    if dropout_p == 0.0:
        return 0
    return int(torch.randint(0, 2**62, (1,)).item())
