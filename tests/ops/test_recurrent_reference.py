"""The recurrent references (fastattn.reference: LSTM, GRU, tanh/ReLU RNN, LayerNorm-LSTM) in float64 against
torch.nn.LSTM / GRU / RNN (values, packed sequences, dropout, gradients) and, for the LayerNorm-LSTM, which torch
lacks, against a plain loop written here with torch.nn.functional.layer_norm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastattn import reference
from fastattn.testing import assert_close

KINDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
INPUT, HIDDEN, PROJ = 5, 7, 3
ATOL = 1e-12
# (seq, batch, initial states given)
SHAPES = [(1, 1, True), (13, 3, False), (13, 1, True), (1, 3, False)]


def torch_rnn(kind, num_layers=1, bidirectional=False, batch_first=False, proj_size=0, bias=True, dropout=0.0):
    """A float64 torch.nn module of the kind with seeded weights."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    if kind.startswith("rnn"):
        module = nn.RNN(INPUT, HIDDEN, nonlinearity=kind[4:], dropout=dropout, **kwargs)
    elif kind == "gru":
        module = nn.GRU(INPUT, HIDDEN, dropout=dropout, **kwargs)
    else:
        module = nn.LSTM(INPUT, HIDDEN, proj_size=proj_size, dropout=dropout, **kwargs)
    return module.double()


def inputs(module, seq, batch, with_states, seed=1):
    """(x in the module's layout, hx or None) in float64."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq, INPUT) if module.batch_first else (seq, batch, INPUT)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if not with_states:
        return x, None
    rows = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(rows, batch, module.proj_size or HIDDEN, generator=g, dtype=torch.float64)
    if isinstance(module, nn.LSTM):
        return x, (h0, torch.randn(rows, batch, HIDDEN, generator=g, dtype=torch.float64))
    return x, h0


def run_reference(kind, module, x, hx, **kwargs):
    return reference.recurrent(
        kind, x, hx, dict(module.named_parameters()), module.num_layers, module.bidirectional,
        module.batch_first, **kwargs,
    )  # fmt: skip


def assert_same(ours, theirs, name="output"):
    """Compare (output, h_n) or (output, (h_n, c_n)) structures."""
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs), name
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{name}[{i}]")
    else:
        assert_close(ours, theirs, atol=ATOL, name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"seq{s[0]}-batch{s[1]}-{'states' if s[2] else 'zeros'}")
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["1layer", "2layers"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_nn(kind, num_layers, bidirectional, batch_first, shape):
    seq, batch, with_states = shape
    module = torch_rnn(kind, num_layers, bidirectional, batch_first)
    x, hx = inputs(module, seq, batch, with_states)
    assert_same(run_reference(kind, module, x, hx), module(x, hx))


@pytest.mark.parametrize("with_states", [False, True], ids=["zeros", "states"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lstm_projection_matches_torch_nn(bidirectional, with_states):
    module = torch_rnn("lstm", 2, bidirectional, proj_size=PROJ)
    x, hx = inputs(module, 13, 3, with_states)
    assert_same(run_reference("lstm", module, x, hx), module(x, hx))


@pytest.mark.parametrize("kind", KINDS)
def test_without_bias_matches_torch_nn(kind):
    module = torch_rnn(kind, 2, True, bias=False)
    x, hx = inputs(module, 13, 3, True)
    assert_same(run_reference(kind, module, x, hx), module(x, hx))


@pytest.mark.parametrize("lengths", [[5, 13, 1], [9, 4, 1]], ids=["longest-full", "all-short"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize(
    "kind, config",
    [(k, c) for k in KINDS for c in [(1, False, 0), (2, True, 0)]] + [("lstm", (2, True, PROJ))],
    ids=[f"{k}-{c}" for k in KINDS for c in ["1uni", "2bi"]] + ["lstm-2bi-proj"],
)
def test_lengths_match_packed_sequence(kind, config, batch_first, lengths):
    """Unsorted lengths through pack_padded_sequence(enforce_sorted=False), padded back to the full length."""
    num_layers, bidirectional, proj_size = config
    module = torch_rnn(kind, num_layers, bidirectional, batch_first, proj_size)
    x, hx = inputs(module, 13, 3, True)
    lengths = torch.tensor(lengths)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, h_n = module(packed, hx)
    out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=13)
    assert_same(run_reference(kind, module, x, hx, lengths=lengths), (out, h_n))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_masks_match_torch_nn(kind, batch_first):
    """torch.nn on CPU draws each inter-layer mask as bernoulli_(1 - p) on a tensor like that layer's
    time-major output; drawn again from the same seed, the explicit masks must give torch.nn's outputs."""
    p, seq, batch, layers = 0.4, 13, 3, 3
    module = torch_rnn(kind, layers, True, batch_first, dropout=p).train()
    x, hx = inputs(module, seq, batch, True)
    torch.manual_seed(123)
    expected = module(x, hx)
    torch.manual_seed(123)
    masks = [torch.empty(seq, batch, 2 * HIDDEN, dtype=torch.float64).bernoulli_(1 - p) for _ in range(layers - 1)]
    masks = [(m.transpose(0, 1) if batch_first else m).bool() for m in masks]
    assert_same(run_reference(kind, module, x, hx, dropout_mask=masks, dropout_p=p), expected)
    assert not torch.allclose(run_reference(kind, module, x, hx)[0], expected[0]), "dropout changed nothing"


