"""fastattn.apply_rotary (RoPE) on every backend against the float64 reference with the error-ratio rule, plus the
op's registration (opcheck, torch.compile), in-place use, strided inputs and its errors on bad input."""

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import GRADIENT_RATIO, assert_close, assert_error_ratio

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = [pytest.param(False, id="half_split"), pytest.param(True, id="interleaved")]
# (head_dim, rotary_dim, seq, heads_q, heads_k): the head dims 40/72/128, partial rotary, seq 1/7/113, GQA, MQA, no k.
CASES = [
    (40, 40, 7, 4, 2),
    (72, 72, 113, 3, 1),
    (128, 128, 1, 4, 4),
    (128, 64, 113, 2, 1),
    (72, 24, 7, 2, 2),
    (40, 32, 113, 3, 0),
]


def case_id(case):
    head_dim, rotary_dim, seq, hq, hk = case
    return f"d{head_dim}-r{rotary_dim}-s{seq}-h{hq}x{hk}"


def skip_unsupported(name, dtype):
    if dtype == torch.float64 and name == "cuda":
        pytest.skip("the cuda backend runs float16/bfloat16/float32 (float64 goes to the next backend)")


def make(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def reference_kwargs(kwargs):
    """apply_rotary's keyword arguments as reference.rotary's (a tensor offset becomes per-batch offsets)."""
    out = dict(kwargs)
    if isinstance(out.get("offset"), torch.Tensor):
        out["offsets"] = out.pop("offset")
    return out


def truth_and_baseline(q, k, **kwargs):
    """The float64 truth, and the plain eager reference in q's dtype (whose error sets our allowance)."""
    kw = reference_kwargs(kwargs)
    kw64 = {key: (v.double() if key in ("cos", "sin") else v) for key, v in kw.items()}
    truth = reference.rotary(q.double(), None if k is None else k.double(), **kw64)
    baseline = reference.rotary(q, k, **kw, upcast=False)
    return truth, baseline


def check_outputs(out, q, k, **kwargs):
    (truth_q, truth_k), (base_q, base_k) = truth_and_baseline(q, k, **kwargs)
    out_q, out_k = out if k is not None else (out, None)
    assert out_q.dtype == q.dtype and out_q.shape == q.shape
    assert_error_ratio(out_q, truth_q, base_q, name="q")
    if k is not None:
        assert out_k.dtype == k.dtype and out_k.shape == k.shape
        assert_error_ratio(out_k, truth_k, base_k, name="k")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(backend_device, case, interleaved, dtype):
    name, device = backend_device
    skip_unsupported(name, dtype)
    head_dim, rotary_dim, seq, hq, hk = case
    q = make((2, hq, seq, head_dim), dtype, device, 1)
    k = make((2, hk, seq, head_dim), dtype, device, 2) if hk else None
    kwargs = dict(rotary_dim=rotary_dim, interleaved=interleaved, offset=37)
    with fastattn.record() as calls:
        out = fastattn.apply_rotary(q, k, **kwargs)
    assert [c.backend for c in calls] == [name]
    check_outputs(out, q, k, **kwargs)
    out_q = out[0] if k is not None else out
    assert torch.equal(out_q[..., rotary_dim:], q[..., rotary_dim:]), "features past rotary_dim must pass through"


def position_variants(batch, seq, device):
    g = torch.Generator().manual_seed(3)
    return {
        "int-offset": dict(offset=12345),
        "per-batch-offsets": dict(offset=torch.tensor([0, 907, 31], device=device)[:batch]),
        "scalar-tensor-offset": dict(offset=torch.tensor(5, device=device)),
        "positions-seq": dict(positions=torch.randint(0, 3000, (seq,), generator=g).to(device)),
        "positions-batch-seq": dict(positions=torch.randint(0, 3000, (batch, seq), generator=g).to(device)),
        "positions-int32": dict(positions=torch.randint(0, 3000, (batch, seq), generator=g).to(device, torch.int32)),
        "positions-strided": dict(positions=torch.randint(0, 3000, (batch, 2 * seq), generator=g).to(device)[:, ::2]),
    }


@pytest.mark.parametrize(
    "variant", list(position_variants(3, 5, "cpu")), ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_positions(backend_device, variant, dtype):
    """Offsets (int, per batch, 0-d) and explicit positions ((seq,), (batch, seq), int32, strided)."""
    name, device = backend_device
    skip_unsupported(name, dtype)
    q, k = make((3, 2, 5, 40), dtype, device, 4), make((3, 1, 5, 40), dtype, device, 5)
    kwargs = position_variants(3, 5, device)[variant]
    out = fastattn.apply_rotary(q, k, **kwargs)
    check_outputs(out, q, k, **kwargs)


def test_large_positions(backend_device):
    """Angles of up to millions of radians: the kernels' sin and cos of each float32 angle theta = float32(pos *
    inv_freq) against float64 sin and cos of that same theta (their range reduction must not lose it)."""
    name, device = backend_device
    q = make((2, 2, 9, 64), torch.float32, device, 6)
    positions = torch.tensor([[0, 1, 65535, 65536, 100003, 262143, 500000, 1048575, 4000000]] * 2, device=device)
    out = fastattn.apply_rotary(q, positions=positions)
    theta = positions.float()[..., None] * reference.rotary_inv_freq(64, 10000.0, torch.float32, device)
    exact = reference.rotary_rotate(q.double(), theta.double().cos(), theta.double().sin(), 64, False)
    assert_close(out, exact, atol=8 * torch.finfo(torch.float32).eps * q.abs().max().item())


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cached_tables(backend_device, dtype, interleaved):
    """Cached cos/sin tables (float32, or float64 for float64 q) give what the kernels compute themselves."""
    name, device = backend_device
    skip_unsupported(name, dtype)
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin = reference.rotary_cos_sin_table(200, 24, 500.0, table_dtype, device)
    q, k = make((2, 3, 11, 40), dtype, device, 7), make((2, 1, 11, 40), dtype, device, 8)
    offsets = torch.tensor([0, 189], device=device)
    kwargs = dict(offset=offsets, cos=cos, sin=sin, interleaved=interleaved)
    out = fastattn.apply_rotary(q, k, **kwargs)
    check_outputs(out, q, k, **kwargs)
    computed = fastattn.apply_rotary(q, k, offset=offsets, rotary_dim=24, base=500.0, interleaved=interleaved)
    # The same float32 angles (inv_freq is rounded from float64), so only the sin and cos implementations differ.
    # Float64 angles also differ by the float64 exp2 of each backend's library (an ulp of inv_freq), times pos.
    max_position = 189 + 10
    for ours, theirs in zip(out, computed, strict=True):
        magnitude = max(1.0, theirs.abs().max().item())
        atol = 8 * torch.finfo(dtype).eps * magnitude
        if dtype == torch.float64:
            atol += 2 * torch.finfo(dtype).eps * max_position * magnitude
        assert_close(ours, theirs.double(), atol=atol)


def test_tables_of_other_dtypes(backend_device):
    """float16 tables are converted (to float32) rather than refused; an odd row stride is read as is."""
    _, device = backend_device
    cos, sin = reference.rotary_cos_sin_table(64, 16, dtype=torch.float32, device=device)
    wide_cos = torch.zeros(64, 40, device=device)
    wide_cos[:, 3:11] = cos
    q = make((1, 2, 6, 16), torch.float32, device, 9)
    out = fastattn.apply_rotary(q, cos=wide_cos[:, 3:11], sin=sin.half())
    check_outputs(out, q, None, cos=cos, sin=sin.half().float())


def test_table_positions_checked(backend_device):
    """A position outside the tables is an error, raised before any kernel on every backend."""
    _, device = backend_device
    cos, sin = reference.rotary_cos_sin_table(10, 8, device=device)
    q = make((2, 1, 4, 8), torch.float32, device)
    fastattn.apply_rotary(q, cos=cos, sin=sin, offset=6)  # positions 6 .. 9: fine
    bad = [
        dict(offset=7),
        dict(offset=-1),
        dict(offset=torch.tensor([0, 7], device=device)),
        dict(positions=torch.tensor([0, 1, 2, 10], device=device)),
        dict(positions=torch.tensor([[0, 1, 2, 3], [0, -1, 2, 3]], device=device)),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="outside the cos/sin tables, which hold positions 0 .. 9"):
            fastattn.apply_rotary(q, cos=cos, sin=sin, **kwargs)


@pytest.mark.parametrize(
    "layout",
    ["bshd-transposed", "fused-qkv", "strided-head-dim", "head-slice", "expanded"],
)
def test_strided_inputs(backend_device, layout):
    name, device = backend_device
    B, S, H, D = 2, 13, 4, 40
    g = torch.Generator().manual_seed(10)
    if layout == "bshd-transposed":  # (B, S, H, D) projections viewed as (B, H, S, D): read in place
        q = torch.randn(B, S, H, D, generator=g).to(device).transpose(1, 2)
        k = torch.randn(B, S, 2, D, generator=g).to(device).transpose(1, 2)
    elif layout == "fused-qkv":  # slices of one (B, S, 3, H, D) projection: not dense
        qkv = torch.randn(B, S, 3, H, D, generator=g).to(device)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    elif layout == "strided-head-dim":  # every other feature: copied to unit stride first
        q = torch.randn(B, H, S, 2 * D, generator=g).to(device)[..., ::2]
        k = torch.randn(B, 2, S, 2 * D, generator=g).to(device)[..., 1::2]
    elif layout == "head-slice":
        q = torch.randn(B, H + 3, S, D, generator=g).to(device)[:, 1 : H + 1]
        k = torch.randn(B, 5, S, D + 8, generator=g).to(device)[:, ::2, :, 8:]
    else:
        q = torch.randn(1, H, S, D, generator=g).to(device).expand(B, H, S, D)
        k = torch.randn(B, 1, S, D, generator=g).to(device)
    out_q, out_k = fastattn.apply_rotary(q, k, rotary_dim=32, offset=3)
    check_outputs((out_q, out_k), q, k, rotary_dim=32, offset=3)
    if layout == "bshd-transposed":
        assert out_q.stride() == q.stride() and out_k.stride() == k.stride(), "the output keeps the input's layout"
    if layout == "fused-qkv":  # dense in the same token-major order
        assert out_q.transpose(1, 2).is_contiguous() and out_k.transpose(1, 2).is_contiguous()
    if layout == "expanded":  # a fresh tensor of its own, not an expanded one
        assert torch._debug_has_internal_overlap(out_q) == 0 and out_q.stride(-1) == 1


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("layout", ["contiguous", "bshd-transposed", "strided-head-dim"])
def test_inplace(backend_device, layout, interleaved):
    """inplace=True writes into q and k themselves (views included), with the out-of-place call's values; the
    features past rotary_dim are left untouched."""
    _, device = backend_device
    B, S, D = 2, 9, 72
    g = torch.Generator().manual_seed(11)
    if layout == "contiguous":
        base_q = torch.randn(B, 3, S, D, generator=g).to(device)
        base_k = torch.randn(B, 1, S, D, generator=g).to(device)
        q, k = base_q, base_k
    elif layout == "bshd-transposed":
        base_q = torch.randn(B, S, 3, D, generator=g).to(device)
        base_k = torch.randn(B, S, 1, D, generator=g).to(device)
        q, k = base_q.transpose(1, 2), base_k.transpose(1, 2)
    else:
        base_q = torch.randn(B, 3, S, 2 * D, generator=g).to(device)
        base_k = torch.randn(B, 1, S, 2 * D, generator=g).to(device)
        q, k = base_q[..., ::2], base_k[..., ::2]
    kwargs = dict(rotary_dim=48, interleaved=interleaved, offset=torch.tensor([4, 1]).to(device))
    expected = fastattn.apply_rotary(q, k, **kwargs)
    before_q, before_base = q.clone(), base_q.clone()
    result = fastattn.apply_rotary(q, k, **kwargs, inplace=True)
    assert result[0] is q and result[1] is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(q[..., 48:], before_q[..., 48:])
    if layout == "strided-head-dim":
        assert torch.equal(base_q[..., 1::2], before_base[..., 1::2])  # the base's other features are untouched


def test_inplace_refuses_autograd(backend_device):
    _, device = backend_device
    q = make((1, 2, 3, 8), torch.float32, device).requires_grad_()
    with pytest.raises(RuntimeError, match="inplace=True is not differentiable"):
        fastattn.apply_rotary(q * 1, inplace=True)
    with torch.no_grad():
        x = q * 1
        assert fastattn.apply_rotary(x, inplace=True) is x


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tables", [False, True], ids=["computed", "tables"])
def test_backward(backend_device, dtype, interleaved, tables):
    """Gradients of q and k (3x rule): the incoming gradients rotated by minus the angles."""
    name, device = backend_device
    skip_unsupported(name, dtype)
    q, k = make((2, 4, 23, 72), dtype, device, 12), make((2, 2, 23, 72), dtype, device, 13)
    gq, gk = make(q.shape, dtype, device, 14), make(k.shape, dtype, device, 15)
    kwargs = dict(rotary_dim=64, interleaved=interleaved, offset=torch.tensor([3, 50], device=device))
    if tables:
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        kwargs["cos"], kwargs["sin"] = reference.rotary_cos_sin_table(80, 64, dtype=table_dtype, device=device)

    def grads(fn, q_in, k_in, **kw):
        q_in, k_in = q_in.detach().requires_grad_(), k_in.detach().requires_grad_()
        out_q, out_k = fn(q_in, k_in, **kw)
        return torch.autograd.grad((out_q, out_k), (q_in, k_in), (gq.to(q_in.dtype), gk.to(k_in.dtype)))

    ours = grads(lambda a, b, **kw: fastattn.apply_rotary(a, b, **kw), q, k, **kwargs)
    ref_kw = reference_kwargs(kwargs)
    ref_kw64 = {key: (v.double() if key in ("cos", "sin") else v) for key, v in ref_kw.items()}
    truth = grads(reference.rotary, q.double(), k.double(), **ref_kw64)
    baseline = grads(lambda a, b, **kw: reference.rotary(a, b, **kw, upcast=False), q, k, **ref_kw)
    for what, o, t, b in zip(("grad q", "grad k"), ours, truth, baseline, strict=True):
        assert o.dtype == dtype
        assert_error_ratio(o, t, b, ratio=GRADIENT_RATIO, name=what)


def test_gradcheck(backend_device):
    """float64 gradcheck and gradgradcheck (the backward is the op itself, so it has a backward too). fast_mode
    keeps the Triton interpreter's share to seconds."""
    name, device = backend_device
    if name == "cuda":
        pytest.skip("the cuda backend has no float64 kernels to gradcheck")
    q = make((2, 3, 4, 12), torch.float64, device, 16).requires_grad_()
    k = make((2, 1, 4, 12), torch.float64, device, 17).requires_grad_()
    positions = torch.tensor([[4, 0, 9, 2], [1, 1, 3, 30]], device=device)
    for interleaved in (False, True):
        def f(a, b, interleaved=interleaved):
            return fastattn.apply_rotary(a, b, positions=positions, rotary_dim=10, interleaved=interleaved)

        assert torch.autograd.gradcheck(f, (q, k), fast_mode=True)
        assert torch.autograd.gradgradcheck(f, (q, k), fast_mode=True)


def test_only_k_requires_grad(backend_device):
    _, device = backend_device
    q, k = make((1, 2, 4, 8), torch.float32, device), make((1, 1, 4, 8), torch.float32, device).requires_grad_()
    out_q, out_k = fastattn.apply_rotary(q, k)
    (grad_k,) = torch.autograd.grad(out_k.sum(), k)
    (truth,) = torch.autograd.grad(reference.rotary(q, k)[1].sum(), k)
    assert_close(grad_k, truth.double(), atol=1e-6)


def test_empty(backend_device):
    _, device = backend_device
    for shape in ((0, 2, 5, 8), (2, 2, 0, 8), (2, 0, 5, 8)):
        q = torch.randn(shape, device=device)
        assert fastattn.apply_rotary(q).shape == shape
    q, k = torch.randn(2, 0, 5, 8, device=device), torch.randn(2, 1, 5, 8, device=device)
    out_q, out_k = fastattn.apply_rotary(q, k)
    check_outputs((out_q, out_k), q, k)


# ---------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile.
# ---------------------------------------------------------------------------------------------------------


def test_opcheck(backend_device):
    name, device = backend_device
    q = torch.randn(2, 3, 5, 24, device=device, requires_grad=True)
    k = torch.randn(2, 1, 5, 24, device=device, requires_grad=True)
    q_bshd = torch.randn(2, 5, 3, 24, device=device, requires_grad=True)
    cos, sin = reference.rotary_cos_sin_table(20, 16, device=device)
    positions = torch.tensor([[0, 3, 1, 2, 9]], device=device).expand(2, 5)
    offsets = torch.tensor([2, 7], device=device)
    variants = [
        (q, k, None, None, None, None, 0, 24, False, 10000.0, False),
        (q, None, positions, None, None, None, 1, 16, True, 500.0, True),
        (q, k, None, offsets, cos, sin, 3, 16, False, 10000.0, False),
        (q_bshd.transpose(1, 2), k, positions, None, cos, sin, 0, 16, True, 1.0, False),
    ]
    for args in variants:
        torch.library.opcheck(torch.ops.fastattn.rotary.default, args)
        detached = tuple(a.detach().clone() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
        torch.library.opcheck(torch.ops.fastattn.rotary_.default, detached)


def test_compile_fullgraph_aot(backend_device):
    """No graph break, out of place (with autograd) and in place (functionalized)."""
    _, device = backend_device
    q = torch.randn(2, 4, 9, 40, device=device, requires_grad=True)
    k = torch.randn(2, 2, 9, 40, device=device, requires_grad=True)
    offsets = torch.tensor([5, 0], device=device)

    def f(a, b):
        out_q, out_k = fastattn.apply_rotary(a * 2, b, offset=offsets, rotary_dim=32, interleaved=True)
        return (out_q.sum(-1, keepdim=True) * out_k.mean(1, keepdim=True)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), f(q, k))
    torch.testing.assert_close(torch.autograd.grad(compiled(q, k), (q, k)), torch.autograd.grad(f(q, k), (q, k)))

    def g(a, b):
        a, b = a.clone(), b.clone()
        fastattn.apply_rotary(a, b, positions=torch.arange(9, device=a.device) * 3, inplace=True)
        return a + 1, b

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="aot_eager")(q, k), g(q, k))


