"""Whole models and Transformer layers: fastattn's seed models (fastattn/models/) against their pure torch.nn twins,
fastattn.TransformerEncoderLayer against torch.nn.TransformerEncoderLayer, and KV-cached generation.

Registered op benchmarks (every one of them: ``python -m bench --ops model-sequence,model-seq2seq,model-bert,
encoder-layer,encoder-layer-prenorm``):

- ``model-sequence``, ``model-seq2seq``, ``model-bert``: SequenceTransformer, Seq2SeqTransformer and BertMLM;
- ``encoder-layer`` / ``encoder-layer-prenorm``: one post-norm / pre-norm encoder layer;
- ``model-seq2seq`` also has the mode ``generate``: Seq2SeqTransformer.generate with and without its KV cache.

Modes (not the per-op modes of the kernel benchmarks):

- ``train``: one training step, ``zero_grad(set_to_none=True)``, forward, loss, ``backward()``, AdamW ``step()``
  (foreach), in train mode with dropout 0.1;
- ``eval``: one forward in eval mode under ``torch.no_grad()``;
- ``generate``: greedy ``generate`` of a fixed number of new tokens (eos made unreachable, so every call makes them
  all).

Providers: ``torch`` is the twin in eager mode (in ``eval`` with torch's MHA fast path switched off by
``torch.backends.mha.set_fastpath_enabled(False)``, so it runs the plain module code); ``torch-fastpath`` the twin
in eval with the fast path on (torch's fused ``_transformer_encoder_layer_fwd``; it needs eval, no grad,
batch_first and an even head count, all true here); ``torch.compile`` and ``fastattn.compile`` the twin and the
fastattn model compiled as modules (``dynamic=False, fullgraph=True``; the loss, backward and optimizer step stay
eager; the compile happens in the first call, kept out of the timings); ``fastattn`` the fastattn model in eager
mode with its default backend choice. Every provider has its own copy of the same weights. ``--quick`` lists the
compiled providers as skipped (a model's compile takes tens of seconds: 15-50 s for a training step on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from bench import harness
from bench.harness import Case, Provider, Target
from fastattn.models.bert import BertMLM, TorchBertMLM
from fastattn.models.seq2seq import Seq2SeqTransformer, TorchSeq2SeqTransformer
from fastattn.models.sequence import SequenceTransformer, TorchSequenceTransformer

DROPOUT = 0.1
LEARNING_RATE = 1e-4
INPUT_DIM, NUM_OUTPUTS = 64, 16  # SequenceTransformer's features per step in and out
FIRST_TOKEN = 3  # random token ids start past pad (0), bos (1) and eos (2)
MLM_FRACTION = 0.15  # BertMLM: labelled positions
MODES = ("train", "eval")

NOTES = (
    "`tokens` per call: batch·seq (model-seq2seq: batch·(source + target), both of length seq; generate: batch·new "
    "tokens), so tokens/s = tokens / ms · 1000; shape = (batch, seq, d_model). `train`: zero_grad, forward, loss "
    "(MSE; seq2seq cross-entropy; BertMLM its MLM loss on 15% of positions), backward, AdamW step, dropout 0.1. "
    "`eval`: forward under no_grad. `torch`: the torch.nn twin, eager (MHA fast path off); `torch-fastpath`: the "
    "twin on torch's eval fast path; `torch.compile` / `fastattn.compile`: the module compiled (fullgraph; loss, "
    "backward and optimizer step eager); `fastattn`: eager, default backends. Same weights everywhere."
)
GENERATE_NOTES = (
    " `generate`: greedy decoding of the new tokens from a source of length seq, eos made unreachable; `torch`: "
    "the twin's generate (reruns the decoder on the prefix every step), `fastattn-nocache`: generate(use_cache="
    "False), `fastattn`: generate(use_cache=True), per-layer KV caches through fastattn.attention_with_kvcache."
)


# ---------------------------------------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """One measured configuration: inputs (batch, seq), layer sizes, vocabulary, dtype, new tokens to generate."""

    batch: int
    seq: int
    d_model: int
    heads: int
    ff: int
    layers: int
    vocab: int
    dtype: torch.dtype
    new_tokens: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.batch, self.seq, self.d_model


CPU_MODEL = Size(8, 128, 256, 4, 1024, 2, 4096, torch.float32)
CPU_QUICK = Size(2, 32, 64, 2, 128, 1, 256, torch.float32)
GPU_MODEL = Size(16, 512, 1024, 16, 4096, 4, 32768, torch.bfloat16)
GPU_QUICK = Size(8, 256, 512, 8, 2048, 2, 8192, torch.bfloat16)

MODEL_SIZES = {("cpu", False): [CPU_MODEL], ("cpu", True): [CPU_QUICK],
               ("cuda", False): [GPU_MODEL], ("cuda", True): [GPU_QUICK]}  # fmt: skip
LAYER_SIZES = {
    ("cpu", False): [CPU_MODEL],
    ("cpu", True): [CPU_QUICK],
    ("cuda", False): [replace(GPU_MODEL, batch=8, seq=seq) for seq in (1024, 4096)],
    ("cuda", True): [replace(GPU_MODEL, batch=8, seq=1024)],
}
GENERATE_SIZES = {
    ("cpu", False): [replace(CPU_MODEL, batch=2, seq=64, new_tokens=256)],
    ("cpu", True): [replace(CPU_QUICK, seq=16, new_tokens=16)],
    ("cuda", False): [replace(GPU_MODEL, seq=512, new_tokens=256)],
    ("cuda", True): [replace(GPU_QUICK, seq=128, new_tokens=64)],
}


# ---------------------------------------------------------------------------------------------------------
# Workloads: a fastattn module, its torch.nn twin, inputs, the loss and the inference call.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """How to benchmark one fastattn module against its twin.

    ``build(kind, size)`` makes the module (kind ``"fastattn"`` or ``"torch"``, fresh random weights);
    ``inputs(size, device)`` the batch; ``loss(module, batch)`` a scalar to train on; ``infer(module, batch)``
    the eval forward; ``tokens(size)`` the tokens one call processes.
    """

    build: Callable[[str, Size], nn.Module]
    inputs: Callable[[Size, torch.device], tuple]
    loss: Callable[[nn.Module, tuple], Tensor]
    infer: Callable[[nn.Module, tuple], Tensor]
    tokens: Callable[[Size], int] = lambda size: size.batch * size.seq


def random_ids(size: Size, device: torch.device, low: int = FIRST_TOKEN) -> Tensor:
    """(batch, seq) random ids in [low, vocab)."""
    return torch.randint(low, size.vocab, (size.batch, size.seq), device=device)


def build_sequence(kind: str, size: Size) -> nn.Module:
    cls = SequenceTransformer if kind == "fastattn" else TorchSequenceTransformer
    return cls(INPUT_DIM, NUM_OUTPUTS, size.d_model, size.heads, size.layers, size.ff, DROPOUT)


def sequence_inputs(size: Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """x (batch, seq, INPUT_DIM) and a regression target (batch, seq, NUM_OUTPUTS)."""
    x = torch.randn(size.batch, size.seq, INPUT_DIM, device=device, dtype=size.dtype)
    return x, torch.randn(size.batch, size.seq, NUM_OUTPUTS, device=device, dtype=size.dtype)


def build_seq2seq(kind: str, size: Size) -> nn.Module:
    cls = Seq2SeqTransformer if kind == "fastattn" else TorchSeq2SeqTransformer
    return cls(size.vocab, size.vocab, size.d_model, size.heads, size.layers, size.layers, size.ff, DROPOUT,
               max_len=max(512, size.seq, 1 + size.new_tokens))  # fmt: skip


def seq2seq_inputs(size: Size, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """src, tgt and the next-token labels, each (batch, seq) ids with no padding."""
    return random_ids(size, device), random_ids(size, device), random_ids(size, device)


def seq2seq_loss(model: nn.Module, batch: tuple) -> Tensor:
    src, tgt, labels = batch
    return F.cross_entropy(model(src, tgt).flatten(0, 1), labels.flatten())


def build_bert(kind: str, size: Size) -> nn.Module:
    cls = BertMLM if kind == "fastattn" else TorchBertMLM
    return cls(size.vocab, size.d_model, size.heads, size.layers, size.ff, max(512, size.seq), dropout=DROPOUT)


def bert_inputs(size: Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """input_ids (batch, seq) and MLM labels: the id at 15% of positions, -100 elsewhere."""
    ids = random_ids(size, device, low=1)
    chosen = torch.rand(ids.shape, device=device) < MLM_FRACTION
    return ids, torch.where(chosen, ids, torch.full_like(ids, -100))


def build_layer(norm_first: bool, kind: str, size: Size) -> nn.Module:
    cls = fastattn.TransformerEncoderLayer if kind == "fastattn" else nn.TransformerEncoderLayer
    return cls(size.d_model, size.heads, size.ff, DROPOUT, batch_first=True, norm_first=norm_first)


def layer_inputs(size: Size, device: torch.device) -> tuple[Tensor, Tensor]:
    """x (batch, seq, d_model), a leaf that needs its gradient (as a layer's input inside a model), and a target."""
    x = torch.randn(size.shape, device=device, dtype=size.dtype, requires_grad=True)
    return x, torch.randn(size.shape, device=device, dtype=size.dtype)


def layer_loss(layer: nn.Module, batch: tuple) -> Tensor:
    x, target = batch
    x.grad = None
    return F.mse_loss(layer(x), target)


WORKLOADS = {
    "model-sequence": Workload(
        build_sequence, sequence_inputs, loss=lambda m, b: F.mse_loss(m(b[0]), b[1]), infer=lambda m, b: m(b[0])
    ),
    "model-seq2seq": Workload(
        build_seq2seq, seq2seq_inputs, seq2seq_loss, infer=lambda m, b: m(b[0], b[1]),
        tokens=lambda size: 2 * size.batch * size.seq,
    ),
    "model-bert": Workload(build_bert, bert_inputs, loss=lambda m, b: m(b[0], labels=b[1])[0],
                           infer=lambda m, b: m(b[0])),
    "encoder-layer": Workload(functools.partial(build_layer, False), layer_inputs, layer_loss,
                              infer=lambda m, b: m(b[0])),
    "encoder-layer-prenorm": Workload(functools.partial(build_layer, True), layer_inputs, layer_loss,
                                      infer=lambda m, b: m(b[0])),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Providers.
# ---------------------------------------------------------------------------------------------------------


def twins(workload: Workload, size: Size, device: torch.device) -> Callable[[str], nn.Module]:
    """``make(kind)``: a new module of ``kind`` on ``device`` in ``size.dtype``, every one with the same weights."""
    torch.manual_seed(0)
    state = workload.build("fastattn", size).state_dict()

    def make(kind: str) -> nn.Module:
        module = workload.build(kind, size)
        module.load_state_dict(state, strict=True)
        return module.to(device=device, dtype=size.dtype)

    return make


@contextlib.contextmanager
def mha_fastpath(enabled: bool) -> Iterator[None]:
    """torch's MultiheadAttention / TransformerEncoder fast path on or off inside."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def train_step(workload: Workload, module: nn.Module, run: Callable, batch: tuple) -> Callable[[], None]:
    """A call of one training step of ``module`` (``run`` is the module itself or its compiled wrapper)."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE, foreach=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        workload.loss(run, batch).backward()
        optimizer.step()

    return step


def eval_step(workload: Workload, module: nn.Module, run: Callable, batch: tuple) -> Callable[[], Tensor]:
    """A call of one eval forward of ``module`` under no_grad."""
    module.eval()

    def forward() -> Tensor:
        with torch.no_grad():
            return workload.infer(run, batch)

    return forward


COMPILE_SKIPPED_QUICK = "not run with --quick: compiling a model takes tens of seconds (15-50 s on 2 CPU cores)"


def providers(workload: Workload, mode: str, size: Size, device: torch.device, quick: bool) -> Iterator[Provider]:
    """The twin (eager, fast path in eval, compiled) and the fastattn module (eager, compiled) on one batch.

    Modules are built lazily, one provider at a time (harness.compiled resets the compile caches)."""
    make = twins(workload, size, device)
    batch = workload.inputs(size, device)
    step = train_step if mode == "train" else eval_step

    def eager(kind: str) -> Callable:
        module = make(kind)
        return step(workload, module, module, batch)

    def compiled(kind: str) -> Callable:
        module = make(kind)
        return step(workload, module, harness.compiled(module), batch)

    def maybe_compiled(name: str, kind: str) -> Provider:
        if quick:
            return harness.skip(name, COMPILE_SKIPPED_QUICK)
        return Provider(name, compiled(kind))

    if mode == "eval":
        yield Provider("torch", eager("torch"), context=functools.partial(mha_fastpath, False))
        yield Provider("torch-fastpath", eager("torch"), context=functools.partial(mha_fastpath, True))
    else:
        yield Provider("torch", eager("torch"))
    yield maybe_compiled("torch.compile", "torch")
    yield Provider("fastattn", eager("fastattn"))
    yield maybe_compiled("fastattn.compile", "fastattn")


def generate_providers(size: Size, device: torch.device) -> Iterator[Provider]:
    """Greedy generation of ``size.new_tokens`` tokens: the twin, fastattn without and with its KV cache."""
    make = twins(WORKLOADS["model-seq2seq"], size, device)
    src = random_ids(size, device)

    def generate(kind: str, **kwargs) -> Callable[[], Tensor]:
        model = make(kind)
        with torch.no_grad():
            model.lm_head.bias[model.eos_id] = -1e4  # never the argmax: every call makes every token

        def call() -> Tensor:
            out = model.generate(src, size.new_tokens, **kwargs)
            if out.shape[1] != 1 + size.new_tokens:
                raise RuntimeError(f"generated {out.shape[1] - 1} tokens, expected {size.new_tokens}")
            return out

        return call

    yield Provider("torch", generate("torch"))
    yield Provider("fastattn-nocache", generate("fastattn", use_cache=False))
    yield Provider("fastattn", generate("fastattn", use_cache=True))


# ---------------------------------------------------------------------------------------------------------
# Targets and registration.
# ---------------------------------------------------------------------------------------------------------


def at(size: Size) -> Callable[[dict], bool]:
    """Whether a row measured ``size`` (the issue's targets are about the full sizes, not --quick's)."""
    shape, dtype = harness.shape_label(size.shape), harness.dtype_label(size.dtype)
    return lambda row: row["shape"] == shape and row["dtype"] == dtype


CPU_GENERATE, GPU_GENERATE = GENERATE_SIZES[("cpu", False)][0], GENERATE_SIZES[("cuda", False)][0]
MODEL_TARGETS = (  # issue 5
    Target("cpu", ("train",), ("fastattn",), "fp32 B8 S128 d256 training step", at(CPU_MODEL), {"torch": 1.2}),
    Target("cpu", ("eval",), ("fastattn",), "fp32 B8 S128 d256 eval", at(CPU_MODEL), {"torch-fastpath": 1.0}),
    Target("cpu", ("generate",), ("fastattn",), "KV-cache generation of 256 tokens", at(CPU_GENERATE),
           {"fastattn-nocache": 5.0}),
    Target("cuda", ("train",), ("fastattn",), "bf16 B16 S512 d1024 training step, eager", at(GPU_MODEL),
           {"torch": 1.5}),
    Target("cuda", ("train",), ("fastattn.compile",), "bf16 B16 S512 d1024 training step, compiled", at(GPU_MODEL),
           {"torch.compile": 1.1}),
)  # fmt: skip


def sizes_for(table: dict, device: torch.device, quick: bool) -> list[Size]:
    return table[("cuda" if device.type == "cuda" else "cpu", quick)]


def register(name: str) -> None:
    workload = WORKLOADS[name]
    layer = name.startswith("encoder-layer")

    def cases(device: torch.device, quick: bool) -> Iterator[Case]:
        for mode in MODES:
            for size in sizes_for(LAYER_SIZES if layer else MODEL_SIZES, device, quick):
                yield Case(
                    op=name, mode=mode, shape=size.shape, dtype=size.dtype, x_label="tokens",
                    x_value=workload.tokens(size),
                    providers=functools.partial(providers, workload, mode, size, device, quick),
                )  # fmt: skip
        if name == "model-seq2seq":
            for size in sizes_for(GENERATE_SIZES, device, quick):
                yield Case(
                    op=name, mode="generate", shape=size.shape, dtype=size.dtype, x_label="tokens",
                    x_value=size.batch * size.new_tokens, providers=functools.partial(generate_providers, size, device),
                )  # fmt: skip

    notes = NOTES + (GENERATE_NOTES if name == "model-seq2seq" else "")
    harness.register(name, targets=() if layer else MODEL_TARGETS, notes=notes)(cases)


for _name in WORKLOADS:
    register(_name)
