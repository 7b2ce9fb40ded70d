"""Train fastattn's LSTMClassifier to tell which of four frequencies a noisy wave carries.

Input: x (batch, SEQ, 1), x_t = a * sin(2 pi f t + phi) + noise, with f one of FREQUENCIES (cycles per step), a
uniform in [0.5, 1.5], phi uniform in [0, 2 pi) and Gaussian noise of standard deviation NOISE at every step. Target:
the index of f, a 4-way classification from the LSTM's last step, trained with cross-entropy on the logits. The
random phase and amplitude leave no single step informative: the LSTM has to follow the wave through time.

    python examples/train_lstm.py                       # one process
    torchrun --nproc_per_node=2 examples/train_lstm.py  # DDP, gloo on CPU (NCCL with --device cuda)

Prints a progress bar, the final training loss (mean of the last 10% of steps) against --target-loss, the loss and
accuracy on EVAL_SEQUENCES held-out sequences, the accuracy against --target-accuracy; exits 1 if either target is
missed.
"""

from __future__ import annotations

import argparse
import math

import _common
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models import LSTMClassifier

SEQ = 40  # steps per sequence
FREQUENCIES = (0.04, 0.07, 0.10, 0.13)  # cycles per step: 1.6, 2.8, 4 and 5.2 periods in SEQ steps
NOISE = 0.75  # standard deviation of the per-step noise, for amplitudes of 0.5-1.5
EVAL_SEQUENCES = 2048


def batch(generator: torch.Generator, size: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x (size, SEQ, 1), labels (size,) long in [0, len(FREQUENCIES)))."""
    labels = torch.randint(len(FREQUENCIES), (size,), generator=generator)
    frequency = torch.tensor(FREQUENCIES, dtype=torch.float64)[labels].unsqueeze(1)  # (size, 1)
    amplitude = 0.5 + torch.rand(size, 1, generator=generator, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(size, 1, generator=generator, dtype=torch.float64)
    t = torch.arange(SEQ, dtype=torch.float64)  # (SEQ,)
    x = amplitude * torch.sin(2 * math.pi * frequency * t + phase)  # (size, SEQ)
    x = x + NOISE * torch.randn(size, SEQ, generator=generator, dtype=torch.float64)
    return x.unsqueeze(-1).to(device, dtype), labels.to(device)


def loss_fn(model: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of the logits."""
    x, labels = data
    return F.cross_entropy(model(x), labels)


def main(args: argparse.Namespace, ctx: _common.Context) -> bool:
    torch.manual_seed(args.seed)  # the same initial parameters on every rank (DDP broadcasts rank 0's anyway)
    dtype = _common.DTYPES[args.dtype]
    model = LSTMClassifier(input_size=1, hidden_size=args.hidden, num_classes=len(FREQUENCIES), num_layers=2,
                           dropout=args.dropout).to(ctx.device, dtype)  # fmt: skip
    ctx.print(f"train_lstm: which of {len(FREQUENCIES)} frequencies in {SEQ} noisy steps; "
              f"{_common.describe(ctx, model, args)}")  # fmt: skip
    ddp_model = _common.wrap(model, ctx)
    loss = _common.train(ddp_model, lambda g: batch(g, args.batch_size, ctx.device, dtype), loss_fn, args, ctx)
    met = _common.report(ctx, "final loss", loss, args.target_loss, below=True)

    model.eval()
    x, labels = batch(torch.Generator().manual_seed(args.seed + _common.EVAL_SEED_OFFSET), EVAL_SEQUENCES, ctx.device,
                      dtype)  # fmt: skip
    with torch.no_grad():
        logits = model(x)
        ctx.print(f"eval loss: {F.cross_entropy(logits, labels).item():.4f}")
        accuracy = (logits.argmax(-1) == labels).double().mean().item()
    return _common.report(ctx, f"eval accuracy ({EVAL_SEQUENCES} sequences)", accuracy, args.target_accuracy,
                          below=False) and met  # fmt: skip


if __name__ == "__main__":
    p = _common.parser(__doc__.splitlines()[0], steps=600, batch_size=64, lr=3e-3, target_loss=0.25)
    p.add_argument("--hidden", type=int, default=64, help="LSTM hidden size")
    p.add_argument("--target-accuracy", type=float, default=0.93, help="exit 1 if the held-out accuracy is below")
    args = p.parse_args()
    _common.check_args(p, args)
    if args.hidden < 1:
        p.error(f"--hidden must be >= 1, got {args.hidden}")
    _common.run(lambda ctx: main(args, ctx), args)
