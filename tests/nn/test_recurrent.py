"""fastattn.LSTM, GRU and RNN are drop-ins for torch.nn's (values, gradients, packed sequences, state_dict, errors);
fastattn.LayerNormLSTM against fastattn.reference and against a plain loop written here with F.layer_norm."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastattn
from fastattn import reference
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

INPUT, HIDDEN, PROJ = 5, 7, 3
ATOL = 1e-10
F64 = torch.float64

# kind -> (torch.nn class, fastattn class, extra constructor arguments)
KINDS = {
    "lstm": (torch.nn.LSTM, fastattn.LSTM, {}),
    "gru": (torch.nn.GRU, fastattn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, fastattn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, fastattn.RNN, {"nonlinearity": "relu"}),
}
CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True, bias=False),
    dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
]
LSTM_CONFIGS = [
    dict(proj_size=PROJ, num_layers=2, bidirectional=True),
    dict(proj_size=PROJ, batch_first=True, bias=False),
]
GRID = [(kind, c) for kind in KINDS for c in CONFIGS] + [("lstm", c) for c in LSTM_CONFIGS]
# scenario -> (seq, batch or None for unbatched, initial states given, packed lengths or None, non-contiguous)
SCENARIOS = {
    "seq13-batch3": (13, 3, False, None, False),
    "seq1-batch1-hx": (1, 1, True, None, False),
    "seq13-batch3-hx-noncontig": (13, 3, True, None, True),
    "unbatched": (13, None, False, None, False),
    "unbatched-hx": (1, None, True, None, False),
    "packed-sorted": (13, 3, False, [13, 9, 1], False),
    "packed-unsorted-hx": (13, 3, True, [4, 13, 1], True),
}


def config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items()) or "default"


def make_pair(kind, dtype=F64, **config):
    """(ours, torch's) with the same parameters, drawn by torch's own initialisation from a fixed seed (a ReLU
    RNN drawn at random can leave a gradient all zero)."""
    torch_cls, our_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    theirs = torch_cls(INPUT, HIDDEN, **extra, **config, dtype=dtype)
    ours = our_cls(INPUT, HIDDEN, **extra, **config, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def make_inputs(module, seq, batch, with_states, noncontig=False, dtype=F64, seed=1):
    """(x in the module's layout, hx or None): leaves requiring grad; batch None means unbatched."""
    g = torch.Generator().manual_seed(seed)
    lead = (seq,) if batch is None else ((batch, seq) if module.batch_first else (seq, batch))

    def rand(*shape):
        if not noncontig:
            return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
        # every other column of a transposed tensor: strided in both of the last two dims
        wide = torch.randn(*shape[:-2], 2 * shape[-1], shape[-2], generator=g, dtype=dtype)
        return wide.transpose(-1, -2)[..., ::2].requires_grad_()

    x = rand(*lead, module.input_size)
    if not with_states:
        return x, None
    rows = module.num_layers * (2 if module.bidirectional else 1)
    batch_shape = () if batch is None else (batch,)
    h0 = rand(rows, *batch_shape, module.proj_size or module.hidden_size)
    if isinstance(module, torch.nn.LSTM):
        return x, (h0, rand(rows, *batch_shape, module.hidden_size))
    return x, h0


def flat(result):
    """(output, h_n) or (output, (h_n, c_n)) as a list of tensors (a PackedSequence's data)."""
    output, hidden = result
    output = output.data if isinstance(output, PackedSequence) else output
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def loss_of(tensors, seed=2):
    """A weighted sum of every entry, with fixed random weights, so that each gradient is a generic one."""
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in tensors)


def grads(module, result, leaves):
    params = list(module.parameters())
    return torch.autograd.grad(loss_of(flat(result)), [*leaves, *params])


def leaves_of(x, hx):
    return [x, *([] if hx is None else (hx if isinstance(hx, tuple) else (hx,)))]


def run(module, x, hx, lengths, enforce_sorted):
    if lengths is None:
        return module(x, hx)
    packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=enforce_sorted)
    return module(packed, hx)


