"""``fastattn.Softmax``: drop-in for :class:`torch.nn.Softmax`."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.nn._drop_in import DropIn
from fastattn.ops.softmax import softmax


class Softmax(DropIn, torch.nn.Softmax):
    """:class:`torch.nn.Softmax` computed by :func:`fastattn.softmax`; same constructor and results.

    ``dim=None`` keeps torch's legacy choice of dim (0 for 0-, 1- and 3-d inputs, else 1).
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch.nn's argument name)
        return softmax(input, self._dim(input))

    def _dim(self, input: Tensor) -> int:  # noqa: A002
        if self.dim is not None:
            return self.dim
        return 0 if input.dim() in (0, 1, 3) else 1


__all__ = ["Softmax"]
