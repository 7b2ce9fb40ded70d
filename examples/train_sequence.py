"""Train fastattn's SequenceTransformer to sort: for each number of a random sequence, predict its rank.

Input: x (batch, seq, 1), seq numbers drawn uniformly from [0, 1). Target: the rank of each x[b, i] within its row
(0 = smallest, seq - 1 = largest), a seq-way classification at every step, trained with cross-entropy. Every step
has to compare its number with all the others, so the encoder must learn to use attention.

    python examples/train_sequence.py                       # one process
    torchrun --nproc_per_node=2 examples/train_sequence.py  # DDP, gloo on CPU (NCCL with --device cuda)

Prints a progress bar, the final training loss (mean of the last 10% of steps) against --target-loss, the
evaluation loss and rank accuracy on 1024 held-out sequences; exits 1 if the loss target is missed.
"""

from __future__ import annotations

import argparse

import _common
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models import SequenceTransformer

SEQ = 12  # numbers to rank per sequence
EVAL_SEQUENCES = 1024


def batch(generator: torch.Generator, size: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(x (size, SEQ, 1) uniform in [0, 1), ranks (size, SEQ) long: rank[b, i] = #{j : x[b, j] < x[b, i]})."""
    x = torch.rand(size, SEQ, 1, generator=generator, dtype=torch.float64)
    ranks = x[..., 0].argsort(dim=1).argsort(dim=1)
    return x.to(device, dtype), ranks.to(device)


def build(args: argparse.Namespace) -> SequenceTransformer:
    return SequenceTransformer(input_dim=1, num_outputs=SEQ, d_model=64, nhead=4, num_layers=2, dim_feedforward=128,
                               dropout=args.dropout)  # fmt: skip


def loss_fn(model: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy over every step of every sequence."""
    x, ranks = data
    logits = model(x)  # (batch, SEQ, SEQ)
    return F.cross_entropy(logits.flatten(0, 1), ranks.flatten())


def main(args: argparse.Namespace, ctx: _common.Context) -> bool:
    torch.manual_seed(args.seed)  # the same initial parameters on every rank (DDP broadcasts rank 0's anyway)
    dtype = _common.DTYPES[args.dtype]
    model = build(args).to(ctx.device, dtype)
    ctx.print(f"train_sequence: rank {SEQ} uniform numbers; {_common.describe(ctx, model, args)}")
    ddp_model = _common.wrap(model, ctx)
    loss = _common.train(ddp_model, lambda g: batch(g, args.batch_size, ctx.device, dtype), loss_fn, args, ctx)
    met = _common.report(ctx, "final loss", loss, args.target_loss, below=True)

    model.eval()
    eval_data = batch(torch.Generator().manual_seed(args.seed + _common.EVAL_SEED_OFFSET), EVAL_SEQUENCES,
                      ctx.device, dtype)  # fmt: skip
    with torch.no_grad():
        logits = model(eval_data[0])
        accuracy = (logits.argmax(-1) == eval_data[1]).double().mean().item()
        ctx.print(f"eval loss: {loss_fn(model, eval_data).item():.4f}")
    ctx.print(f"eval rank accuracy: {accuracy:.4f} of {EVAL_SEQUENCES * SEQ} steps")
    return met


if __name__ == "__main__":
    p = _common.parser(__doc__.splitlines()[0], steps=2000, batch_size=64, lr=3e-3, target_loss=0.15)
    args = p.parse_args()
    _common.check_args(p, args)
    _common.run(lambda ctx: main(args, ctx), args)