# ---------------------------------------------------------------------------------------------------------
# Drop-in parity with torch.nn, float64
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind, config", GRID, ids=[f"{k}-{config_id(c)}" for k, c in GRID])
def test_matches_torch_nn(kind, config, scenario):
    seq, batch, with_states, lengths, noncontig = SCENARIOS[scenario]
    ours, theirs = make_pair(kind, **config)
    x, hx = make_inputs(ours, seq, batch, with_states, noncontig)
    if noncontig:
        assert not x.is_contiguous()
    enforce_sorted = lengths is not None and lengths == sorted(lengths, reverse=True)
    expected = run(theirs, x, hx, lengths, enforce_sorted)
    got = run(ours, x, hx, lengths, enforce_sorted)

    assert type(got) is tuple and type(got[1]) is type(expected[1])
    if lengths is not None:
        assert isinstance(got[0], PackedSequence)
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(got[0], field), getattr(expected[0], field)
            assert (a is None and b is None) or torch.equal(a, b), field
    names = ["output", "h_n", "c_n"]
    for name, a, b in zip(names, flat(got), flat(expected), strict=False):
        assert_close(a, b, atol=ATOL, name=name)

    leaves = leaves_of(x, hx)
    leaf_names = ["x", "h0", "c0"][: len(leaves)] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(leaf_names, grads(ours, got, leaves), grads(theirs, expected, leaves), strict=True):
        assert b.abs().max() > 0, f"torch's gradient of {name} is zero: the test would prove nothing"
        assert_close(a, b, atol=ATOL, name=f"grad {name}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_fused_kernel_runs(kind):
    ours, _ = make_pair(kind)
    x, hx = make_inputs(ours, 4, 2, True)
    with fastattn.record() as calls:
        ours(x, hx)
    assert [(c.op, c.backend) for c in calls] == [("recurrent", "cpu")]


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind", [*sorted(KINDS), "layernorm_lstm"])
def test_fake_tensors_pass_through(kind, train):
    """Under FakeTensorMode (shape propagation, export) the layers give the shapes of a real call: in float32 the CPU
    inference op and the projection matmul the layers call directly need fake kernels of their own."""
    config = dict(num_layers=2, bidirectional=True, dtype=torch.float32)
    ln = kind == "layernorm_lstm"
    module = fastattn.LayerNormLSTM(INPUT, HIDDEN, **config) if ln else make_pair(kind, **config)[0]
    module.train(train)
    x = torch.randn(6, 3, INPUT, requires_grad=train)
    with torch.set_grad_enabled(train):
        real = flat(module(x))
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = flat(module(x))
            grads = torch.autograd.grad(fake[0].sum(), [x, *module.parameters()]) if train else ()
    assert all(isinstance(t, FakeTensor) for t in fake)
    assert [t.shape for t in fake] == [t.shape for t in real]
    assert [g.shape for g in grads] == ([x.shape, *(p.shape for p in module.parameters())] if train else [])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_without_a_fused_kernel_torchs_own_code_runs_and_says_so(kind, monkeypatch):
    """Where no fused kernel can run (here: the CPU and Triton ones refuse), the drop-ins run torch.nn's forward
    (cuDNN or oneDNN), not the slow reference loop; the LayerNorm-LSTM, which torch.nn lacks, runs the reference."""
    from fastattn.ops import recurrent as ops

    for name in ("cpu", "triton"):
        monkeypatch.setitem(ops.CHECKS, name, lambda *_: "refused by this test")
    ours, theirs = make_pair(kind)
    x, hx = make_inputs(ours, 4, 2, True)
    with fastattn.record() as calls:
        got = ours(x, hx)
    assert [(c.op, c.backend) for c in calls] == [("recurrent", "torch.nn")]
    assert "refused by this test" in calls[0].skipped["fastattn"]
    for a, b in zip(flat(got), flat(theirs(x, hx)), strict=True):
        assert torch.equal(a, b)
    ln = fastattn.LayerNormLSTM(INPUT, HIDDEN, dtype=F64)
    with fastattn.record() as calls:
        ln(x, hx if kind == "lstm" else None)
    assert [(c.op, c.backend) for c in calls] == [("recurrent", "reference")]


@pytest.mark.parametrize("kind, config", GRID, ids=[f"{k}-{config_id(c)}" for k, c in GRID])
def test_state_dict_repr_and_initialisation_are_torchs(kind, config):
    torch_cls, our_cls, extra = KINDS[kind]
    torch.manual_seed(7)
    theirs = torch_cls(INPUT, HIDDEN, **extra, **config)
    torch.manual_seed(7)
    ours = our_cls(INPUT, HIDDEN, **extra, **config)
    assert isinstance(ours, torch_cls) and type(ours) is not torch_cls
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    assert repr(ours) == repr(theirs)
    other = our_cls(INPUT, HIDDEN, **extra, **config)
    other.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in other.state_dict().items())


