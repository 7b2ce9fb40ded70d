"""Convolution blocks with a fused epilogue: the convolution stays on ATen (oneDNN / cuDNN), and the bias, activation
and optional 2x2 max pool that follow it run as one :func:`fastattn.conv_epilogue` pass.

- :class:`FusedConv2d`: :class:`torch.nn.Conv2d` (same constructor, parameters and state_dict) followed by an
  activation and an optional pool.
- :class:`ConvBNAct`: ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(...))`` (same state_dict keys ``0.weight``,
  ``0.bias``, ``1.weight``, ``1.bias``, ``1.running_mean``, ``1.running_var``, ``1.num_batches_tracked``) followed
  by an activation and an optional pool; in eval mode the BatchNorm is folded into the convolution.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastattn import reference
from fastattn.ops.conv_epilogue import ACTIVATIONS, conv_epilogue


def _activation_name(activation: Optional[str], cls: str) -> str:
    activation = "none" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"{cls}: activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    return activation


def fold_batchnorm(
    weight: Tensor,
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """A convolution followed by an inference-mode BatchNorm as one convolution.

    With ``s = bn_weight / sqrt(running_var + eps)`` (C_out,): ``weight' = weight * s`` per output channel and
    ``bias' = (bias - running_mean) * s + bn_bias`` (a missing bias, bn_weight or bn_bias counts as 0, 1, 0).

    Args:
        weight: (C_out, C_in / groups, kH, kW); bias: None or (C_out,); the BatchNorm's statistics and affine
            parameters: (C_out,).

    Returns:
        ``(weight', bias')``: weight' in weight's dtype, bias' (C_out,) in float32 (float64 for float64 weight), as
        :func:`fastattn.conv_epilogue` takes it. Differentiable (computed per call from the parameters).
    """
    compute = reference.compute_dtype(weight.dtype)
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(compute)
    shift = -running_mean.to(compute) if bias is None else bias.to(compute) - running_mean.to(compute)
    folded_bias = shift * scale if bn_bias is None else torch.addcmul(bn_bias.to(compute), shift, scale)
    folded_weight = (weight.to(compute) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    return folded_weight, folded_bias


class FusedConv2d(torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` followed by ``act`` and an optional 2x2 max pool: the convolution runs without its
    bias, then :func:`fastattn.conv_epilogue` adds the bias, applies the activation and pools in one pass.

    Takes torch.nn.Conv2d's arguments, plus ``activation`` (``"none"``, the default, ``"relu"``, ``"gelu"``,
    ``"gelu_tanh"``, ``"silu"``) and ``pool`` (``F.max_pool2d(., 2)``). Same parameters and state_dict as
    torch.nn.Conv2d. Input (N, C_in, H, W) -> (N, C_out, H', W'), or (N, C_out, H' // 2, W' // 2) with the pool;
    channels_last input gives channels_last output.
    """

    def __init__(self, *args, activation: Optional[str] = "none", pool: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = _activation_name(activation, "FusedConv2d")
        self.pool = bool(pool)

    @classmethod
    def from_torch(cls, conv: torch.nn.Conv2d, activation: Optional[str] = "none", pool: bool = False):
        """A FusedConv2d sharing ``conv``'s parameters (no copy); ``conv`` is unchanged."""
        new = cls.__new__(cls)
        new.__dict__ = conv.__dict__.copy()
        new.activation = _activation_name(activation, "FusedConv2d")
        new.pool = bool(pool)
        return new

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch.nn's argument name)
        y = self._conv_forward(input, self.weight, None)
        return conv_epilogue(y, self.bias, self.activation, self.pool)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, pool={self.pool}"


class ConvBNAct(torch.nn.Sequential):
    """``Conv2d -> BatchNorm2d -> act -> optional 2x2 max pool``, with the state_dict of
    ``nn.Sequential(nn.Conv2d(...), nn.BatchNorm2d(out_channels))`` (or of ``nn.Sequential(nn.Conv2d(...))`` with
    ``batch_norm=False``), so checkpoints of that sequence load unchanged.

    Training mode (or a BatchNorm without running statistics): the convolution, ATen's batch_norm on the batch's
    statistics (updating the running ones), then :func:`fastattn.conv_epilogue`. Eval mode: the BatchNorm is folded
    into the convolution's weight and bias (:func:`fold_batchnorm`, recomputed each call from the current
    parameters, so it is never stale), then the convolution without bias and the fused bias + activation + pool.

    Args: torch.nn.Conv2d's (``bias=True`` as there; with a BatchNorm after it the conv bias is redundant, and
    ``bias=False`` is the usual choice), then ``activation`` (default ``"relu"``; see :class:`FusedConv2d`),
    ``pool``, ``batch_norm`` and the BatchNorm's ``eps`` and ``momentum``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        activation: Optional[str] = "relu",
        pool: bool = False,
        batch_norm: bool = True,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
    ):
        factory = {"device": device, "dtype": dtype}
        conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                               padding_mode, **factory)  # fmt: skip
        layers = [conv] + ([torch.nn.BatchNorm2d(out_channels, eps, momentum, **factory)] if batch_norm else [])
        super().__init__(*layers)
        self.activation = _activation_name(activation, "ConvBNAct")
        self.pool = bool(pool)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        conv = self[0]
        bn = self[1] if len(self) > 1 else None
        if bn is None:
            y, bias = conv._conv_forward(input, conv.weight, None), conv.bias
        elif bn.training or bn.running_mean is None:
            y, bias = bn(conv(input)), None
        else:
            weight, bias = fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                          bn.eps)  # fmt: skip
            y = conv._conv_forward(input, weight, None)
        return conv_epilogue(y, bias, self.activation, self.pool)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, pool={self.pool}"


__all__ = ["ConvBNAct", "FusedConv2d", "fold_batchnorm"]
