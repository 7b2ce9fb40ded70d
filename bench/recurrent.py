"""Recurrent layers: fastattn.LSTM, GRU, RNN (tanh) and LayerNormLSTM against torch.nn (cuDNN on GPU, oneDNN /
ATen's kernels on CPU), an eager Python loop over a cell, and torch.compile.

One layer, one direction, x (seq, batch, input) not batch first, h_0 = c_0 = 0. A case's shape is
(seq, batch, input, hidden): the issue's standard shape 100x64x512x512 and two small, launch-bound ones,
100x8x64x64 and 32x16x128x128 (``--quick``: one tiny shape). Registered op benchmarks:

- ``lstm``, ``gru``, ``rnn_tanh``: providers ``torch`` (torch.nn.LSTM / GRU / RNN, eager), ``torch.compile``
  (that module compiled), ``eager-loop`` (torch.nn.LSTMCell / GRUCell / RNNCell called step by step in a Python
  loop), ``fastattn`` (the drop-in module, default backend choice: on a GPU the Triton kernels) and, on a GPU,
  ``fastattn-cuda`` (the same module on the CUDA C++ kernels);
- ``layernorm_lstm``: torch.nn has no LayerNorm-LSTM, so ``torch`` is the eager Python loop below
  (:class:`LoopLayerNormLSTM`, a cell with ``F.layer_norm`` per step: the baseline of the issue's 5x target),
  ``torch.compile`` that loop compiled (at the standard shape only: it compiles for minutes), and ``fastattn`` is
  fastattn.LayerNormLSTM.

Modes: ``forward`` (eval mode under ``torch.no_grad()``: inference), and ``forward+backward``
(``torch.autograd.grad(output, (x, *parameters), grad)``, a random gradient through the output sequence, to
the input and every weight, nothing accumulated in ``.grad``).

Every provider has its own copy of the same weights (the LayerNorm affines perturbed from their 1 / 0
initialisation, so that they matter). The first call of each provider is checked against the first provider's
(torch's): output, and in forward+backward every gradient, within AGREEMENT_TOLERANCE times the values' magnitude
(a check that they compute the same function, not a parity test: that is the tests' job). A provider that
disagrees is listed as failed, with where. ``torch.compile`` runs with ``torch._dynamo.config.allow_rnn``
(Dynamo refuses torch.nn's RNN modules otherwise) and is skipped with ``--quick``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from bench import harness
from bench.harness import Case, Provider, Target
from fastattn import testing

STANDARD = (100, 64, 512, 512)  # (seq, batch, input, hidden): the standard shape
# launch-bound: a step's work is tiny next to its launches; batch 1 as in streaming inference
SMALL = ((100, 8, 64, 64), (32, 16, 128, 128), (100, 1, 256, 256))
SHAPES = {
    ("cpu", False): (*SMALL, STANDARD),
    ("cpu", True): ((12, 4, 24, 32),),
    ("cuda", False): (*SMALL, STANDARD),
    ("cuda", True): (SMALL[0],),
}
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}
MODES = ("forward", "forward+backward")
# The agreement check's tolerance, times the largest magnitude of the expected values (at least 1). Rounding
# differences grow over the steps: fp32 LayerNorm-LSTMs 100x64x512x512 differ by 6e-4 (each is 5e-4 from float64);
# a wrong function (gate order, a missing bias or norm, other weights) differs by 1e-1 or more.
AGREEMENT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-3}
LOW_PRECISION_TOLERANCE = 1e-1  # float16, bfloat16
COMPILE_SKIPPED_QUICK = "not run with --quick: compiling the unrolled time loop takes seconds to minutes"
# Compiling the LayerNorm-LSTM loop unrolls its steps: 100 steps took 85 s (forward) and 220 s (forward+backward)
# on 2 busy CPU cores, so it is compiled at the standard shape only.
COMPILED_LOOP_SHAPES = (STANDARD,)
COMPILE_SKIPPED_SHAPE = "compiled at 100x64x512x512 only: compiling the unrolled 100-step loop takes minutes per shape"

NOTES = (
    "shape = (seq, batch, input, hidden), one layer, one direction, h_0 = c_0 = 0. `forward`: eval mode under "
    "no_grad; `forward+backward`: `torch.autograd.grad(output, (x, *weights), grad)`. FLOPs per call (matmuls "
    "only, G gates: 4 LSTM, 3 GRU, 1 RNN): forward = 2·seq·batch·G·hidden·(input + hidden), forward+backward = "
    "3x that. Same weights everywhere; every provider's first call is checked against torch's."
)
LOOP_NOTES = (
    " `eager-loop`: torch.nn.{cell} called once per step in a Python loop (its input projection per step, as a "
    "cell does); `torch.compile`: torch.nn.{module} compiled (fullgraph, allow_rnn)."
)
LAYERNORM_NOTES = (
    " torch.nn has no LayerNorm-LSTM: `torch` is an eager Python loop (bench/recurrent.py LoopLayerNormLSTM: per "
    "step LN(x_t W_ih^T) + LN(h W_hh^T) + b_ih + b_hh, F.layer_norm over the 4H gates, LN of the cell feeding h), "
    "the baseline of the issue's 5x target; `torch.compile`: that loop compiled (fullgraph; at the standard shape "
    "only: the unrolled loop compiles for minutes); `fastattn`: "
    "fastattn.LayerNormLSTM (runs fastattn.reference's loop until its fused kernel lands)."
)


# ---------------------------------------------------------------------------------------------------------
# The eager Python-loop LayerNorm-LSTM (torch.nn has none) and the cell loops.
# ---------------------------------------------------------------------------------------------------------


class LoopLayerNormLSTM(nn.Module):
    """One layer of fastattn.LayerNormLSTM's function written plainly with torch ops, a step at a time; its
    parameters have fastattn.LayerNormLSTM's names, so that its state_dict loads here.

    forward(x (seq, batch, input)) -> output (seq, batch, hidden), h_0 = c_0 = 0. Per step, gates (i, f, g, o):
    gates = LN_ih(x_t W_ih^T) + LN_hh(h W_hh^T) + b_ih + b_hh; c = σ(f) c + σ(i) tanh(g);
    h = σ(o) tanh(LN_c(c)), each LN over its last dim with its own affine.
    """

    def __init__(self, input_size: int, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        gates = 4 * hidden_size
        for name, shape in (("weight_ih_l0", (gates, input_size)), ("weight_hh_l0", (gates, hidden_size)),
                            ("bias_ih_l0", (gates,)), ("bias_hh_l0", (gates,))):  # fmt: skip
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        for norm, size in (("ih", gates), ("hh", gates), ("c", hidden_size)):
            self.register_parameter(f"norm_{norm}_weight_l0", nn.Parameter(torch.ones(size)))
            self.register_parameter(f"norm_{norm}_bias_l0", nn.Parameter(torch.zeros(size)))

    def norm(self, x: Tensor, which: str) -> Tensor:
        weight, bias = getattr(self, f"norm_{which}_weight_l0"), getattr(self, f"norm_{which}_bias_l0")
        return F.layer_norm(x, x.shape[-1:], weight, bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[1], self.hidden_size)  # (batch, hidden)
        c = torch.zeros_like(h)
        outputs = []
        for x_t in x.unbind(0):  # (batch, input)
            gates = self.norm(x_t @ self.weight_ih_l0.t(), "ih") + self.norm(h @ self.weight_hh_l0.t(), "hh")
            i, f, g, o = (gates + self.bias_ih_l0 + self.bias_hh_l0).chunk(4, dim=-1)  # (batch, hidden) each
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.norm(c, "c"))
            outputs.append(h)
        return torch.stack(outputs)  # (seq, batch, hidden)


def cell_loop(cell: nn.RNNCellBase, x: Tensor) -> Tensor:
    """``cell`` applied step by step over x (seq, batch, input) from zero states -> output (seq, batch, hidden)."""
    h = x.new_zeros(x.shape[1], cell.hidden_size)  # (batch, hidden)
    state = (h, torch.zeros_like(h)) if isinstance(cell, nn.LSTMCell) else h
    outputs = []
    for x_t in x.unbind(0):
        state = cell(x_t, state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outputs)


# ---------------------------------------------------------------------------------------------------------
# The op benchmarks and their modules.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recurrent:
    """One op benchmark: the torch module (or loop), the fastattn drop-in, the torch.nn cell of the eager loop
    (None: none), constructor keywords, and the gates per hidden unit (for the FLOP count)."""

    torch_module: type[nn.Module]
    fastattn_module: type[nn.Module]
    cell: type[nn.RNNCellBase] | None
    gates: int
    kwargs: dict = field(default_factory=dict)


OPS = {
    "lstm": Recurrent(nn.LSTM, fastattn.LSTM, nn.LSTMCell, 4),
    "gru": Recurrent(nn.GRU, fastattn.GRU, nn.GRUCell, 3),
    "rnn_tanh": Recurrent(nn.RNN, fastattn.RNN, nn.RNNCell, 1, {"nonlinearity": "tanh"}),
    "layernorm_lstm": Recurrent(LoopLayerNormLSTM, fastattn.LayerNormLSTM, None, 4),
}


def twins(op: Recurrent, shape, dtype, device) -> Callable[[str], nn.Module]:
    """``make(kind)``: a new ``"torch"``, ``"fastattn"`` or ``"cell"`` module on ``device`` in ``dtype``, every one
    with the same weights (the fastattn module's initialisation, norm affines perturbed)."""
    _, _, input_size, hidden = shape
    torch.manual_seed(0)
    state = op.fastattn_module(input_size, hidden, **op.kwargs).state_dict()
    for name, value in state.items():
        if name.startswith("norm_"):
            value.add_(0.1 * torch.randn_like(value))

    def make(kind: str) -> nn.Module:
        if kind == "cell":
            module = op.cell(input_size, hidden, **op.kwargs)
            module.load_state_dict({name.removesuffix("_l0"): value for name, value in state.items()}, strict=True)
        else:
            module = (op.fastattn_module if kind == "fastattn" else op.torch_module)(input_size, hidden, **op.kwargs)
            module.load_state_dict(state, strict=True)
        return module.to(device=device, dtype=dtype)

    return make


def output_of(module: nn.Module, run: Callable | None = None) -> Callable[[Tensor], Tensor]:
    """x -> the output sequence of ``run`` (default ``module``), whether it returns (output, state) or output."""
    run = module if run is None else run

    def forward(x: Tensor) -> Tensor:
        out = run(x)
        return out[0] if isinstance(out, tuple) else out

    return forward


def parameters_of(module: nn.Module, names: list[str]) -> list[Tensor]:
    """The parameters ``names`` (the layer's names, e.g. weight_ih_l0) of a layer, loop or cell (weight_ih)."""
    return [getattr(module, name) if hasattr(module, name) else getattr(module, name.removesuffix("_l0"))
            for name in names]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Calls and the agreement check.
# ---------------------------------------------------------------------------------------------------------


def call(mode: str, module: nn.Module, forward: Callable[[Tensor], Tensor], names: list[str], x: Tensor,
         grad: Tensor) -> Callable[[], tuple[Tensor, ...]]:  # fmt: skip
    """A call of one mode: (output,) in eval mode under no_grad, or the gradients of (x, *parameters)."""
    if mode == "forward":
        module.eval()

        def inference() -> tuple[Tensor, ...]:
            with torch.no_grad():
                return (forward(x),)

        return inference
    module.train()  # one layer: no dropout either way
    inputs = (x, *parameters_of(module, names))
    return lambda: torch.autograd.grad(forward(x), inputs, grad)


class Agreement:
    """Checks each provider's first call against the first provider's (whose results it keeps)."""

    def __init__(self, labels: list[str]):
        self.labels = labels  # what each result of a call is: "output", or "grad x", "grad weight_ih_l0", ...
        self.expected: tuple[Tensor, ...] | None = None
        self.source = ""

    def checked(self, name: str, fn: Callable[[], tuple[Tensor, ...]]) -> Callable[[], tuple[Tensor, ...]]:
        """``fn`` whose first call that returns is compared with the expected results (raising if they differ)."""
        pending = True

        def run() -> tuple[Tensor, ...]:
            nonlocal pending
            results = fn()
            if pending:
                pending = False
                self.compare(name, results)
            return results

        return run

    def compare(self, name: str, results: tuple[Tensor, ...]) -> None:
        if self.expected is None:
            self.expected, self.source = tuple(t.detach().clone() for t in results), name
            return
        for label, actual, expected in zip(self.labels, results, self.expected, strict=True):
            magnitude = expected.abs().max().item() if expected.numel() else 1.0
            atol = AGREEMENT_TOLERANCE.get(expected.dtype, LOW_PRECISION_TOLERANCE) * max(1.0, magnitude)
            testing.assert_close(actual.detach(), expected, atol=atol, name=f"{label} differs from {self.source}'s")


# ---------------------------------------------------------------------------------------------------------
# Providers.
# ---------------------------------------------------------------------------------------------------------


def allow_rnn():
    """Dynamo traces torch.nn.LSTM / GRU / RNN inside (it refuses them by default)."""
    return torch._dynamo.config.patch(allow_rnn=True)


def providers(name: str, mode: str, shape, dtype, device, quick: bool) -> Iterator[Provider]:
    """torch, torch.compile, the eager cell loop (lstm, gru, rnn_tanh) and fastattn, on the same x and weights."""
    op = OPS[name]
    seq, batch, input_size, hidden = shape
    make = twins(op, shape, dtype, device)
    x = torch.randn(seq, batch, input_size, dtype=dtype, device=device, requires_grad=mode != "forward")
    grad = torch.randn(seq, batch, hidden, dtype=dtype, device=device)
    names = [param for param, _ in make("torch").named_parameters()]
    check = Agreement(["output"] if mode == "forward" else ["grad x", *(f"grad {param}" for param in names)])

    def provider(provider_name: str, module: nn.Module, forward: Callable, context=contextlib.nullcontext):
        return Provider(provider_name, check.checked(provider_name, call(mode, module, forward, names, x, grad)),
                        context=context)  # fmt: skip

    module = make("torch")
    yield provider("torch", module, output_of(module))
    if quick:
        yield harness.skip("torch.compile", COMPILE_SKIPPED_QUICK)
    elif op.cell is None and tuple(shape) not in COMPILED_LOOP_SHAPES:
        yield harness.skip("torch.compile", COMPILE_SKIPPED_SHAPE)
    else:
        module = make("torch")
        yield provider("torch.compile", module, output_of(module, harness.compiled(module)), context=allow_rnn)
    if op.cell is not None:
        cell = make("cell")
        yield provider("eager-loop", cell, functools.partial(cell_loop, cell))
    module = make("fastattn")
    yield provider("fastattn", module, output_of(module))  # on a GPU: the Triton kernels (fastattn's first choice)
    if device.type == "cuda":
        module = make("fastattn")
        yield provider("fastattn-cuda", module, output_of(module), context=lambda: fastattn.backend("cuda"))


# ---------------------------------------------------------------------------------------------------------
# Targets and registration.
# ---------------------------------------------------------------------------------------------------------


def at(*shapes, dtype: torch.dtype | None = None) -> Callable[[dict], bool]:
    """Whether a row measured one of ``shapes`` (in ``dtype``, when given)."""
    labels = {harness.shape_label(shape) for shape in shapes}
    return lambda row: row["shape"] in labels and (dtype is None or row["dtype"] == harness.dtype_label(dtype))


TARGETS = {  # issue 6
    "lstm": (
        Target("cpu", ("forward",), ("fastattn",), "fp32 LSTM forward 100x64x512x512",
               at(STANDARD, dtype=torch.float32), {"torch": 1.0}),
        Target("cuda", ("forward+backward",), ("fastattn",), "LSTM forward+backward 100x64x512x512, torch = cuDNN",
               at(STANDARD), {"torch": 1.0}),
        Target("cuda", ("forward+backward",), ("fastattn",), "LSTM forward+backward, small launch-bound shapes, "
               "torch = cuDNN", at(*SMALL), {"torch": 1.5}),
    ),
    "layernorm_lstm": tuple(
        Target(device_type, MODES, ("fastattn",), "LayerNorm-LSTM against the eager Python loop (torch)",
               at(*SMALL, STANDARD), {"torch": 5.0})
        for device_type in ("cpu", "cuda")
    ),
}  # fmt: skip


def flops(op: Recurrent, mode: str, shape) -> int:
    """The matmuls' floating-point work of one call (pointwise work left out)."""
    seq, batch, input_size, hidden = shape
    forward = 2 * seq * batch * op.gates * hidden * (input_size + hidden)
    return forward if mode == "forward" else 3 * forward


def register(name: str) -> None:
    op = OPS[name]

    def cases(device: torch.device, quick: bool) -> Iterator[Case]:
        for mode in MODES:
            for dtype in DTYPES[device.type]:
                for shape in SHAPES[(device.type, quick)]:
                    yield Case(
                        op=name, mode=mode, shape=shape, dtype=dtype, x_label="hidden", x_value=shape[3],
                        providers=functools.partial(providers, name, mode, shape, dtype, device, quick),
                        flops=flops(op, mode, shape),
                    )  # fmt: skip

    if op.cell is None:
        notes = NOTES + LAYERNORM_NOTES
    else:
        notes = NOTES + LOOP_NOTES.format(cell=op.cell.__name__, module=op.torch_module.__name__)
    harness.register(name, targets=TARGETS.get(name, ()), notes=notes)(cases)


for _name in OPS:
    register(_name)
