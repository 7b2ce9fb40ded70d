"""Positional encodings (sinusoidal, learned, token + position embeddings) and ALiBi slopes on every backend,
against float64 references with the error-ratio rule; the baseline is plain PyTorch in the tested dtype (for the
sinusoid: the PyTorch tutorial's table, built in float32 and cast to the dtype)."""

import math

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.ops import positional as ops
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (batch, seq, d): d = 1, 7, 100 and seq = 1, 7, 113 as the issue asks.
SHAPES = [(2, 1, 7), (3, 7, 1), (2, 113, 100), (1, 113, 7), (2, 7, 100)]
SEED, P = 0x1234_5678_9ABC, 0.3


def _skip_unsupported(name, dtype):
    if dtype == torch.float64 and name == "cuda":
        pytest.skip("the cuda backend runs float16/bfloat16/float32 (float64 goes to the next backend)")


def _shape_id(shape):
    return "x".join(map(str, shape))


def make_x(shape, batch_first, dtype, device, seed=0):
    """x of logical (batch, seq, d) shape laid out batch-first or seq-first."""
    g = torch.Generator().manual_seed(seed)
    batch, seq, d = shape
    x = torch.randn(batch, seq, d, generator=g) if batch_first else torch.randn(seq, batch, d, generator=g)
    return x.to(device=device, dtype=dtype)


def tutorial_table(positions, d, dtype, base=10000.0):
    """The PyTorch transformer tutorial's PositionalEncoding rows at int positions (...): its float32 maths
    (float64 for float64), cast to dtype; an odd d gets one more sin column."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    div_term = torch.exp(torch.arange(0, d, 2, dtype=work, device=positions.device) * (-math.log(base) / d))
    angle = positions.to(work)[..., None] * div_term
    pe = torch.zeros(*positions.shape, d, dtype=work, device=positions.device)
    pe[..., 0::2] = torch.sin(angle)
    pe[..., 1::2] = torch.cos(angle[..., : d // 2])
    return pe.to(dtype)


def baseline_add(x, pe, scale, keep=None, p=0.0):
    """Plain PyTorch in x's dtype: x * scale + pe, then dropout with the given mask."""
    z = x * scale + pe
    return z if keep is None else z * keep.to(x.dtype) / (1.0 - p)


def keep_mask(x, p=P, seed=SEED):
    """The kernels' dropout mask for x: rows = the leading dims flattened."""
    return reference.elementwise_dropout_mask(seed, p, math.prod(x.shape[:-1]), x.shape[-1], x.device).view(x.shape)


def seed_tensor(seed=SEED):
    return torch.tensor([seed], dtype=torch.int64)


def offsets_for(kind, batch, device):
    """(int offset, offsets tensor or None) for an offset kind: a plain int, a large int, per-sequence offsets."""
    if kind == "offset0":
        return 0, None
    if kind == "offset1000":
        return 1000, None
    return 5, torch.arange(batch, device=device, dtype=torch.int64) * 37 + 3


def positions_of(x, batch_first, offset, offsets):
    batch, seq = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    return reference.sequence_positions(batch, seq, offset, offsets, batch_first, x.device)


