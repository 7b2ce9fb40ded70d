"""``fastattn.LayerNorm`` and ``fastattn.RMSNorm``: drop-ins for :class:`torch.nn.LayerNorm` and
:class:`torch.nn.RMSNorm` (same constructor, parameters, state_dict and results)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.nn._drop_in import DropIn
from fastattn.ops.norm import layer_norm, rms_norm


class LayerNorm(DropIn, torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` computed by :func:`fastattn.layer_norm`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch.nn's argument name)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(DropIn, torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` computed by :func:`fastattn.rms_norm`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)


__all__ = ["LayerNorm", "RMSNorm"]
