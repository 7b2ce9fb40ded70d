"""DistributedDataParallel over fastattn models: the gradients two gloo processes agree on, each running half of a
fixed batch, equal one process's gradients on the whole batch (float64, dropout 0).

The models, batches and DDP setup are the examples' own (examples/train_sequence.py, examples/train_seq2seq.py,
examples/_common.py): each spawned process joins the group through the same RANK / WORLD_SIZE / MASTER_* variables
torchrun sets.
"""

import argparse
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastattn.testing import assert_close

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # spawned processes inherit sys.path

import _common  # noqa: E402
import train_seq2seq  # noqa: E402
import train_sequence  # noqa: E402

WORLD = 2
ROWS = 6  # the fixed batch; each rank takes ROWS // WORLD consecutive rows
RTOL = 1e-10


def _sequence_case():
    """(model, batch, loss_fn): the rank-prediction example's model and loss on 6 sequences."""
    torch.manual_seed(0)
    model = train_sequence.build(argparse.Namespace(dropout=0.0)).double()
    batch = train_sequence.batch(torch.Generator().manual_seed(1), ROWS, torch.device("cpu"), torch.float64)
    return model, batch, train_sequence.loss_fn  # mean over rows of equal length: halves average to the whole


def _seq2seq_loss(model, data):
    """Cross-entropy summed over each sequence's real target tokens, averaged over the sequences. (The example's
    mean over tokens would weight the two halves by their token counts, which DDP's plain average does not.)"""
    src, tgt = data
    logits = model(src, tgt[:, :-1])
    total = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=train_seq2seq.PAD, reduction="sum"
    )
    return total / src.shape[0]


def _seq2seq_case():
    """(model, batch, loss_fn): the reversal example's model on 6 padded sequences of different lengths."""
    torch.manual_seed(0)
    model = train_seq2seq.build(argparse.Namespace(dropout=0.0)).double()
    batch = train_seq2seq.batch(torch.Generator().manual_seed(1), ROWS, torch.device("cpu"))
    return model, batch, _seq2seq_loss


CASES = {"sequence": _sequence_case, "seq2seq": _seq2seq_case}


def _gradients(model) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _rank_gradients(rank: int, case: str, port: int, out: str) -> None:
    """One spawned process: join the group as the examples do, backward its half of the batch through DDP, save
    the (all-reduced) gradients to out/rank<rank>.pt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    ctx = _common.setup("cpu", threads=1)
    try:
        model, batch, loss_fn = CASES[case]()
        half = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
        ddp_model = _common.wrap(model, ctx)  # kept alive: its reducer all-reduces the gradients during backward
        loss_fn(ddp_model, tuple(t[half] for t in batch)).backward()
        torch.save(_gradients(model), Path(out) / f"rank{rank}.pt")
    finally:
        _common.teardown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_gradients_equal_single_process(case, tmp_path):
    mp.spawn(_rank_gradients, args=(case, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model, batch, loss_fn = CASES[case]()
    loss_fn(model, batch).backward()
    expected = _gradients(model)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, grad in got.items():
            scale = expected[name].abs().max().item()
            assert scale > 0, f"{name}: the full-batch gradient is zero; the comparison would prove nothing"
            assert_close(grad, expected[name], atol=RTOL * scale, name=f"rank {rank} {name}")