def test_from_torch_shares_parameters():
    theirs = torch.nn.GRU(INPUT, HIDDEN, num_layers=2, dtype=F64)
    ours = fastattn.GRU.from_torch(theirs)
    assert ours.weight_hh_l1 is theirs.weight_hh_l1 and type(theirs) is torch.nn.GRU
    x = torch.randn(4, 2, INPUT, dtype=F64)
    for a, b in zip(flat(ours(x)), flat(theirs(x)), strict=True):
        assert_close(a, b, atol=ATOL)


def test_functional_call_uses_the_given_parameters():
    ours, theirs = make_pair("lstm", num_layers=2)
    x = torch.randn(6, 2, INPUT, dtype=F64)
    doubled = {name: 2 * p.detach() for name, p in theirs.named_parameters()}
    got = torch.func.functional_call(ours, doubled, (x,))
    expected = torch.func.functional_call(theirs, doubled, (x,))
    for a, b in zip(flat(got), flat(expected), strict=True):
        assert_close(a, b, atol=ATOL)
    assert_close(flat(ours(x))[0], flat(theirs(x))[0], atol=ATOL)  # and back to its own parameters


# ---------------------------------------------------------------------------------------------------------
# Dropout between layers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_between_layers(kind):
    ours, theirs = make_pair(kind, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(9, 3, INPUT, dtype=F64)
    ours.eval()
    theirs.eval()
    evaluated = flat(ours(x))
    for a, b in zip(evaluated, flat(theirs(x)), strict=True):
        assert_close(a, b, atol=ATOL, name="eval")

    ours.train()
    torch.manual_seed(3)
    first = flat(ours(x))
    torch.manual_seed(3)
    again = flat(ours(x))
    torch.manual_seed(4)
    other = flat(ours(x))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), "not reproducible under manual_seed"
    assert (first[0] - evaluated[0]).abs().max() > 1e-3, "training mode with dropout 0.4 equals eval mode"
    assert (first[0] - other[0]).abs().max() > 1e-3, "another seed gives the same dropout"
    # The first layer's forward state sees no dropout: its h_n is eval's.
    assert_close(first[1][0], evaluated[1][0], atol=ATOL, name="h_n of layer 0")
    # Gradients flow through the dropped-out stack.
    x.requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(flat(ours(x))), [x])
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_training_without_dropout_equals_torch(kind):
    ours, theirs = make_pair(kind, num_layers=2, dropout=0.0)
    assert ours.training and theirs.training
    x = torch.randn(5, 2, INPUT, dtype=F64)
    for a, b in zip(flat(ours(x)), flat(theirs(x)), strict=True):
        assert_close(a, b, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# float32 by the error-ratio rule
# ---------------------------------------------------------------------------------------------------------


FLOAT32_GRID = [(k, dict(num_layers=2, bidirectional=True)) for k in KINDS] + [
    ("lstm", dict(num_layers=2, proj_size=PROJ, batch_first=True))
]


@pytest.mark.parametrize("kind, config", FLOAT32_GRID, ids=[f"{k}-{config_id(c)}" for k, c in FLOAT32_GRID])
def test_float32_error_ratio(kind, config):
    torch_cls, our_cls, extra = KINDS[kind]
    theirs64 = torch_cls(INPUT, HIDDEN, **extra, **config, dtype=F64)
    theirs32 = copy.deepcopy(theirs64).float()
    ours32 = our_cls(INPUT, HIDDEN, **extra, **config)
    ours32.load_state_dict(theirs32.state_dict())
    x64, hx64 = make_inputs(theirs64, 13, 3, True)
    x32 = x64.detach().float().requires_grad_()
    hx32 = tuple(t.detach().float() for t in hx64) if isinstance(hx64, tuple) else hx64.detach().float()

    truth, baseline, got = theirs64(x64, hx64), theirs32(x32, hx32), ours32(x32, hx32)
    for name, a, b, t in zip(["output", "h_n", "c_n"], flat(got), flat(baseline), flat(truth), strict=False):
        assert_error_ratio(a, t, b, name=name)
    names = ["x", *[n for n, _ in theirs64.named_parameters()]]
    truth_grads = torch.autograd.grad(loss_of(flat(truth)), [x64, *theirs64.parameters()])
    base_grads = torch.autograd.grad(loss_of(flat(baseline)), [x32, *theirs32.parameters()])
    our_grads = torch.autograd.grad(loss_of(flat(got)), [x32, *ours32.parameters()])
    for name, a, b, t in zip(names, our_grads, base_grads, truth_grads, strict=True):
        assert_error_ratio(a, t, b, ratio=GRADIENT_RATIO, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------------------
# Bad input: the same kinds of exception as torch.nn
# ---------------------------------------------------------------------------------------------------------


def bad_inputs(kind):
    """name -> (input, hx) that torch.nn refuses."""
    lstm = kind == "lstm"
    x = torch.randn(4, 3, INPUT, dtype=F64)
    h = torch.randn(1, 3, HIDDEN, dtype=F64)
    state = (lambda h0, c0=h: (h0, c0)) if lstm else (lambda h0, c0=None: h0)
    cases = {
        "wrong input size": (torch.randn(4, 3, INPUT + 1, dtype=F64), None),
        "1-D input": (torch.randn(INPUT, dtype=F64), None),
        "4-D input": (torch.randn(2, 4, 3, INPUT, dtype=F64), None),
        "input dtype": (x.float(), None),
        "h0 batch": (x, state(torch.randn(1, 2, HIDDEN, dtype=F64))),
        "h0 layers": (x, state(torch.randn(2, 3, HIDDEN, dtype=F64))),
        "h0 width": (x, state(torch.randn(1, 3, HIDDEN + 1, dtype=F64))),
        "h0 2-D for batched input": (x, state(h[0], h[0]) if lstm else h[0]),
        "h0 3-D for unbatched input": (x[:, 0], state(h, h[0]) if lstm else h),
        "h0 dtype": (x, state(h.float())),
        "packed h0 batch": (pack_padded_sequence(x, [4, 3, 2]), state(torch.randn(1, 2, HIDDEN, dtype=F64))),
    }
    if lstm:
        cases["c0 batch"] = (x, (h, torch.randn(1, 2, HIDDEN, dtype=F64)))
        cases["c0 width"] = (x, (h, torch.randn(1, 3, HIDDEN - 1, dtype=F64)))
    return cases


BAD = [(kind, case) for kind in KINDS for case in bad_inputs(kind)]


@pytest.mark.parametrize("kind, case", BAD, ids=[f"{k}-{c}" for k, c in BAD])
def test_bad_input_raises_like_torch(kind, case):
    ours, theirs = make_pair(kind)
    x, hx = bad_inputs(kind)[case]
    try:
        theirs(x, hx)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        expected = type(error)
    else:
        raise AssertionError(f"torch.nn accepts {case}: the case tests nothing")
    with pytest.raises(expected):
        ours(x, hx)


def test_dtype_errors_name_the_state():
    ours, _ = make_pair("lstm")
    x, h = torch.randn(4, 3, INPUT, dtype=F64), torch.randn(1, 3, HIDDEN, dtype=F64)
    with pytest.raises(RuntimeError, match="h_0 dtype"):
        ours(x, (h.float(), h))
    # torch.nn.LSTM on CPU silently takes a c_0 of another dtype; fastattn refuses it clearly.
    with pytest.raises(RuntimeError, match="c_0 dtype"):
        ours(x, (h, h.float()))
    with pytest.raises(TypeError, match=r"hx must be None or a tuple \(h_0, c_0\)"):
        ours(x, h)


def test_unsorted_lengths_with_enforce_sorted_fail_in_packing():
    """pack_padded_sequence itself refuses unsorted lengths with enforce_sorted=True, before any module runs."""
    x = torch.randn(4, 3, INPUT)
    with pytest.raises(RuntimeError, match="enforce_sorted"):
        torch.nn.LSTM(INPUT, HIDDEN)(pack_padded_sequence(x, [2, 4, 3]))
    with pytest.raises(RuntimeError, match="enforce_sorted"):
        fastattn.LSTM(INPUT, HIDDEN)(pack_padded_sequence(x, [2, 4, 3]))


# ---------------------------------------------------------------------------------------------------------
# LayerNormLSTM
# ---------------------------------------------------------------------------------------------------------


def randomise(module, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def expected_ln_lstm_keys(num_layers, bidirectional, bias, proj_size):
    keys = []
    for layer in range(num_layers):
        for suffix in ["", "_reverse"] if bidirectional else [""]:
            names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
            keys += [f"{n}_l{layer}{suffix}" for n in names + (["weight_hr"] if proj_size else [])]
    for layer in range(num_layers):
        for suffix in ["", "_reverse"] if bidirectional else [""]:
            keys += [f"norm_{n}_{p}_l{layer}{suffix}" for n in ("ih", "hh", "c") for p in ("weight", "bias")]
    return keys


@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True, bias=False, proj_size=PROJ)],
                         ids=config_id)  # fmt: skip