def grads(fn, inputs, grad):
    """(out, d out / d inputs) for fn(*inputs) with the incoming gradient grad."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad.to(out.dtype)))


# ---------------------------------------------------------------------------------------------------------
# Sinusoidal.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset_kind", ["offset0", "offset1000", "offsets"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_sinusoidal_forward(backend_device, shape, dtype, batch_first, offset_kind):
    name, device = backend_device
    _skip_unsupported(name, dtype)
    x = make_x(shape, batch_first, dtype, device)
    offset, offsets = offsets_for(offset_kind, shape[0], device)
    with fastattn.record() as calls:
        out = fastattn.sinusoidal_positional_encoding(
            x, scale=0.7, offset=offset if offsets is None else offsets + offset, batch_first=batch_first
        )
    assert [c.backend for c in calls] == [name]
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    pos = positions_of(x, batch_first, offset, offsets)
    truth = reference.sinusoidal_encoding(x.double(), pos, 0.7)
    assert_error_ratio(out, truth, baseline_add(x, tutorial_table(pos, shape[2], dtype), 0.7))


@pytest.mark.parametrize(
    "start,ulps", [(0, 1), (10**5, 1), (10**6, 1), (10**7, 1), (-(10**7), 1), (10**9, 2)], ids=lambda v: str(v)
)
def test_sinusoidal_precision(backend_device, start, ulps):
    """No length limit, and no precision lost far out: the angle is reduced in float64, so the float32 encoding
    stays within one float32 ulp of the truth up to |position| 10^7, where torch's float32 table is off by 1e-2 and
    more past 10^6 (the error-ratio rule alone would allow that much). At 10^9 the float64 product position x
    frequency itself (the truth's too) is off by about 1e-7."""
    _, device = backend_device
    x = torch.zeros(2, 97, 64, device=device)
    out = fastattn.sinusoidal_positional_encoding(x, offset=start)
    pos = reference.sequence_positions(2, 97, start, device=device)
    truth = reference.sinusoidal_table(pos, 64)
    assert_close(out, truth, atol=ulps * torch.finfo(torch.float32).eps)
    if start >= 10**6:
        assert (tutorial_table(pos, 64, torch.float32).double() - truth).abs().max() > 1e-2  # the table's error


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_sinusoidal_dropout_matches_the_reference_mask(backend_device, dtype, batch_first):
    """Forward and gradient with dropout against the reference given the Philox mask of the same seed; every dropped
    element is 0 (a kept one only where the sum itself is 0)."""
    name, device = backend_device
    _skip_unsupported(name, dtype)
    x = make_x((3, 13, 37), batch_first, dtype, device)
    grad = make_x((3, 13, 37), batch_first, dtype, device, seed=1)
    offset, offsets = 11, torch.tensor([0, 4, 90], device=device)
    keep = keep_mask(x)
    pos = positions_of(x, batch_first, offset, offsets)

    def ours(t):
        return ops.positional_add_op(t, None, offsets, offset, 0.5, 10000.0, True, batch_first, P, seed_tensor())

    out, grad_x = grads(ours, [x], grad)
    truth = grads(lambda t: reference.sinusoidal_encoding(t, pos, 0.5, keep=keep, dropout_p=P), [x.double()], grad)
    table = tutorial_table(pos, 37, dtype)
    baseline = grads(lambda t: baseline_add(t, table, 0.5, keep, P), [x], grad)
    assert torch.all(out[~keep] == 0) and torch.all(truth[0][keep & (out == 0)].abs() < 1e-2)  # zeros: dropped
    assert_error_ratio(out, truth[0], baseline[0], name="out")
    assert_error_ratio(grad_x, truth[1], baseline[1], ratio=GRADIENT_RATIO, name="grad x")


def test_dropout_keeps_the_expected_fraction_and_replays(backend_device):
    _, device = backend_device
    x = torch.full((4, 64, 128), 3.0, device=device)  # 3 + PE is never 0: a zero is a dropped element
    torch.manual_seed(7)
    out = fastattn.sinusoidal_positional_encoding(x, dropout_p=0.3, offset=3)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.01  # 32768 draws: the standard deviation is 0.0025
    for word in range(4):  # each of Philox's four words, which serve columns c % 4
        assert abs(kept[..., word::4].double().mean().item() - 0.7) < 0.02
    full = fastattn.sinusoidal_positional_encoding(x, offset=3)
    torch.testing.assert_close(out[kept], full[kept] / 0.7)  # kept entries are rescaled
    torch.manual_seed(7)
    assert torch.equal(out, fastattn.sinusoidal_positional_encoding(x, dropout_p=0.3, offset=3))  # replays
    assert not torch.equal(out, fastattn.sinusoidal_positional_encoding(x, dropout_p=0.3, offset=3))  # new draw
    tokens = torch.randint(0, 50, (4, 64), device=device)
    token_weight = torch.rand(50, 128, device=device) + 1.0  # never 0: a zero is a dropped element
    position_weight = torch.zeros(64, 128, device=device)
    torch.manual_seed(9)
    emb = fastattn.embedding_with_positions(tokens, token_weight, position_weight, dropout_p=0.3)
    assert abs((emb != 0).double().mean().item() - 0.7) < 0.01
    torch.manual_seed(9)
    assert torch.equal(emb, fastattn.embedding_with_positions(tokens, token_weight, position_weight, dropout_p=0.3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 113, 100), (3, 7, 1)], ids=_shape_id)
