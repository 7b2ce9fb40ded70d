"""The seeds' image classifiers: :class:`ImageCNN` (3x32x32 images, two 5x5 convolutions) and :class:`MnistCNN`
(the Keras MNIST example, 1x28x28 digits, two 3x3 convolutions), on fastattn's fused convolution blocks, each with a
pure torch.nn twin (:class:`TorchImageCNN`, :class:`TorchMnistCNN`: same constructor, same ``state_dict`` keys and
shapes, same results).

Every convolution is unpadded and stride 1, followed by ReLU and a 2x2 max pool (which floors odd sizes), so a side
of ``s`` pixels leaves ``(s - k + 1) // 2`` after one block with a k x k kernel. The flattened size fed to the first
linear layer is computed from ``image_size`` and ``kernel_size`` (the seed hard-coded ``64 * 6 * 6``, which is not
what a 32x32 image with 5x5 kernels gives: 32 -> 28 -> 14 -> 10 -> 5, so 64 * 5 * 5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastattn.nn.conv import ConvBNAct, FusedConv2d

CHANNELS = (32, 64)  # output channels of the two convolution blocks


def image_hw(image_size: int | tuple[int, int], name: str) -> tuple[int, int]:
    """image_size (an int for a square image, or (H, W)) as (H, W); ValueError naming image_size otherwise."""
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    else:
        hw = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in hw):
        raise ValueError(f"{name}: image_size must be a positive int or a pair (H, W) of them, got {image_size!r}")
    return hw


def feature_size(hw: tuple[int, int], kernel_size: int, name: str) -> tuple[int, int]:
    """(H', W') after the two conv (kernel_size, no padding) + 2x2 max pool blocks, for an (H, W) input; raises
    ValueError naming image_size when a side would vanish."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"{name}: kernel_size must be a positive int, got {kernel_size!r}")
    sides = hw
    for _ in CHANNELS:
        sides = tuple((s - kernel_size + 1) // 2 for s in sides)
    if min(sides) < 1:
        smallest = 1
        for _ in CHANNELS:  # undo a pool (x 2) and a convolution (+ k - 1), from one output pixel back
            smallest = 2 * smallest + kernel_size - 1
        raise ValueError(f"{name}: image_size {hw} is too small for two {kernel_size}x{kernel_size} conv + 2x2 pool "
                         f"blocks: each side must be at least {smallest}")  # fmt: skip
    return sides


def _check_positive(name: str, **sizes) -> None:
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")


def check_images(name: str, x, in_channels: int, expected_hw: tuple[int, int]) -> None:
    """x must be a float (N, in_channels, H, W) tensor with (H, W) = expected_hw. A wrong channel count raises
    RuntimeError, as torch.nn.Conv2d does; a wrong shape or image size raises ValueError."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise RuntimeError(f"{name}: x has {x.shape[1]} channels but in_channels={in_channels}")
    if tuple(x.shape[2:]) != expected_hw:
        raise ValueError(f"{name}: x is {tuple(x.shape[2:])} pixels but the model was built for image_size="
                         f"{expected_hw}")  # fmt: skip


class ImageCNN(nn.Module):
    """The seeds' CNN for small colour images, on fastattn's fused blocks::

        conv(in_channels -> 32, k) -> [BatchNorm] -> ReLU -> 2x2 max pool      (one FusedConv2d / ConvBNAct)
        conv(32 -> 64, k)          -> [BatchNorm] -> ReLU -> 2x2 max pool      (one FusedConv2d / ConvBNAct)
        flatten -> Linear(64 * H' * W', hidden) -> ReLU -> Linear(hidden, num_classes)

    Each convolution runs on ATen and its bias, ReLU and pool in one :func:`fastattn.conv_epilogue` pass; with
    ``batch_norm`` each block is a :class:`fastattn.ConvBNAct` (the BatchNorm folded into the convolution in eval mode).

    Args:
        in_channels: channels of the input images (3).
        image_size: the input's side (int) or (H, W) (32); H' = ((H - k + 1) // 2 - k + 1) // 2, W' likewise.
            Too small an image (H' or W' < 1) raises ValueError.
        num_classes: logits per image (10); kernel_size: k of both convolutions (5); hidden: width of the hidden
            linear layer (128).
        batch_norm: a BatchNorm2d after each convolution (state_dict keys ``conv1.0.*`` for the conv and
            ``conv1.1.*`` for the BatchNorm, as ``nn.Sequential(Conv2d, BatchNorm2d)``); else ``conv1.weight``, ...

    forward(x): x (N, in_channels, H, W) float, any memory format -> logits (N, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        num_classes: int = 10,
        kernel_size: int = 5,
        hidden: int = 128,
        batch_norm: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        _check_positive(name, in_channels=in_channels, num_classes=num_classes, hidden=hidden)
        self.in_channels, self.image_hw = in_channels, image_hw(image_size, name)
        out_hw = feature_size(self.image_hw, kernel_size, name)
        block = ConvBNAct if batch_norm else FusedConv2d
        self.conv1 = block(in_channels, CHANNELS[0], kernel_size, activation="relu", pool=True)
        self.conv2 = block(CHANNELS[0], CHANNELS[1], kernel_size, activation="relu", pool=True)
        self.fc1 = nn.Linear(CHANNELS[1] * out_hw[0] * out_hw[1], hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, in_channels, H, W) -> logits (N, num_classes)."""
        check_images(type(self).__name__, x, self.in_channels, self.image_hw)
        h = self.conv2(self.conv1(x))  # (N, 64, H', W')
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))  # (N, num_classes)


class TorchImageCNN(nn.Module):
    """The pure torch.nn twin of :class:`ImageCNN`: same arguments, ``state_dict`` and results, from nn.Conv2d
    (``nn.Sequential(nn.Conv2d, nn.BatchNorm2d)`` with ``batch_norm``), nn.ReLU and nn.MaxPool2d."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        num_classes: int = 10,
        kernel_size: int = 5,
        hidden: int = 128,
        batch_norm: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        out_hw = feature_size(image_hw(image_size, name), kernel_size, name)
        self.conv1 = _torch_conv(in_channels, CHANNELS[0], kernel_size, batch_norm)
        self.conv2 = _torch_conv(CHANNELS[0], CHANNELS[1], kernel_size, batch_norm)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(CHANNELS[1] * out_hw[0] * out_hw[1], hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.relu(self.conv1(x)))
        h = self.pool(self.relu(self.conv2(h)))
        return self.fc2(self.relu(self.fc1(h.flatten(1))))


class MnistCNN(nn.Module):
    """The Keras MNIST CNN, on fastattn's fused blocks::

        conv(in_channels -> 32, 3x3) -> ReLU -> 2x2 max pool      (one FusedConv2d)
        conv(32 -> 64, 3x3)          -> ReLU -> 2x2 max pool      (one FusedConv2d)
        flatten -> dropout -> Linear(64 * H' * W', num_classes)

    It returns logits: the Keras model's final softmax belongs in the loss (``F.cross_entropy`` takes logits);
    :meth:`predict_proba` gives the probabilities.

    Args:
        in_channels: channels of the input images (1).
        image_size: the input's side (int) or (H, W) (28, giving H' = W' = 5); H' = ((H - 2) // 2 - 2) // 2.
            Too small an image raises ValueError.
        num_classes: logits per image (10); dropout: probability before the dense layer (0.5, as in Keras).

    forward(x): x (N, in_channels, H, W) float, any memory format -> logits (N, num_classes).
    """

    def __init__(
        self, in_channels: int = 1, image_size: int | tuple[int, int] = 28, num_classes: int = 10, dropout: float = 0.5
    ):
        super().__init__()
        name = type(self).__name__
        _check_positive(name, in_channels=in_channels, num_classes=num_classes)
        _check_dropout(name, dropout)
        self.in_channels, self.image_hw = in_channels, image_hw(image_size, name)
        out_hw = feature_size(self.image_hw, 3, name)
        self.conv1 = FusedConv2d(in_channels, CHANNELS[0], 3, activation="relu", pool=True)
        self.conv2 = FusedConv2d(CHANNELS[0], CHANNELS[1], 3, activation="relu", pool=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(CHANNELS[1] * out_hw[0] * out_hw[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, in_channels, H, W) -> logits (N, num_classes)."""
        check_images(type(self).__name__, x, self.in_channels, self.image_hw)
        h = self.conv2(self.conv1(x))  # (N, 64, H', W')
        return self.fc(self.dropout(h.flatten(1)))

    def predict_proba(self, x: Tensor) -> Tensor:
        """x (N, in_channels, H, W) -> class probabilities (N, num_classes), softmax of the logits."""
        return torch.softmax(self(x), dim=-1)


class TorchMnistCNN(nn.Module):
    """The pure torch.nn twin of :class:`MnistCNN`: same arguments, ``state_dict`` and results (dropout draws
    aside), from nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Dropout and nn.Linear."""

    def __init__(
        self, in_channels: int = 1, image_size: int | tuple[int, int] = 28, num_classes: int = 10, dropout: float = 0.5
    ):
        super().__init__()
        name = type(self).__name__
        out_hw = feature_size(image_hw(image_size, name), 3, name)
        self.conv1 = nn.Conv2d(in_channels, CHANNELS[0], 3)
        self.conv2 = nn.Conv2d(CHANNELS[0], CHANNELS[1], 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(CHANNELS[1] * out_hw[0] * out_hw[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.relu(self.conv1(x)))
        h = self.pool(self.relu(self.conv2(h)))
        return self.fc(self.dropout(h.flatten(1)))

    def predict_proba(self, x: Tensor) -> Tensor:
        return torch.softmax(self(x), dim=-1)


def _torch_conv(in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool) -> nn.Module:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if batch_norm else conv


def _check_dropout(name: str, dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be a float in [0, 1), got {dropout!r}")


__all__ = ["ImageCNN", "MnistCNN", "TorchImageCNN", "TorchMnistCNN", "feature_size", "image_hw"]