def flat_outputs(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize(
    "kind, config",
    [("lstm", (2, True, PROJ, True)), ("gru", (2, True, 0, True)), ("rnn_tanh", (2, False, 0, False)),
     ("rnn_relu", (1, True, 0, True))],
    ids=["lstm-2bi-proj-lengths", "gru-2bi-lengths", "rnn_tanh-2uni", "rnn_relu-1bi-lengths"],
)  # fmt: skip
def test_gradients_match_torch_nn(kind, config):
    """d(sum of outputs and final states times random weights) / d(x, h0, c0, every parameter)."""
    num_layers, bidirectional, proj_size, packed = config
    module = torch_rnn(kind, num_layers, bidirectional, proj_size=proj_size)
    x, hx = inputs(module, 13, 3, True)
    states = list(hx) if isinstance(hx, tuple) else [hx]
    leaves = [x, *states, *module.parameters()]
    for t in leaves:
        t.requires_grad_(True)
    lengths = torch.tensor([6, 13, 2]) if packed else None
    if packed:
        out, state = module(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        theirs = flat_outputs((pad_packed_sequence(out, total_length=13)[0], state))
    else:
        theirs = flat_outputs(module(x, hx))
    ours = flat_outputs(run_reference(kind, module, x, hx, lengths=lengths))
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in theirs]
    grad_theirs = torch.autograd.grad(sum((t * w).sum() for t, w in zip(theirs, weights, strict=True)), leaves)
    grad_ours = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ours, weights, strict=True)), leaves)
    names = ["x", *(f"state{i}" for i in range(len(states))), *(n for n, _ in module.named_parameters())]
    for name, a, b in zip(names, grad_ours, grad_theirs, strict=True):
        assert b.abs().max() > 0, f"torch's gradient of {name} is zero: the test would prove nothing"
        assert_close(a, b, atol=ATOL, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------------------
# LayerNorm-LSTM: no torch.nn twin, so a plain loop here with F.layer_norm is the check.
# ---------------------------------------------------------------------------------------------------------


def ln_lstm_params(num_layers, bidirectional, input_size=INPUT, hidden=HIDDEN, bias=True, seed=3):
    """float64 parameters under the reference's names: torch.nn.LSTM's plus non-trivial norm weights/biases."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5
    params = {}
    for layer in range(num_layers):
        for suffix in ["", "_reverse"] if bidirectional else [""]:
            s = f"_l{layer}{suffix}"
            width = input_size if layer == 0 else hidden * (2 if bidirectional else 1)
            params[f"weight_ih{s}"], params[f"weight_hh{s}"] = rand(4 * hidden, width), rand(4 * hidden, hidden)
            if bias:
                params[f"bias_ih{s}"], params[f"bias_hh{s}"] = rand(4 * hidden), rand(4 * hidden)
            for name, size in [("ih", 4 * hidden), ("hh", 4 * hidden), ("c", hidden)]:
                params[f"norm_{name}_weight{s}"] = 1 + rand(size)
                params[f"norm_{name}_bias{s}"] = rand(size)
    return params


def ln_lstm_direction(x, h, c, p, s, eps=1e-5):
    """Ba et al.'s LayerNorm-LSTM written out: x (seq, batch, in) in time order; returns (output, h, c)."""
    hidden = c.shape[-1]
    outs = []
    for x_t in x:
        gates = (
            F.layer_norm(x_t @ p[f"weight_ih{s}"].T, (4 * hidden,), p[f"norm_ih_weight{s}"], p[f"norm_ih_bias{s}"], eps)
            + F.layer_norm(h @ p[f"weight_hh{s}"].T, (4 * hidden,), p[f"norm_hh_weight{s}"], p[f"norm_hh_bias{s}"], eps)
            + p.get(f"bias_ih{s}", 0)
            + p.get(f"bias_hh{s}", 0)
        )
        i, f, g, o = gates.chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * F.layer_norm(c, (hidden,), p[f"norm_c_weight{s}"], p[f"norm_c_bias{s}"], eps).tanh()
        outs.append(h)
    return torch.stack(outs), h, c


def ln_lstm_loop(x, hx, p, num_layers, bidirectional):
    """The stack of ln_lstm_direction, directions concatenated, as torch.nn stacks layers."""
    h0, c0 = hx
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d, suffix in enumerate(["", "_reverse"] if bidirectional else [""]):
            k = layer * (2 if bidirectional else 1) + d
            seq_in = x.flip(0) if d else x
            out, h, c = ln_lstm_direction(seq_in, h0[k], c0[k], p, f"_l{layer}{suffix}")
            outs.append(out.flip(0) if d else out)
            h_n.append(h)
            c_n.append(c)
        x = torch.cat(outs, dim=-1)
    return x, (torch.stack(h_n), torch.stack(c_n))


def ln_lstm_states(num_layers, bidirectional, batch, seed=4):
    g = torch.Generator().manual_seed(seed)
    rows = num_layers * (2 if bidirectional else 1)
    return tuple(torch.randn(rows, batch, HIDDEN, generator=g, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("seq, batch", [(1, 1), (13, 3)], ids=["seq1-batch1", "seq13-batch3"])
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True)], ids=["1uni", "2bi"])
def test_layer_norm_lstm_matches_plain_loop(num_layers, bidirectional, seq, batch, bias):
    p = ln_lstm_params(num_layers, bidirectional, bias=bias)
    x = torch.randn(seq, batch, INPUT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hx = ln_lstm_states(num_layers, bidirectional, batch)
    expected = ln_lstm_loop(x, hx, p, num_layers, bidirectional)
    assert_same(reference.recurrent("layernorm_lstm", x, hx, p, num_layers, bidirectional), expected)


def test_layer_norm_lstm_lengths_stop_each_sequence():
    """With lengths, sequence b's output and final state are those of the loop run on its first lengths[b]
    steps alone (both directions), and its output is zero past them."""
    p = ln_lstm_params(2, True)
    x = torch.randn(13, 3, INPUT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hx = ln_lstm_states(2, True, 3)
    lengths = [6, 13, 1]
    out, (h_n, c_n) = reference.recurrent("layernorm_lstm", x, hx, p, 2, True, lengths=torch.tensor(lengths))
    for b, n in enumerate(lengths):
        sub = tuple(s[:, b : b + 1] for s in hx)
        out_b, (h_b, c_b) = ln_lstm_loop(x[:n, b : b + 1], sub, p, 2, True)
        assert_close(out[:n, b : b + 1], out_b, atol=ATOL, name=f"output of sequence {b}")
        assert_close(out[n:, b], torch.zeros_like(out[n:, b]), atol=0, name=f"padding of sequence {b}")
        assert_close(h_n[:, b : b + 1], h_b, atol=ATOL, name=f"h_n of sequence {b}")
        assert_close(c_n[:, b : b + 1], c_b, atol=ATOL, name=f"c_n of sequence {b}")


def test_layer_norm_lstm_cell_without_norms_is_the_lstm_cell():
    """All three norms off and bias = b_ih + b_hh: exactly torch.nn.LSTMCell."""
    torch.manual_seed(0)
    cell = nn.LSTMCell(INPUT, HIDDEN).double()
    g = torch.Generator().manual_seed(6)
    x, h, c = (torch.randn(3, n, generator=g, dtype=torch.float64) for n in (INPUT, HIDDEN, HIDDEN))
    ours = reference.layer_norm_lstm_cell(
        x @ cell.weight_ih.T, h, c, cell.weight_hh, cell.bias_ih + cell.bias_hh, None, None, None
    )
    assert_same(ours, cell(x, (h, c)))
    assert_same(reference.lstm_cell(x @ cell.weight_ih.T + cell.bias_ih, h, c, cell.weight_hh, cell.bias_hh), ours)


def test_layer_norm_lstm_gate_norm_is_over_all_gates():
    """Ba et al. normalise the 4H gate pre-activations together: with identity norms, zero h, no bias and
    norm_c off, the pre-activations are layer_norm(x W_ih^T) over 4H, so the cell equals lstm_cell fed that
    row-normalised projection (mean 0, variance 1 over 4H, not per gate)."""
    g = torch.Generator().manual_seed(7)
    x_proj = torch.randn(3, 4 * HIDDEN, generator=g, dtype=torch.float64) * 3 + 2
    w_hh = torch.randn(4 * HIDDEN, HIDDEN, generator=g, dtype=torch.float64)
    h, c = torch.zeros(3, HIDDEN, dtype=torch.float64), torch.randn(3, HIDDEN, generator=g, dtype=torch.float64)
    identity = (torch.ones(4 * HIDDEN, dtype=torch.float64), torch.zeros(4 * HIDDEN, dtype=torch.float64))
    ours = reference.layer_norm_lstm_cell(x_proj, h, c, w_hh, None, identity, identity, None)
    z = (x_proj - x_proj.mean(-1, keepdim=True)) / torch.sqrt(x_proj.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert_same(ours, reference.lstm_cell(z, h, c, w_hh))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        reference.recurrent("lstm2", torch.zeros(2, 1, INPUT), None, {"weight_hh_l0": torch.zeros(4, 1)})
    with pytest.raises(ValueError, match="nonlinearity"):
        reference.rnn_cell(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2, 2), nonlinearity="gelu")