def test_sinusoidal_backward(backend_device, shape, dtype):
    name, device = backend_device
    _skip_unsupported(name, dtype)
    x = make_x(shape, True, dtype, device)
    grad = make_x(shape, True, dtype, device, seed=1)
    pos = positions_of(x, True, 3, None)
    _, ours = grads(lambda t: fastattn.sinusoidal_positional_encoding(t, scale=0.7, offset=3), [x], grad)
    _, truth = grads(lambda t: reference.sinusoidal_encoding(t, pos, 0.7), [x.double()], grad)
    table = tutorial_table(pos, shape[2], dtype)
    _, baseline = grads(lambda t: baseline_add(t, table, 0.7), [x], grad)
    assert ours.dtype == dtype
    assert_error_ratio(ours, truth, baseline, ratio=GRADIENT_RATIO, name="grad x")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: x.transpose(0, 1), id="transposed"),
        pytest.param(lambda x: x[:, ::2], id="sliced-seq"),
        pytest.param(lambda x: x[..., 3:40], id="sliced-d"),
        pytest.param(lambda x: x.transpose(1, 2), id="transposed-last"),
        pytest.param(lambda x: x[:1, :1].expand(3, 6, 48), id="expanded"),
    ],
)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_strided_inputs(backend_device, make, batch_first):
    _, device = backend_device
    x = make(torch.randn(6, 12, 48, device=device))
    weight = torch.randn(60, x.shape[-1], device=device)
    pos = positions_of(x, batch_first, 2, None)
    out = fastattn.sinusoidal_positional_encoding(x, offset=2, batch_first=batch_first, scale=1.5)
    assert_close(out, reference.sinusoidal_encoding(x.double(), pos, 1.5), atol=1e-6)
    out = fastattn.learned_positional_encoding(x, weight, offset=2, batch_first=batch_first)
    assert_close(out, reference.learned_encoding(x.double(), weight.double(), pos), atol=1e-6)


def test_two_dim_input_and_empty(backend_device):
    _, device = backend_device
    x = torch.randn(9, 10, device=device)
    out = fastattn.sinusoidal_positional_encoding(x, offset=4)
    assert_close(out, reference.sinusoidal_encoding(x.double(), torch.arange(4, 13, device=device)), atol=1e-6)
    for shape in ((0, 5, 8), (2, 0, 8), (2, 5, 0)):
        assert fastattn.sinusoidal_positional_encoding(torch.randn(shape, device=device)).shape == shape