def test_compile_fullgraph_inductor():
    """The real compiler (Inductor) on CPU, forward and backward, with the default backend choice."""
    torch._dynamo.reset()
    q = torch.randn(2, 4, 16, 64, requires_grad=True)
    k = torch.randn(2, 1, 16, 64, requires_grad=True)
    rope = fastattn.RotaryEmbedding(64, max_positions=64)

    def f(a, b):
        out_q, out_k = rope(a, b * 0.5, offset=3)
        return out_q.square().sum() + out_k.sum()

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k), f(q, k))
    torch.testing.assert_close(torch.autograd.grad(compiled(q, k), (q, k)), torch.autograd.grad(f(q, k), (q, k)))


# ---------------------------------------------------------------------------------------------------------
# Bad input: clear exceptions naming the argument, before any kernel.
# ---------------------------------------------------------------------------------------------------------

Q = torch.randn(2, 4, 5, 8)
K = torch.randn(2, 2, 5, 8)
COS, SIN = reference.rotary_cos_sin_table(16, 8)


@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda: fastattn.apply_rotary(Q, rotary_dim=7), ValueError, "rotary_dim must be even and positive, got 7"),
        (lambda: fastattn.apply_rotary(Q, rotary_dim=0), ValueError, "rotary_dim must be even and positive, got 0"),
        (lambda: fastattn.apply_rotary(Q, rotary_dim=10), ValueError, "rotary_dim 10 is larger than head_dim 8"),
        (lambda: fastattn.apply_rotary(torch.randn(1, 1, 2, 5)), ValueError, "got 5 \\(head_dim; pass an even"),
        (lambda: fastattn.apply_rotary(Q, rotary_dim=4.0), TypeError, "rotary_dim must be an int"),
        (lambda: fastattn.apply_rotary(Q, torch.randn(3, 2, 5, 8)), ValueError, "same batch"),
        (lambda: fastattn.apply_rotary(Q, torch.randn(2, 2, 6, 8)), ValueError, "same seq"),
        (lambda: fastattn.apply_rotary(Q, torch.randn(2, 2, 5, 6)), ValueError, "same head_dim"),
        (lambda: fastattn.apply_rotary(Q, K.double()), TypeError, "k is torch.float64"),
        (lambda: fastattn.apply_rotary(Q[0]), ValueError, "q must be \\(batch, heads, seq, head_dim\\)"),
        (lambda: fastattn.apply_rotary(Q.long()), TypeError, "q must be float16"),
        (lambda: fastattn.apply_rotary(Q, K[0]), ValueError, "k must be \\(batch, kv_heads, seq, head_dim\\)"),
        (lambda: fastattn.apply_rotary(Q, positions=torch.arange(5.0)), TypeError, "positions must be an int64"),
        (lambda: fastattn.apply_rotary(Q, positions=torch.arange(4)), ValueError, "must be \\(seq,\\) = \\(5,\\)"),
        (lambda: fastattn.apply_rotary(Q, positions=torch.zeros(3, 5, dtype=torch.long)), ValueError,
         "or \\(batch, seq\\) = \\(2, 5\\), got \\(3, 5\\)"),
        (lambda: fastattn.apply_rotary(Q, positions=torch.arange(5), offset=2), ValueError, "or offset, not both"),
        (lambda: fastattn.apply_rotary(Q, offset=1.5), TypeError, "offset must be an int"),
        (lambda: fastattn.apply_rotary(Q, offset=torch.tensor([1, 2, 3])), ValueError, "a tensor offset must be"),
        (lambda: fastattn.apply_rotary(Q, offset=torch.tensor([1.0, 2.0])), TypeError, "offset must be an int64"),
        (lambda: fastattn.apply_rotary(Q, cos=COS), ValueError, "pass both cos and sin"),
        (lambda: fastattn.apply_rotary(Q, cos=COS, sin=SIN, rotary_dim=6), ValueError, "cos must be \\(max_positions"),
        (lambda: fastattn.apply_rotary(Q, cos=COS, sin=SIN[:8]), ValueError, "must have the same shape"),
        (lambda: fastattn.apply_rotary(Q, cos=COS.long(), sin=SIN), TypeError, "cos must be a floating-point"),
        (lambda: fastattn.apply_rotary(Q, cos=COS.clone().requires_grad_(), sin=SIN), ValueError,
         "the cos table gets no gradient"),
        (lambda: fastattn.apply_rotary(Q, cos=COS, sin=SIN, offset=12), ValueError,
         "position 16 is outside the cos/sin tables"),
        (lambda: fastattn.apply_rotary(Q, base=0.0), ValueError, "base must be a positive finite number"),
        (lambda: fastattn.apply_rotary(Q, interleaved=1), TypeError, "interleaved must be a bool"),
        (lambda: fastattn.apply_rotary(Q, Q, inplace=True), ValueError, "rotate it twice"),
    ],
    ids=["odd-rotary-dim", "zero-rotary-dim", "rotary-dim-too-big", "odd-head-dim", "float-rotary-dim",
         "batch-mismatch", "seq-mismatch", "head-dim-mismatch", "dtype-mismatch", "q-3d", "q-int", "k-3d",
         "float-positions", "positions-length", "positions-batch", "positions-and-offset", "float-offset",
         "offset-shape", "float-offset-tensor", "cos-alone", "table-width", "table-shapes", "int-table",
         "table-grad", "past-table", "base", "interleaved-type", "inplace-same-tensor"],
)  # fmt: skip
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_kernel_checks():
    """The C++ op checks its inputs itself (TORCH_CHECK) when called directly."""
    fastattn.backends.extension()
    out = torch.empty_like(Q)
    with pytest.raises(RuntimeError, match="rotary_dim must be even"):
        torch.ops.fastattn_C.rotary(Q, None, out, None, None, None, None, None, 0, 7, False, 10000.0, False)
    with pytest.raises(RuntimeError, match="positions must be \\(B, S\\)"):
        torch.ops.fastattn_C.rotary(Q, None, out, None, torch.zeros(5, dtype=torch.long), None, None, None, 0, 8,
                                    False, 10000.0, False)  # fmt: skip
    with pytest.raises(RuntimeError, match="cos and sin must be Float"):
        torch.ops.fastattn_C.rotary(Q, None, out, None, None, None, COS.double(), SIN.double(), 0, 8, False, 1.0, False)


def test_forced_backend_that_cannot_run_raises():
    with fastattn.backend("cuda"), pytest.raises(fastattn.BackendError, match="forced backend"):
        fastattn.apply_rotary(Q)
