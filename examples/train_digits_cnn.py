"""Train fastattn's MnistCNN on scikit-learn's handwritten digits, upsampled to MNIST's 28x28.

Data: ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download): 1797 grey 8x8 images of the digits
0-9, pixel values 0-16, scaled to [0, 1] and resized to 1x28x28 with bilinear ``F.interpolate``. A stratified split
fixed by SPLIT_SEED (not by --seed, so every run is scored on the same images) holds out 25% (450 images) for the
test. Training draws batches of training images at random (with replacement) and minimises the cross-entropy of the
logits; MnistCNN's convolutions run their bias + ReLU + 2x2 max pool in fastattn's fused epilogue.

    python examples/train_digits_cnn.py                       # one process
    torchrun --nproc_per_node=2 examples/train_digits_cnn.py  # DDP, gloo on CPU (NCCL with --device cuda)

Prints a progress bar, the final training loss (mean of the last 10% of steps) against --target-loss, the test loss
and the test accuracy against --target-accuracy; exits 1 if either target is missed.
"""

from __future__ import annotations

import argparse

import _common
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from fastattn.models import MnistCNN

IMAGE_SIZE = 28
SPLIT_SEED = 0
TEST_FRACTION = 0.25


def digits(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train (1347, 1, 28, 28), y_train (1347,), x_test (450, 1, 28, 28), y_test (450,)): images in [0, 1]."""
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float64).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(data.target, dtype=torch.long)
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION,
                                   random_state=SPLIT_SEED, stratify=labels.numpy())  # fmt: skip
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return (images[train].to(device, dtype), labels[train].to(device), images[test].to(device, dtype),
            labels[test].to(device))  # fmt: skip


def loss_fn(model: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of the logits (the Keras model's softmax lives here)."""
    x, y = data
    return F.cross_entropy(model(x), y)


def main(args: argparse.Namespace, ctx: _common.Context) -> bool:
    torch.manual_seed(args.seed)  # the same initial parameters on every rank (DDP broadcasts rank 0's anyway)
    dtype = _common.DTYPES[args.dtype]
    x_train, y_train, x_test, y_test = digits(ctx.device, dtype)
    model = MnistCNN(in_channels=1, image_size=IMAGE_SIZE, num_classes=10, dropout=args.dropout).to(ctx.device, dtype)
    ctx.print(f"train_digits_cnn: {len(y_train)} training / {len(y_test)} test digits at {IMAGE_SIZE}x{IMAGE_SIZE}; "
              f"{_common.describe(ctx, model, args)}")  # fmt: skip

    def batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(len(y_train), (args.batch_size,), generator=generator).to(ctx.device)
        return x_train[index], y_train[index]

    loss = _common.train(_common.wrap(model, ctx), batch, loss_fn, args, ctx)
    met = _common.report(ctx, "final loss", loss, args.target_loss, below=True)

    model.eval()
    with torch.no_grad():
        logits = model(x_test)
        ctx.print(f"test loss: {F.cross_entropy(logits, y_test).item():.4f}")
        accuracy = (logits.argmax(-1) == y_test).double().mean().item()
    return _common.report(ctx, f"test accuracy ({len(y_test)} digits)", accuracy, args.target_accuracy,
                          below=False) and met  # fmt: skip


if __name__ == "__main__":
    p = _common.parser(__doc__.splitlines()[0], steps=800, batch_size=64, lr=2e-3, target_loss=0.1)
    p.add_argument("--target-accuracy", type=float, default=0.96, help="exit 1 if the test accuracy is below")
    p.set_defaults(dropout=0.5)  # the Keras model's
    args = p.parse_args()
    _common.check_args(p, args)
    _common.run(lambda ctx: main(args, ctx), args)