def test_gradcheck(backend_device):
    name, device = backend_device
    if name == "cuda":
        pytest.skip("the cuda backend has no float64 kernels to gradcheck")
    x = torch.randn(2, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 6, device=device, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([1, 6], device=device)
    assert torch.autograd.gradcheck(lambda t: fastattn.sinusoidal_positional_encoding(t, scale=0.3, offset=4), (x,))
    assert torch.autograd.gradcheck(
        lambda t, w: fastattn.learned_positional_encoding(t, w, scale=0.3, offset=offsets), (x, weight)
    )

    def dropped(t, w):
        torch.manual_seed(3)
        return fastattn.learned_positional_encoding(t, w, offset=1, dropout_p=0.4)

    assert torch.autograd.gradcheck(dropped, (x, weight))


# ---------------------------------------------------------------------------------------------------------
# Learned position tables.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset_kind", ["offset", "offsets"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 100), (2, 113, 7), (4, 1, 1)], ids=_shape_id)
def test_learned_forward_backward(backend_device, shape, dtype, batch_first, dropout, offset_kind):
    """Positions repeat across the batch, so the table's gradient sums several rows: a batch sum for an int offset
    (with scale 1 the gradient of x is the incoming one), a scatter-add for per-sequence offsets."""
    name, device = backend_device
    _skip_unsupported(name, dtype)
    x = make_x(shape, batch_first, dtype, device)
    grad = make_x(shape, batch_first, dtype, device, seed=1)
    weight = torch.randn(200, shape[2], generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    offset, offsets, scale = 3, torch.arange(shape[0], device=device) * 11, 1.5
    if offset_kind == "offset":
        offsets, scale = None, 1.0
    pos = positions_of(x, batch_first, offset, offsets)
    keep, p = (keep_mask(x), P) if dropout else (None, 0.0)

    def ours(t, w):
        return ops.positional_add_op(t, w, offsets, offset, scale, 10000.0, False, batch_first, p,
                                     seed_tensor() if dropout else None)  # fmt: skip

    with fastattn.record() as calls:
        out, grad_x, grad_w = grads(ours, [x, weight], grad)
    assert {c.backend for c in calls} == {name}
    truth = grads(
        lambda t, w: reference.learned_encoding(t, w, pos, scale, keep, p), [x.double(), weight.double()], grad
    )
    baseline = grads(
        lambda t, w: reference.learned_encoding(t, w, pos, scale, keep, p, upcast=False), [x, weight], grad
    )
    assert grad_w.dtype == dtype and grad_w.shape == weight.shape
    assert_error_ratio(out, truth[0], baseline[0], name="out")
    assert_error_ratio(grad_x, truth[1], baseline[1], ratio=GRADIENT_RATIO, name="grad x")
    assert_error_ratio(grad_w, truth[2], baseline[2], ratio=GRADIENT_RATIO, name="grad weight")


# ---------------------------------------------------------------------------------------------------------
# Token + position embeddings.
# ---------------------------------------------------------------------------------------------------------

EMBEDDING_CASES = {
    "offset": dict(offset=2),
    "offsets": dict(offset="tensor"),
    "positions": dict(positions=True),
    "padding": dict(padding_idx=3, token_scale=2.5),
    "dropout": dict(dropout=True, padding_idx=-1),
}


@pytest.mark.parametrize("case", list(EMBEDDING_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 100), (2, 113, 7), (1, 1, 1)], ids=_shape_id)
def test_embedding_with_positions(backend_device, shape, dtype, case):
    """Forward and both tables' gradients; tokens repeat (vocab 11), so token rows sum several gradient rows."""
    name, device = backend_device
    _skip_unsupported(name, dtype)
    kwargs = EMBEDDING_CASES[case]
    batch, seq, d = shape
    g = torch.Generator().manual_seed(5)
    vocab, max_positions = 11, 300
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    tokens[0, 0] = 3  # the padding token appears
    token_weight = torch.randn(vocab, d, generator=g).to(device=device, dtype=dtype)
    position_weight = torch.randn(max_positions, d, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(batch, seq, d, generator=g).to(device=device, dtype=dtype)
    offset, offsets, positions = kwargs.get("offset", 0), None, None
    if offset == "tensor":
        offset, offsets = 0, torch.arange(batch, device=device) * 50 + 1
    if kwargs.get("positions"):
        positions = torch.randint(0, max_positions, (batch, seq), generator=g).to(device)
    pos = positions if positions is not None else reference.sequence_positions(batch, seq, offset, offsets,
                                                                               device=device)  # fmt: skip
    token_scale = kwargs.get("token_scale", 1.0)
    padding_idx = kwargs.get("padding_idx")
    dropout = kwargs.get("dropout", False)
    keep, p = (keep_mask(torch.empty(batch, seq, d, device=device)), P) if dropout else (None, 0.0)
    padding = None if padding_idx is None else padding_idx % vocab

    def ours(tw, pw):
        return ops.embedding_op(tokens, tw, pw, positions, offsets, offset, token_scale,
                                -1 if padding is None else padding, p, seed_tensor() if dropout else None)  # fmt: skip

    def ref(tw, pw, upcast=True):
        return reference.embedding_with_positions(tokens, tw, pw, pos, token_scale, keep, p, padding, upcast)

    with fastattn.record() as calls:
        out, grad_tw, grad_pw = grads(ours, [token_weight, position_weight], grad)
    assert {c.backend for c in calls} == {name}
    truth = grads(ref, [token_weight.double(), position_weight.double()], grad)
    baseline = grads(lambda tw, pw: ref(tw, pw, upcast=False), [token_weight, position_weight], grad)
    assert out.shape == (batch, seq, d) and out.dtype == dtype
    assert_error_ratio(out, truth[0], baseline[0], name="out")
    assert_error_ratio(grad_tw, truth[1], baseline[1], ratio=GRADIENT_RATIO, name="grad token_weight")
    assert_error_ratio(grad_pw, truth[2], baseline[2], ratio=GRADIENT_RATIO, name="grad position_weight")
    if padding is not None:
        assert torch.all(grad_tw[padding] == 0)


def test_embedding_public_function(backend_device):
    """The public function: 1-D tokens, int32 indices, strided weights, negative padding_idx."""
    _, device = backend_device
    token_weight = torch.randn(20, 16, device=device)[:, :9]  # rows with a stride of 16
    position_weight = torch.randn(30, 9, device=device)
    tokens = torch.tensor([1, 5, 5, 19, 0], device=device, dtype=torch.int32)
    out = fastattn.embedding_with_positions(tokens, token_weight, position_weight, offset=7, token_scale=0.5,
                                            padding_idx=-1)  # fmt: skip
    expected = token_weight[tokens.long()] * 0.5 + position_weight[7:12]
    assert out.shape == (5, 9)
    assert_close(out, expected.double(), atol=1e-6)


def test_embedding_scatter_is_deterministic_on_cpu(set_threads):
    """The CPU scatter sums each table row in entry order: the same bits for any number of threads."""
    grad = torch.randn(5000, 64)
    index = torch.randint(0, 7, (5000,))
    results = []
    for n in (1, 2, 3):
        set_threads(n)
        with fastattn.backend("cpu"):
            results.append(ops.embedding_scatter_op(grad, index, 7, 1.0, -1))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert_close(results[0], reference.embedding_scatter(grad.double(), index, 7), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# ALiBi slopes.
# ---------------------------------------------------------------------------------------------------------


def test_alibi_slopes_follow_the_paper():
    """Powers of two: 2^(-8/n), 2^(-16/n), ..., 2^-8 (hand-derived for 8 heads: 1/2, 1/4, ..., 1/256). Otherwise
    the slopes of the power of two below, then every other slope of the next power of two."""
    assert fastattn.alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert fastattn.alibi_slopes(1).tolist() == [2**-8]
    assert fastattn.alibi_slopes(2).tolist() == [2**-4, 2**-8]
    root2 = 2**-0.5  # the 16-head slopes are 2^(-k/2): every other from the first is 2^-0.5, 2^-1.5, ...
    expected12 = [2.0**-k for k in range(1, 9)] + [root2, root2 / 2, root2 / 4, root2 / 8]
    torch.testing.assert_close(fastattn.alibi_slopes(12), torch.tensor(expected12), rtol=0, atol=0)
    slopes = fastattn.alibi_slopes(16)
    torch.testing.assert_close(slopes, torch.tensor([2 ** (-k / 2) for k in range(1, 17)]), rtol=0, atol=0)
    assert slopes.dtype == torch.float32 and slopes.shape == (16,)
    assert fastattn.alibi_slopes(3, device="meta").device.type == "meta"


def test_alibi_slopes_run_through_attention(backend_device):
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 9, 16, generator=g).to(device) for _ in range(3))
    slopes = fastattn.alibi_slopes(6, device=device)
    out = fastattn.attention(q, k, v, alibi_slopes=slopes, causal=True)
    bias = reference.alibi_bias(slopes.double(), 9, 9, 0)
    scores = q.double() @ k.double().transpose(-1, -2) / 4 + bias
    scores = scores.masked_fill(~reference.causal_mask(9, 9, device), float("-inf"))
    assert_close(out, torch.softmax(scores, -1) @ v.double(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The ops: opcheck, torch.compile, bad input.
# ---------------------------------------------------------------------------------------------------------


def test_opcheck(backend_device):
    _, device = backend_device
    x = torch.randn(2, 5, 12, device=device, requires_grad=True)
    table = torch.randn(20, 12, device=device, requires_grad=True)
    offsets = torch.tensor([0, 3], device=device)
    for args in (
        (x, None, None, 2, 0.5, 10000.0, True, True, 0.0, None),
        (x, None, torch.arange(5, device=device), 2, 0.5, 500.0, True, False, 0.25, seed_tensor()),  # seq-first
        (x, table, offsets, 1, 1.0, 10000.0, False, True, 0.25, seed_tensor()),
        (x, None, None, 0, 2.0, 10000.0, False, True, 0.0, None),
    ):
        torch.library.opcheck(torch.ops.fastattn.positional_add.default, args)
    tokens = torch.tensor([[1, 2, 2, 0, 5], [3, 3, 3, 1, 0]], device=device)
    weights = [torch.randn(rows, 12, device=device, requires_grad=True) for rows in (6, 9)]
    torch.library.opcheck(torch.ops.fastattn.embedding_with_positions.default,
                          (tokens, *weights, None, offsets, 1, 2.0, 0, 0.25, seed_tensor()))  # fmt: skip
    torch.library.opcheck(torch.ops.fastattn.embedding_with_positions.default,
                          (tokens, *weights, tokens, None, 0, 1.0, -1, 0.0, None))  # fmt: skip
    grad = torch.randn(10, 12, device=device)
    torch.library.opcheck(torch.ops.fastattn.embedding_scatter.default, (grad, tokens.reshape(-1), 6, 0.5, 2))


def test_compile_fullgraph_aot(backend_device):
    """No graph break, dropout included: the seed is a tensor drawn in the graph, not an .item()."""
    _, device = backend_device
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    weight = torch.randn(30, 16, device=device, requires_grad=True)
    tokens = torch.randint(0, 30, (2, 9), device=device)

    def f(t, w):
        y = fastattn.sinusoidal_positional_encoding(t * 2, offset=3, dropout_p=0.2, scale=0.5)
        y = fastattn.learned_positional_encoding(y, w, offset=1)
        return y + fastattn.embedding_with_positions(tokens, w, w, offset=2, dropout_p=0.1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    expected = f(x, weight)
    torch.manual_seed(0)
    got = compiled(x, weight)
    torch.testing.assert_close(got, expected)  # aot_eager keeps torch's generator: the same seeds
    g1 = torch.autograd.grad(got.square().sum(), (x, weight))
    g2 = torch.autograd.grad(expected.square().sum(), (x, weight))
    torch.testing.assert_close(g1, g2)


def test_compile_fullgraph_inductor():
    """The real compiler (Inductor) on CPU, forward and backward, with the default backend choice."""
    torch._dynamo.reset()
    x = torch.randn(3, 8, 32, requires_grad=True)
    weight = torch.randn(16, 32, requires_grad=True)

    def f(t, w):
        return fastattn.learned_positional_encoding(fastattn.sinusoidal_positional_encoding(t, offset=5), w) * 3

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight), f(x, weight))
    g1 = torch.autograd.grad(compiled(x, weight).square().sum(), (x, weight))
    g2 = torch.autograd.grad(f(x, weight).square().sum(), (x, weight))
    torch.testing.assert_close(g1, g2)


def _x():
    return torch.randn(2, 5, 8)


def _emb(tokens, **kwargs):
    return fastattn.embedding_with_positions(tokens, torch.randn(10, 8), torch.randn(6, 8), **kwargs)


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda: fastattn.sinusoidal_positional_encoding(torch.ones(2, 3, 4, dtype=torch.int64)), TypeError,
         "x must be float16"),
        (lambda: fastattn.sinusoidal_positional_encoding([1.0]), TypeError, "x must be a Tensor"),
        (lambda: fastattn.sinusoidal_positional_encoding(torch.randn(2, 3, 4, 5)), ValueError, "x must be"),
        (lambda: fastattn.sinusoidal_positional_encoding(_x(), offset=1.5), TypeError, "offset must be an int"),
        (lambda: fastattn.sinusoidal_positional_encoding(_x(), offset=torch.zeros(3, dtype=torch.int64)), ValueError,
         r"offset must have shape \(2,\)"),
        (lambda: fastattn.sinusoidal_positional_encoding(_x(), offset=torch.zeros(2)), TypeError,
         "offset must be an int32 or int64"),
        (lambda: fastattn.sinusoidal_positional_encoding(torch.randn(5, 8), offset=torch.zeros(1, dtype=torch.int64)),
         ValueError, "needs an input with a batch dim"),
        (lambda: fastattn.sinusoidal_positional_encoding(_x(), dropout_p=1.0), ValueError, r"dropout_p must be"),
        (lambda: fastattn.sinusoidal_positional_encoding(_x(), base=0.0), ValueError, "base must be positive"),
        (lambda: fastattn.sinusoidal_positional_encoding(_x(), scale=float("nan")), TypeError, "scale must be"),
        (lambda: fastattn.learned_positional_encoding(_x(), torch.randn(9, 7)), ValueError, r"weight must be"),
        (lambda: fastattn.learned_positional_encoding(_x(), torch.randn(9, 8).double()), TypeError, "must match x"),
        (lambda: fastattn.learned_positional_encoding(_x(), torch.randn(6, 8), offset=2), IndexError,
         r"position 6 .* out of range \[0, 6\)"),
        (lambda: fastattn.learned_positional_encoding(_x(), torch.randn(6, 8), offset=-1), IndexError, "position -1"),
        (lambda: fastattn.learned_positional_encoding(_x(), torch.randn(9, 8), offset=torch.tensor([0, 5])),
         IndexError, "position 9"),
        (lambda: _emb(torch.tensor([[1, 10]])), IndexError, r"token 10 is out of range \[0, 10\)"),
        (lambda: _emb(torch.tensor([[1, -1]])), IndexError, "token -1"),
        (lambda: _emb(torch.zeros(1, 7, dtype=torch.int64)), IndexError, r"position 6 .* \[0, 6\)"),
        (lambda: _emb(torch.zeros(2, 3, dtype=torch.int64), offset=torch.tensor([0, 4])), IndexError, "position 6"),
        (lambda: _emb(torch.zeros(1, 3, dtype=torch.int64), positions=torch.tensor([[0, 6, 1]])), IndexError,
         "position 6"),
        (lambda: _emb(torch.zeros(1, 3, dtype=torch.int64), positions=torch.tensor([[0, 1]])), ValueError,
         r"positions must have shape \(1, 3\)"),
        (lambda: _emb(torch.zeros(1, 3, dtype=torch.int64), positions=torch.zeros(1, 3, dtype=torch.int64), offset=1),
         ValueError, "positions or offset, not both"),
        (lambda: _emb(torch.zeros(1, 3)), TypeError, "tokens must be an int32 or int64"),
        (lambda: _emb(torch.zeros(1, 3, dtype=torch.int64), padding_idx=10), ValueError, "padding_idx must be"),
        (lambda: fastattn.embedding_with_positions(torch.zeros(1, 3, dtype=torch.int64), torch.randn(4, 8),
                                                   torch.randn(4, 7)), ValueError, "must share d"),
        (lambda: fastattn.embedding_with_positions(torch.zeros(1, 3, dtype=torch.int64), torch.randn(4, 8),
                                                   torch.randn(4, 8).half()), TypeError, "must match token_weight"),
        (lambda: fastattn.alibi_slopes(0), ValueError, "heads must be a positive int"),
    ],
    ids=["int-x", "list-x", "4d-x", "float-offset", "offsets-shape", "float-offsets", "offsets-2d", "dropout-1",
         "base-0", "nan-scale", "weight-d", "weight-dtype", "learned-past-end", "learned-negative", "learned-offsets",
         "token-high", "token-negative", "emb-past-end", "emb-offsets", "emb-positions", "positions-shape",
         "positions-and-offset", "float-tokens", "padding-idx", "d-mismatch", "dtype-mismatch", "alibi-0"],
)  # fmt: skip
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_cpu_kernels_check_indices_themselves():
    """The C++ CPU kernels refuse out-of-range indices too (the ops call them only after the Python check)."""
    fastattn.backends.extension()
    with pytest.raises(RuntimeError, match=r"token 10 \(of \[0, 10\)\)"):
        torch.ops.fastattn_C.embedding_forward(torch.tensor([[10]]), torch.randn(10, 4), torch.randn(4, 4), None,
                                               None, 0, 1.0, 0.0, 0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"outside \[0, 3\)"):
        torch.ops.fastattn_C.positional_add(torch.randn(1, 4, 2), torch.randn(3, 2), None, 0, 1.0, 1.0, False, True,
                                            0.0, 0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"index\[1\] = 5 is outside \[0, 5\)"):
        torch.ops.fastattn_C.embedding_scatter(torch.randn(2, 3), torch.tensor([0, 5]), 5, 1.0, -1)


def test_forced_backend_that_cannot_run_raises():
    with fastattn.backend("cuda"), pytest.raises(fastattn.BackendError, match="forced backend"):
        fastattn.sinusoidal_positional_encoding(_x())