def test_layer_norm_lstm_parameters(config):
    torch.manual_seed(11)
    lstm = torch.nn.LSTM(INPUT, HIDDEN, **config)
    torch.manual_seed(11)
    ours = fastattn.LayerNormLSTM(INPUT, HIDDEN, **config)
    config = {"num_layers": 1, "bidirectional": False, "bias": True, "proj_size": 0} | config
    state = ours.state_dict()
    assert list(state) == expected_ln_lstm_keys(**config)
    for name, value in lstm.state_dict().items():  # the LSTM's own parameters: torch's draws
        assert torch.equal(state[name], value), name
    for name, value in state.items():
        if name.startswith("norm_"):
            size = HIDDEN if name.startswith("norm_c_") else 4 * HIDDEN
            assert value.shape == (size,)
            assert torch.equal(value, torch.ones(size) if "_weight_" in name else torch.zeros(size)), name
    assert len(ours._flat_weights) == len(lstm._flat_weights)  # cuDNN's flat weights never see the norms
    ours.flatten_parameters()
    assert repr(ours) == repr(lstm).replace("LSTM(", "LayerNormLSTM(")[:-1] + ", eps=1e-05)"
    randomise(ours).reset_parameters()
    bound = HIDDEN**-0.5
    for name, value in ours.named_parameters():
        if name.startswith("norm_"):
            assert torch.equal(value, torch.full_like(value, 1.0 if "_weight_" in name else 0.0)), name
        else:
            assert value.abs().max() <= bound and value.std() > bound / 4, name
    fresh = fastattn.LayerNormLSTM(INPUT, HIDDEN, **config)
    fresh.load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(lstm.state_dict(), strict=True)


