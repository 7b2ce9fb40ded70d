"""Dropout seeds for the kernels' counter-based (Philox) dropout, drawn from torch's CPU generator so that
:func:`torch.manual_seed` replays them and a GPU caller pays no device synchronisation."""

from typing import Optional

import torch
from torch import Tensor


def dropout_seed_tensor(dropout_p: float) -> Optional[Tensor]:
    """A 62-bit dropout seed as a (1,) int64 CPU tensor (None without dropout): a tensor rather than an int so
    that torch.compile traces the draw instead of breaking the graph at ``.item()``; the ops read it with
    :func:`seed_value` (a CPU read)."""
    return None if dropout_p == 0.0 else torch.randint(0, 2**62, (1,))


def seed_value(seed: Optional[Tensor]) -> int:
    """The int of a seed from :func:`dropout_seed_tensor` (0 for None)."""
    return 0 if seed is None else int(seed.reshape(-1)[0])
