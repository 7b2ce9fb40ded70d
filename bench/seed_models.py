"""The seeds' CNN and RNN classifiers (fastattn/models/cnn.py, fastattn/models/rnn.py) against their pure torch.nn
twins, one training step and one inference at a time.

Registered op benchmarks (every one of them: ``python -m bench --ops model-image-cnn,model-image-cnn-plain,
model-mnist-cnn,model-lstm-classifier,model-tanh-rnn``):

- ``model-image-cnn``: ImageCNN with ``batch_norm=True`` (fastattn.ConvBNAct blocks: in eval the BatchNorm is folded
  into the convolution and bias + ReLU + 2x2 max pool run in one fused epilogue), the issue's target case;
- ``model-image-cnn-plain``: ImageCNN without BatchNorm (fastattn.FusedConv2d blocks);
- ``model-mnist-cnn``: MnistCNN (the Keras MNIST example, dropout 0.5 before the dense layer);
- ``model-lstm-classifier``: LSTMClassifier (a 2-layer fastattn.LSTM and a linear head on the last step);
- ``model-tanh-rnn``: TanhRNN (a 1-layer fastattn.RNN, tanh, and a linear head on the last step).

Modes, as in bench/models.py: ``train`` is one training step, ``zero_grad(set_to_none=True)``, forward,
cross-entropy on random labels, ``backward()``, AdamW ``step()`` (foreach), in train mode; ``eval`` one forward in
eval mode under ``torch.no_grad()``.

Providers: ``torch`` (the twin, eager), ``torch.compile`` and ``fastattn.compile`` (the twin and the fastattn model
compiled as modules, ``dynamic=False, fullgraph=True``, inside ``torch._dynamo.config.patch(allow_rnn=True)`` for
the recurrent models; loss, backward and optimizer step eager; skipped with ``--quick``) and ``fastattn`` (eager).
Every provider has its own copy of the same weights (BatchNorm running statistics perturbed away from 0 and 1, so
that the folding has something to fold). Each provider's first call is checked against torch's: the logits in
``eval``, the loss of the first step in ``train`` (MnistCNN's train step aside: its dropout draws differ).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import harness
from bench.harness import Case, Provider, Target
from bench.recurrent import Agreement, allow_rnn
from fastattn.models.cnn import ImageCNN, MnistCNN, TorchImageCNN, TorchMnistCNN
from fastattn.models.rnn import LSTMClassifier, TanhRNN, TorchLSTMClassifier, TorchTanhRNN

LEARNING_RATE = 1e-4  # AdamW, as bench/models.py
NUM_CLASSES = 10
MODES = ("train", "eval")
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}

# Shapes: images (batch, channels, H, W); sequences (batch, seq, input, hidden).
IMAGE = {("cpu", False): (64, 3, 32, 32), ("cpu", True): (4, 3, 16, 16),
         ("cuda", False): (512, 3, 32, 32), ("cuda", True): (128, 3, 32, 32)}  # fmt: skip
MNIST = {("cpu", False): (64, 1, 28, 28), ("cpu", True): (4, 1, 12, 12),
         ("cuda", False): (512, 1, 28, 28), ("cuda", True): (128, 1, 28, 28)}  # fmt: skip
SEQUENCE = {("cpu", False): (64, 50, 32, 128), ("cpu", True): (4, 8, 8, 16),
            ("cuda", False): (256, 100, 64, 256), ("cuda", True): (64, 50, 32, 128)}  # fmt: skip

NOTES = (
    "shape = (batch, channels, H, W) for the CNNs, (batch, seq, input, hidden) for the RNNs; `samples` per call: "
    "batch, so samples/s = samples / ms · 1000. `train`: zero_grad, forward, cross-entropy on random labels, "
    "backward, AdamW step (foreach), train mode; `eval`: forward under no_grad in eval mode. `torch`: the torch.nn "
    "twin, eager; `torch.compile` / `fastattn.compile`: the module compiled (fullgraph, Dynamo's allow_rnn for the "
    "RNNs; loss, backward and optimizer step eager); `fastattn`: eager. Same weights everywhere; each provider's "
    "first call checked against torch's (eval: logits; train: the first step's loss)."
)
DETAILS = {
    "model-image-cnn": " ImageCNN(batch_norm=True): conv 5x5 -> BatchNorm -> ReLU -> pool, twice, then Linear(1600, "
    "128) -> ReLU -> Linear(128, 10); fastattn folds the BatchNorm into the conv in eval and fuses bias + ReLU + "
    "pool.",
    "model-image-cnn-plain": " ImageCNN(batch_norm=False): conv 5x5 -> ReLU -> pool, twice, then the same head; "
    "fastattn fuses bias + ReLU + pool.",
    "model-mnist-cnn": " MnistCNN: conv 3x3 -> ReLU -> pool, twice, dropout 0.5 (train), Linear(1600, 10); the "
    "train step's loss is not checked (dropout draws differ).",
    "model-lstm-classifier": " LSTMClassifier: 2-layer LSTM (fastattn.LSTM / torch.nn.LSTM), Linear(hidden, 10) on "
    "the last step.",
    "model-tanh-rnn": " TanhRNN: 1-layer tanh RNN (fastattn.RNN / torch.nn.RNN), Linear(hidden, 10) on the last step.",
}
COMPILE_SKIPPED_QUICK = "not run with --quick: compiling a model's step takes seconds to tens of seconds"


# ---------------------------------------------------------------------------------------------------------
# Workloads: a fastattn model and its twin, the shapes and the input.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """How to benchmark one seed model: ``build(kind, shape)`` makes the fastattn model (kind ``"fastattn"``) or its
    twin (``"torch"``) for inputs of ``shape``; ``shapes`` per (device type, quick); ``recurrent``: Dynamo needs
    ``allow_rnn``; ``stochastic``: the train step draws dropout masks (its loss is not compared)."""

    build: Callable[[str, tuple[int, ...]], nn.Module]
    shapes: dict[tuple[str, bool], tuple[int, ...]]
    recurrent: bool = False
    stochastic: bool = False


def build_image_cnn(batch_norm: bool, kind: str, shape: tuple[int, ...]) -> nn.Module:
    _, channels, height, width = shape
    cls = ImageCNN if kind == "fastattn" else TorchImageCNN
    return cls(channels, (height, width), NUM_CLASSES, batch_norm=batch_norm)


def build_mnist_cnn(kind: str, shape: tuple[int, ...]) -> nn.Module:
    _, channels, height, width = shape
    return (MnistCNN if kind == "fastattn" else TorchMnistCNN)(channels, (height, width), NUM_CLASSES)


def build_lstm(kind: str, shape: tuple[int, ...]) -> nn.Module:
    _, _, input_size, hidden = shape
    return (LSTMClassifier if kind == "fastattn" else TorchLSTMClassifier)(input_size, hidden, NUM_CLASSES)


def build_tanh_rnn(kind: str, shape: tuple[int, ...]) -> nn.Module:
    _, _, input_size, hidden = shape
    return (TanhRNN if kind == "fastattn" else TorchTanhRNN)(input_size, hidden, NUM_CLASSES)


WORKLOADS = {
    "model-image-cnn": Workload(functools.partial(build_image_cnn, True), IMAGE),
    "model-image-cnn-plain": Workload(functools.partial(build_image_cnn, False), IMAGE),
    "model-mnist-cnn": Workload(build_mnist_cnn, MNIST, stochastic=True),
    "model-lstm-classifier": Workload(build_lstm, SEQUENCE, recurrent=True),
    "model-tanh-rnn": Workload(build_tanh_rnn, SEQUENCE, recurrent=True),
}


def inputs(workload: Workload, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    """x (batch, channels, H, W) or (batch, seq, input) and labels (batch,) in [0, NUM_CLASSES)."""
    x_shape = shape[:3] if workload.recurrent else shape
    x = torch.randn(x_shape, device=device, dtype=dtype)
    return x, torch.randint(0, NUM_CLASSES, (shape[0],), device=device)


def twins(workload: Workload, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """``make(kind)``: a new model of ``kind`` on ``device`` in ``dtype``, every one with the same weights (the
    fastattn model's initialisation; BatchNorm running mean ~ N(0, 0.1²) and running variance in [0.5, 1.5))."""
    torch.manual_seed(0)
    state = workload.build("fastattn", shape).state_dict()
    for name, value in state.items():
        if name.endswith("running_mean"):
            value.copy_(0.1 * torch.randn_like(value))
        elif name.endswith("running_var"):
            value.copy_(0.5 + torch.rand_like(value))

    def make(kind: str) -> nn.Module:
        module = workload.build(kind, shape)
        module.load_state_dict(state, strict=True)
        return module.to(device=device, dtype=dtype)

    return make


# ---------------------------------------------------------------------------------------------------------
# Providers.
# ---------------------------------------------------------------------------------------------------------


def train_step(module: nn.Module, run: Callable, batch: tuple) -> Callable[[], tuple[Tensor]]:
    """A call of one training step of ``module`` (``run``: the module or its compiled wrapper); returns (loss,)."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=LEARNING_RATE, foreach=True)
    x, labels = batch

    def step() -> tuple[Tensor]:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(run(x), labels)
        loss.backward()
        optimizer.step()
        return (loss.detach(),)

    return step


def eval_step(module: nn.Module, run: Callable, batch: tuple) -> Callable[[], tuple[Tensor]]:
    """A call of one eval forward of ``module`` under no_grad; returns (logits,)."""
    module.eval()
    x, _ = batch

    def forward() -> tuple[Tensor]:
        with torch.no_grad():
            return (run(x),)

    return forward


def providers(workload: Workload, mode: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              quick: bool) -> Iterator[Provider]:  # fmt: skip
    """The twin (eager, compiled) and the fastattn model (eager, compiled) on one batch, built lazily one provider at
    a time (harness.compiled resets the compile caches)."""
    make = twins(workload, shape, dtype, device)
    batch = inputs(workload, shape, dtype, device)
    step = train_step if mode == "train" else eval_step
    check = Agreement(["loss" if mode == "train" else "logits"])
    checked = mode == "eval" or not workload.stochastic
    context = allow_rnn if workload.recurrent else contextlib.nullcontext

    def provider(name: str, kind: str, compile_it: bool) -> Provider:
        if compile_it and quick:
            return harness.skip(name, COMPILE_SKIPPED_QUICK)
        module = make(kind)
        fn = step(module, harness.compiled(module) if compile_it else module, batch)
        fn = check.checked(name, fn) if checked else fn
        return Provider(name, fn, context=context)

    yield provider("torch", "torch", False)
    yield provider("torch.compile", "torch", True)
    yield provider("fastattn", "fastattn", False)
    yield provider("fastattn.compile", "fastattn", True)


# ---------------------------------------------------------------------------------------------------------
# Targets and registration.
# ---------------------------------------------------------------------------------------------------------


def at(shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> Callable[[dict], bool]:
    """Whether a row measured ``shape`` in one of ``dtypes`` (the targets are about the full sizes, not --quick's)."""
    label, dtype_labels = harness.shape_label(shape), {harness.dtype_label(dtype) for dtype in dtypes}
    return lambda row: row["shape"] == label and row["dtype"] in dtype_labels


def cnn_targets(shapes: dict[tuple[str, bool], tuple[int, ...]], folded: bool) -> tuple[Target, ...]:
    """Issue 6: on CPU, ImageCNN inference with folded BatchNorm and fused epilogues >= 1.2x the eager twin (fp32);
    on GPU, the seed CNN's training step >= 1.2x eager and >= 1.0x torch.compile."""
    gpu = at(shapes[("cuda", False)], DTYPES["cuda"])
    targets = (
        Target("cuda", ("train",), ("fastattn",), "seed CNN training step, eager", gpu,
               {"torch": 1.2, "torch.compile": 1.0}),
        Target("cuda", ("train",), ("fastattn.compile",), "seed CNN training step, compiled", gpu,
               {"torch.compile": 1.0}),
    )  # fmt: skip
    if folded:
        cpu = at(shapes[("cpu", False)], (torch.float32,))
        targets = (Target("cpu", ("eval",), ("fastattn",), "fp32 ImageCNN B64 32x32 inference, BatchNorm folded, "
                          "fused epilogues", cpu, {"torch": 1.2}), *targets)  # fmt: skip
    return targets


TARGETS = {
    "model-image-cnn": cnn_targets(IMAGE, folded=True),
    "model-image-cnn-plain": cnn_targets(IMAGE, folded=False),
    "model-mnist-cnn": cnn_targets(MNIST, folded=False),
}


def register(name: str) -> None:
    workload = WORKLOADS[name]

    def cases(device: torch.device, quick: bool) -> Iterator[Case]:
        device_type = "cuda" if device.type == "cuda" else "cpu"
        shape = workload.shapes[(device_type, quick)]
        for mode in MODES:
            for dtype in DTYPES[device_type]:
                yield Case(
                    op=name, mode=mode, shape=shape, dtype=dtype, x_label="samples", x_value=shape[0],
                    providers=functools.partial(providers, workload, mode, shape, dtype, device, quick),
                )  # fmt: skip

    harness.register(name, targets=TARGETS.get(name, ()), notes=NOTES + DETAILS[name])(cases)


for _name in WORKLOADS:
    register(_name)
