"""Train fastattn's Seq2SeqTransformer to reverse random token sequences, then decode greedily with the KV cache.

Source: MIN_LEN..MAX_LEN tokens drawn from SYMBOLS symbols, right-padded with pad_id. Target: bos, the source
reversed, eos (then padding). Training minimises the decoder's cross-entropy on the real target tokens (teacher
forcing); afterwards ``generate`` (greedy, KV cache) reverses 512 held-out sequences and the exact-match accuracy
(the whole reversed sequence and its eos right) is checked too.

    python examples/train_seq2seq.py                       # one process
    torchrun --nproc_per_node=2 examples/train_seq2seq.py  # DDP, gloo on CPU (NCCL with --device cuda)

Prints a progress bar, the final training loss (mean of the last 10% of steps) against --target-loss, a few
generated examples and the exact-match accuracy against --target-accuracy; exits 1 if either target is missed.
"""

from __future__ import annotations

import argparse

import _common
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models import Seq2SeqTransformer

PAD, BOS, EOS = 0, 1, 2
SYMBOLS = 10  # token ids 3 .. 3 + SYMBOLS - 1
VOCAB = 3 + SYMBOLS
MIN_LEN, MAX_LEN = 3, 10
EVAL_SEQUENCES, SHOWN = 512, 4


def batch(generator: torch.Generator, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(src (size, MAX_LEN), tgt (size, MAX_LEN + 2)) long: src a random sequence right-padded with PAD,
    tgt = BOS, src reversed, EOS, then PAD."""
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (size, 1), generator=generator)  # (size, 1)
    tokens = torch.randint(3, VOCAB, (size, MAX_LEN), generator=generator)
    position = torch.arange(MAX_LEN)  # (MAX_LEN,)
    src = tokens.masked_fill(position >= lengths, PAD)
    # Reversed: tgt position 1 + t holds src[length - 1 - t] for t < length.
    reversed_index = (lengths - 1 - position).clamp(min=0)  # (size, MAX_LEN)
    body = src.gather(1, reversed_index).masked_fill(position >= lengths, PAD)
    tgt = torch.cat([torch.full((size, 1), BOS), body, torch.full((size, 1), PAD)], dim=1)
    tgt.scatter_(1, lengths + 1, EOS)
    return src.to(device), tgt.to(device)


def build(args: argparse.Namespace) -> Seq2SeqTransformer:
    return Seq2SeqTransformer(VOCAB, VOCAB, d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                              dim_feedforward=128, dropout=args.dropout, max_len=MAX_LEN + 2, pad_id=PAD,
                              bos_id=BOS, eos_id=EOS)  # fmt: skip


def loss_fn(model: nn.Module, data: tuple[Tensor, Tensor]) -> Tensor:
    """Teacher forcing: logits for tgt[:, :-1] predict tgt[:, 1:]; mean cross-entropy over the non-PAD targets."""
    src, tgt = data
    logits = model(src, tgt[:, :-1])  # (batch, MAX_LEN + 1, VOCAB)
    return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD)


def pad_to(tokens: Tensor, width: int) -> Tensor:
    """tokens (batch, n) -> (batch, width): cut or right-padded with PAD."""
    return F.pad(tokens[:, :width], (0, width - min(width, tokens.shape[1])), value=PAD)


def exact_match(generated: Tensor, tgt: Tensor) -> Tensor:
    """generated (batch, 1 + n) from generate, tgt (batch, MAX_LEN + 2) -> (batch,) bool: the same tokens up to
    and including EOS (generate pads rows that finished; a row that never emitted EOS does not match)."""
    return (pad_to(generated, tgt.shape[1]) == tgt).all(dim=1)


def show(tokens: Tensor) -> str:
    """Token ids -> the symbols as digits (0..9), stopping at EOS or PAD."""
    out = []
    for t in tokens.tolist():
        if t in (EOS, PAD):
            break
        out.append(str(t - 3) if t >= 3 else "<bos>")
    return " ".join(out)


def evaluate(model: Seq2SeqTransformer, args: argparse.Namespace, ctx: _common.Context) -> float:
    """Greedy KV-cached generation on held-out sequences: prints examples, returns the exact-match accuracy."""
    generator = torch.Generator().manual_seed(args.seed + _common.EVAL_SEED_OFFSET)
    src, tgt = batch(generator, EVAL_SEQUENCES, ctx.device)
    generated = model.generate(src, max_new_tokens=MAX_LEN + 1, use_cache=True)  # (batch, <= MAX_LEN + 2)
    matches = exact_match(generated, tgt)
    for i in range(SHOWN):
        ctx.print(f"  src {show(src[i])!r:32} -> generated {show(generated[i, 1:])!r:32} "
                  f"{'ok' if matches[i] else 'WRONG'}")  # fmt: skip
    rows = 8 * SHOWN
    uncached = model.generate(src[:rows], max_new_tokens=MAX_LEN + 1, use_cache=False)
    same = torch.equal(pad_to(generated[:rows], MAX_LEN + 2), pad_to(uncached, MAX_LEN + 2))
    ctx.print(f"KV-cached generation equals uncached generation on {rows} sequences: {same}")
    return matches.double().mean().item()


def main(args: argparse.Namespace, ctx: _common.Context) -> bool:
    torch.manual_seed(args.seed)  # the same initial parameters on every rank (DDP broadcasts rank 0's anyway)
    model = build(args).to(ctx.device, _common.DTYPES[args.dtype])
    ctx.print(f"train_seq2seq: reverse {MIN_LEN}-{MAX_LEN} tokens of {SYMBOLS} symbols; "
              f"{_common.describe(ctx, model, args)}")  # fmt: skip
    ddp_model = _common.wrap(model, ctx)
    loss = _common.train(ddp_model, lambda g: batch(g, args.batch_size, ctx.device), loss_fn, args, ctx)
    met = _common.report(ctx, "final loss", loss, args.target_loss, below=True)
    accuracy = evaluate(model, args, ctx)
    met_accuracy = _common.report(ctx, "exact-match accuracy (greedy, KV cache)", accuracy, args.target_accuracy,
                                  below=False)  # fmt: skip
    return met and met_accuracy


if __name__ == "__main__":
    p = _common.parser(__doc__.splitlines()[0], steps=600, batch_size=64, lr=2e-3, target_loss=0.02)
    p.add_argument("--target-accuracy", type=float, default=0.95, help="exit 1 if the exact-match accuracy is below")
    args = p.parse_args()
    _common.check_args(p, args)
    _common.run(lambda ctx: main(args, ctx), args)