LN_CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True, bias=False, proj_size=PROJ),
    dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=PROJ, eps=1e-2),
]


@pytest.mark.parametrize("with_states", [False, True], ids=["hx-none", "hx"])
@pytest.mark.parametrize("config", LN_CONFIGS, ids=config_id)
def test_layer_norm_lstm_matches_reference(config, with_states):
    module = randomise(fastattn.LayerNormLSTM(INPUT, HIDDEN, **config, dtype=F64))
    x, hx = make_inputs(module, 13, 3, with_states, noncontig=True)
    expected = reference.recurrent("layernorm_lstm", x, hx, dict(module.named_parameters()), module.num_layers,
                                   module.bidirectional, module.batch_first, eps=module.eps)  # fmt: skip
    got = module(x, hx)
    for name, a, b in zip(["output", "h_n", "c_n"], flat(got), flat(expected), strict=True):
        assert_close(a, b, atol=ATOL, name=name)


def test_layer_norm_lstm_packed_and_unbatched_match_reference():
    module = randomise(fastattn.LayerNormLSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, dtype=F64))
    x, hx = make_inputs(module, 13, 3, True)
    lengths = torch.tensor([4, 13, 1])
    params = dict(module.named_parameters())
    expected = reference.recurrent("layernorm_lstm", x, hx, params, 2, True, lengths=lengths)
    got = module(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
    output, _ = pad_packed_sequence(got[0], total_length=13)  # back in the caller's batch order
    for name, a, b in zip(["output", "h_n", "c_n"], [output, *got[1]], flat(expected), strict=True):
        assert_close(a, b, atol=ATOL, name=name)

    single = module(x[:, 1], tuple(t[:, 1] for t in hx))
    for name, a, b in zip(["output", "h_n", "c_n"], flat(single), flat(module(x, hx)), strict=True):
        assert_close(a, b[:, 1], atol=ATOL, name=f"unbatched {name}")


def test_layer_norm_lstm_gradcheck():
    module = randomise(fastattn.LayerNormLSTM(3, 2, num_layers=2, bidirectional=True, proj_size=1, dtype=F64))
    names = [n for n, _ in module.named_parameters()]
    x, hx = make_inputs(module, 3, 2, True)

    def fn(x, h0, c0, *params):
        return flat(torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x, (h0, c0))))

    params = [p.detach().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradcheck(fn, (x, *hx, *params))


def ln_lstm_loop(module, x, h, c):
    """One layer, one direction of Ba et al.'s LayerNorm-LSTM written out with F.layer_norm: x (seq, batch, in)."""
    hidden, eps = module.hidden_size, module.eps
    p = {name[: -len("_l0")]: value for name, value in module.named_parameters()}
    outs = []
    for x_t in x:
        gates = (
            F.layer_norm(x_t @ p["weight_ih"].T, (4 * hidden,), p["norm_ih_weight"], p["norm_ih_bias"], eps)
            + F.layer_norm(h @ p["weight_hh"].T, (4 * hidden,), p["norm_hh_weight"], p["norm_hh_bias"], eps)
            + p["bias_ih"]
            + p["bias_hh"]
        )
        i, f, g, o = gates.chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * F.layer_norm(c, (hidden,), p["norm_c_weight"], p["norm_c_bias"], eps).tanh()
        h = h @ p["weight_hr"].T if "weight_hr" in p else h
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("proj_size, eps", [(0, 1e-5), (PROJ, 0.5)], ids=["plain", "proj-eps0.5"])
def test_layer_norm_lstm_with_identity_norms_is_normalised(proj_size, eps):
    """Norm weights 1 and biases 0 (the initialisation) still normalise: not torch.nn.LSTM, but the loop above."""
    torch.manual_seed(12)
    lstm = torch.nn.LSTM(INPUT, HIDDEN, proj_size=proj_size, dtype=F64)
    torch.manual_seed(12)
    module = fastattn.LayerNormLSTM(INPUT, HIDDEN, proj_size=proj_size, eps=eps, dtype=F64)
    x, (h0, c0) = make_inputs(module, 13, 3, True)
    output, (h_n, c_n) = module(x, (h0, c0))
    expected = ln_lstm_loop(module, x, h0[0], c0[0])
    for name, a, b in zip(["output", "h_n", "c_n"], [output, h_n[0], c_n[0]], expected, strict=True):
        assert_close(a, b, atol=ATOL, name=name)
    assert (output - lstm(x, (h0, c0))[0]).abs().max() > 1e-2, "the norms changed nothing"


def test_layer_norm_lstm_moves_and_copies():
    module = fastattn.LayerNormLSTM(INPUT, HIDDEN, num_layers=2, dropout=0.5)
    module.double()
    assert module.norm_c_weight_l1.dtype == F64 and module._flat_weights[0].dtype == F64
    clone = copy.deepcopy(module)
    x = torch.randn(6, 2, INPUT, dtype=F64)
    torch.manual_seed(0)
    a = module(x)[0]
    torch.manual_seed(0)
    assert torch.equal(a, clone(x)[0])
    with pytest.raises(ValueError, match="eps must be a positive number"):
        fastattn.LayerNormLSTM(INPUT, HIDDEN, eps=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: cuDNN flattens the weights only there")
def test_cuda_after_cudnn_flattening():
    x = torch.randn(9, 3, INPUT, dtype=F64)
    for kind in KINDS:
        ours, theirs = make_pair(kind, num_layers=2, bidirectional=True)
        ours.cuda()
        theirs.cuda()
        for a, b in zip(flat(ours(x.cuda())), flat(theirs(x.cuda())), strict=True):
            assert_close(a, b, atol=ATOL, name=kind)
    module = randomise(fastattn.LayerNormLSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, dtype=F64))
    expected = module(x)
    module.cuda()
    norms = {id(p) for n, p in module.named_parameters() if n.startswith("norm_")}
    assert not norms & {id(w) for w in module._flat_weights}
    for a, b in zip(flat(module(x.cuda())), flat(expected), strict=True):
        assert_close(a.cpu(), b, atol=ATOL)
