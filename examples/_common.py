"""What the training examples share: command-line flags, torchrun/DDP setup, the training loop and the target check.

A script run as ``python examples/<name>.py`` trains in one process; run under ``torchrun --nproc_per_node=N`` it
finds RANK / WORLD_SIZE / LOCAL_RANK in the environment, joins a process group (gloo on CPU, NCCL on CUDA), wraps
the model in DistributedDataParallel and draws each rank's batches from its own seed (``seed + rank``), so N ranks
train on N * batch_size sequences per step. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EVAL_SEED_OFFSET = 2**32  # the evaluation batch's generator: seed + this, far from every rank's training seed


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among world_size processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


def parser(description: str, *, steps: int, batch_size: int, lr: float, target_loss: float) -> argparse.ArgumentParser:
    """The flags every example takes, with the example's defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="sequences per step and per process")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW, warmup then cosine decay)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and activation dtype")
    p.add_argument("--seed", type=int, default=0, help="model init seed; rank r draws batches from seed + r")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the model")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (small models run best on one)")
    p.add_argument("--target-loss", type=float, default=target_loss, help="exit 1 if the final loss is not below")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag values the loop cannot use, with argparse's usage message."""
    for flag in ("steps", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")


def setup(device: str, threads: int) -> Context:
    """Use ``threads`` CPU threads; join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on
    CUDA, one GPU per local rank)."""
    torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return Context(rank, world_size, torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return Context(rank, world_size, torch.device("cpu"))


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel around model when there are several processes, else the model itself."""
    if not ctx.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def warmup_cosine(steps: int, warmup_fraction: float = 0.05) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warmup over the first steps, then cosine decay to 0."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def train(
    model: nn.Module,
    batch: Callable[[torch.Generator], tuple[Tensor, ...]],
    loss_fn: Callable[[nn.Module, tuple[Tensor, ...]], Tensor],
    args: argparse.Namespace,
    ctx: Context,
) -> float:
    """Train ``model`` (DDP-wrapped or not) for args.steps AdamW steps on batches drawn by ``batch(generator)``
    from this rank's generator (seed + rank); returns the mean training loss of the last 10% of steps, averaged
    over the ranks. Shows a tqdm bar on rank 0."""
    generator = torch.Generator().manual_seed(args.seed + ctx.rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    tail = max(1, args.steps // 10)
    tail_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    model.train()
    bar = tqdm(range(args.steps), desc="train", disable=not ctx.is_main, mininterval=1.0, file=sys.stdout)
    for step in bar:
        loss = loss_fn(model, batch(generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step >= args.steps - tail:
            tail_loss += loss.detach()
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    if ctx.distributed:
        dist.all_reduce(tail_loss)
    return tail_loss.item() / (tail * ctx.world_size)


def report(ctx: Context, name: str, value: float, target: float, *, below: bool) -> bool:
    """Print ``name: value (target < target) PASSED|MISSED`` on rank 0 (``>=`` when not ``below``); True if met."""
    met = value < target if below else value >= target
    relation = "<" if below else ">="
    ctx.print(f"{name}: {value:.4f} (target {relation} {target:g}) {'PASSED' if met else 'MISSED'}")
    return met


def describe(ctx: Context, model: nn.Module, args: argparse.Namespace) -> str:
    """One line: the model, its size, and where it trains."""
    params = sum(p.numel() for p in model.parameters())
    return (f"{type(model).__name__}, {params:,} parameters, {ctx.world_size} process(es) on {ctx.device.type}, "
            f"{args.dtype}, {args.steps} steps x {args.batch_size} sequences per process")  # fmt: skip


def run(main: Callable[[Context], bool], args: argparse.Namespace) -> None:
    """Set up the process group, run ``main(ctx)`` (True = every target met), tear down, exit 0 or 1."""
    ctx = setup(args.device, args.threads)
    start = time.perf_counter()
    try:
        met = main(ctx)
    finally:
        teardown(ctx)
    ctx.print(f"wall time: {time.perf_counter() - start:.1f} s")
    sys.exit(0 if met else 1)
