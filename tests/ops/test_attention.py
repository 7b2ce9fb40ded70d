"""fastattn.attention on every backend against a float64 reference (the error-ratio rule)."""

from dataclasses import dataclass, replace

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import GRADIENT_RATIO, LSE_EXTRA_ULPS, assert_close, assert_error_ratio

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@dataclass(frozen=True)
class Case:
    """One attention problem: sizes and which features are on."""

    batch: int = 1
    heads: int = 2
    kv_heads: int = 2
    seq_q: int = 7
    seq_k: int = 7
    head_dim: int = 16
    head_dim_v: int | None = None
    causal: bool = False
    mask: str = "none"  # none | bool | float | float32-full
    key_padding: bool = False
    alibi: bool = False
    window: tuple[int, int] | None = None
    layout: str = "contiguous"  # or "bshd": q, k, v are (B, S, H, D) tensors transposed to (B, H, S, D)

    def __str__(self):
        parts = [f"b{self.batch}h{self.heads}kv{self.kv_heads}", f"q{self.seq_q}k{self.seq_k}d{self.head_dim}"]
        if self.head_dim_v:
            parts.append(f"dv{self.head_dim_v}")
        for flag in ("causal", "key_padding", "alibi"):
            if getattr(self, flag):
                parts.append(flag)
        if self.mask != "none":
            parts.append(f"mask-{self.mask}")
        if self.window:
            parts.append(f"window{self.window[0]}-{self.window[1]}")
        if self.layout != "contiguous":
            parts.append(self.layout)
        return "-".join(parts)


def skip_unsupported(name: str, dtype: torch.dtype) -> None:
    if dtype == torch.float64 and name == "cuda":
        pytest.skip("the cuda backend runs float16/bfloat16/float32 (float64 goes to the next backend)")


# Odd sizes (head dim 40 and 72, seq 1, 7, 113, 257 with seq_q != seq_k) crossed with each feature.
CASES = [
    Case(seq_q=1, seq_k=7, head_dim=40),
    Case(seq_q=7, seq_k=1, head_dim=72, causal=True),
    Case(batch=2, heads=4, kv_heads=2, seq_q=113, seq_k=57, head_dim=40, causal=True),
    Case(heads=4, kv_heads=1, seq_q=33, seq_k=113, head_dim=72, mask="bool"),
    Case(batch=2, seq_q=57, seq_k=33, head_dim=64, mask="float", key_padding=True),
    Case(seq_q=33, seq_k=257, head_dim=40, mask="float32-full", alibi=True, causal=True),
    Case(seq_q=65, seq_k=65, head_dim=16, window=(8, 4), alibi=True),
    Case(seq_q=20, seq_k=45, head_dim=72, head_dim_v=40, window=(-1, 3), mask="bool", layout="bshd"),
]


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(q, k, v, keyword arguments of fastattn.attention) for a case."""
    g = torch.Generator().manual_seed(seed)
    dv = case.head_dim_v or case.head_dim

    def rand(batch, heads, seq, dim):
        if case.layout == "bshd":
            return torch.randn(batch, seq, heads, dim, generator=g).to(device, dtype).transpose(1, 2)
        return torch.randn(batch, heads, seq, dim, generator=g).to(device, dtype)

    q = rand(case.batch, case.heads, case.seq_q, case.head_dim)
    k = rand(case.batch, case.kv_heads, case.seq_k, case.head_dim)
    v = rand(case.batch, case.kv_heads, case.seq_k, dv)
    kwargs = dict(causal=case.causal, window=case.window)
    if case.mask == "bool":  # per (head, query, key), broadcast over batch
        kwargs["attn_mask"] = (torch.rand(case.heads, case.seq_q, case.seq_k, generator=g) > 0.25).to(device)
    elif case.mask == "float":  # per key only, in q's dtype
        kwargs["attn_mask"] = torch.randn(case.seq_k, generator=g).to(device, dtype)
    elif case.mask == "float32-full":
        shape = (case.batch, case.heads, case.seq_q, case.seq_k)
        kwargs["attn_mask"] = torch.randn(shape, generator=g).to(device)
    if case.key_padding:
        padding = torch.zeros(case.batch, case.seq_k, dtype=torch.bool)
        padding[:, case.seq_k // 2 :] = torch.rand(case.batch, 1, generator=g) > 0.5  # some rows pad half
        kwargs["key_padding_mask"] = padding.to(device)
    if case.alibi:
        kwargs["alibi_slopes"] = torch.rand(case.heads, generator=g).to(device) * 0.5
    return q, k, v, kwargs


def reference_call(q, k, v, kwargs, upcast=True, dropout_mask=None, dropout_p=0.0):
    """reference.attention with fastattn.attention's keyword arguments; the truth when given float64."""
    left, right = kwargs.get("window") or (-1, -1)
    if kwargs.get("causal"):
        right = 0 if right < 0 else min(right, 0)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool and q.dtype == torch.float64:
        mask = mask.double()
    return reference.attention(
        q, k, v, mask, kwargs.get("key_padding_mask"), kwargs.get("alibi_slopes"), kwargs.get("scale"),
        k.shape[2] - q.shape[2], left, right, dropout_mask, dropout_p, upcast=upcast,
    )  # fmt: skip


def truth_and_baseline(q, k, v, kwargs):
    truth = reference_call(q.double(), k.double(), v.double(), kwargs)
    return truth, reference_call(q, k, v, kwargs, upcast=False)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(backend_device, case, dtype):
    name, device = backend_device
    skip_unsupported(name, dtype)
    q, k, v, kwargs = make_inputs(case, dtype, device)
    with fastattn.record() as calls:
        out, lse = fastattn.attention(q, k, v, return_lse=True, **kwargs)
    assert [c.backend for c in calls] == [name]
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == reference.compute_dtype(dtype)
    (truth_out, truth_lse), (base_out, base_lse) = truth_and_baseline(q, k, v, kwargs)
    assert_error_ratio(out, truth_out, base_out)
    assert_error_ratio(lse, truth_lse, base_lse, name="lse", extra_ulps=LSE_EXTRA_ULPS)


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5], CASES[7]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(backend_device, case, dtype):
    """Gradients of q, k and v. The kernels have no backward yet: it runs the reference (and says so)."""
    name, device = backend_device
    q, k, v, kwargs = make_inputs(case, dtype, device)
    grad = torch.randn(*q.shape[:3], v.shape[-1], device=device).to(dtype)

    def grads(fn, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        return torch.autograd.grad(fn(*tensors), tensors, grad.to(tensors[0].dtype))

    truth = grads(lambda *t: reference_call(*t, kwargs)[0], [t.double() for t in (q, k, v)])
    baseline = grads(lambda *t: reference_call(*t, kwargs, upcast=False)[0], (q, k, v))
    with fastattn.backend(name, "reference"):
        ours = grads(lambda *t: fastattn.attention(*t, **kwargs), (q, k, v))
    for arg, mine, true, base in zip("qkv", ours, truth, baseline):
        assert mine.dtype == dtype
        assert_error_ratio(mine, true, base, ratio=GRADIENT_RATIO, name=f"grad {arg}")


@pytest.mark.parametrize("threads", [1, 64])
def test_cpu_backward_schemes(threads, set_threads):
    """The C++ backward fuses dQ into the dK/dV pass when (batch x kv heads) tasks are plenty for the threads
    (1 thread here) and runs two passes otherwise (64): both against the float64 truth."""
    case = Case(batch=2, heads=4, kv_heads=2, seq_q=70, seq_k=90, head_dim=40, causal=True, mask="bool")
    q, k, v, kwargs = make_inputs(case, torch.float32, torch.device("cpu"))
    grad = torch.randn(*q.shape[:3], v.shape[-1])

    def grads(fn, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        return torch.autograd.grad(fn(*tensors), tensors, grad.to(tensors[0].dtype))

    set_threads(threads)
    with fastattn.backend("cpu"):
        ours = grads(lambda *t: fastattn.attention(*t, **kwargs), (q, k, v))
    truth = grads(lambda *t: reference_call(*t, kwargs)[0], [t.double() for t in (q, k, v)])
    baseline = grads(lambda *t: reference_call(*t, kwargs, upcast=False)[0], (q, k, v))
    for arg, mine, true, base in zip("qkv", ours, truth, baseline):
        assert_error_ratio(mine, true, base, ratio=GRADIENT_RATIO, name=f"grad {arg}")


def test_fully_masked_queries_give_zeros(backend_device):
    """A query that sees no key (bool mask all False, or before the causal diagonal) gets out 0, lse -inf
    and zero gradients, never NaN."""
    name, device = backend_device
    q, k, v = (torch.randn(1, 2, s, 16, device=device, requires_grad=True) for s in (5, 3, 3))
    keep = torch.ones(5, 3, dtype=torch.bool, device=device)
    keep[1] = False  # query 1 sees nothing; with causal (seq_q 5 > seq_k 3) queries 0 and 1 see nothing
    with fastattn.backend(name, "reference"):
        out, lse = fastattn.attention(q, k, v, attn_mask=keep, causal=True, return_lse=True)
        out.sum().backward()
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_forward_is_deterministic(backend_device):
    _, device = backend_device
    q, k, v, kwargs = make_inputs(CASES[4], torch.float32, device)
    first = fastattn.attention(q, k, v, **kwargs)
    assert torch.equal(first, fastattn.attention(q, k, v, **kwargs))


def test_gradcheck_reference():
    """float64 gradcheck of the op (mask, padding, ALiBi, window, GQA) through its registered autograd."""
    case = Case(batch=1, heads=2, kv_heads=1, seq_q=4, seq_k=5, head_dim=3, mask="float", key_padding=False,
                alibi=True, window=(2, 1))  # fmt: skip
    q, k, v, kwargs = make_inputs(case, torch.float64, torch.device("cpu"))
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastattn.backend("reference"):
        assert torch.autograd.gradcheck(lambda *t: fastattn.attention(*t, **kwargs), inputs)


# ---------------------------------------------------------------------------------------------------------
# Dropout: every backend draws the mask of reference.attention_dropout_mask from the op's seed.
# ---------------------------------------------------------------------------------------------------------

DROPOUT_CASES = [CASES[2], CASES[3], CASES[6]]  # GQA + causal; MQA + bool mask; window + alibi


def dropout_call(q, k, v, kwargs, p, seed):
    """The op itself, with an explicit dropout seed."""
    left, right = kwargs.get("window") or (-1, -1)
    if kwargs.get("causal"):
        right = 0 if right < 0 else min(right, 0)
    scale = q.shape[-1] ** -0.5
    out, _ = fastattn.ops.attention.attention_op(
        q, k, v, kwargs.get("attn_mask"), kwargs.get("key_padding_mask"), kwargs.get("alibi_slopes"), scale,
        k.shape[2] - q.shape[2], left, right, p, torch.tensor([seed]),
    )  # fmt: skip
    return out


def test_philox_matches_the_published_test_vectors():
    """Random123's known answers for Philox4x32-10 (kat_vectors): the generator every backend shares."""
    words = lambda *c: [torch.tensor([x]) for x in c]  # noqa: E731
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((2**32 - 1,) * 4, 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for counter, key, expected in cases:
        assert [int(w) for w in reference.philox(*words(*counter), key)] == list(expected)


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_the_reference_mask(backend_device, case, dtype):
    """Forward and gradients with dropout against the reference given the Philox mask of the same seed."""
    name, device = backend_device
    skip_unsupported(name, dtype)
    p, seed = 0.3, 0x1234_5678_9ABC
    q, k, v, kwargs = make_inputs(case, dtype, device)
    keep = reference.attention_dropout_mask(seed, p, (*q.shape[:3], k.shape[2]), device)
    grad = torch.randn(*q.shape[:3], v.shape[-1], device=device).to(dtype)

    def run(fn, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = fn(*tensors)
        return (out, *torch.autograd.grad(out, tensors, grad.to(out.dtype)))

    truth = run(lambda *t: reference_call(*t, kwargs, dropout_mask=keep, dropout_p=p)[0],
                [t.double() for t in (q, k, v)])  # fmt: skip
    baseline = run(lambda *t: reference_call(*t, kwargs, upcast=False, dropout_mask=keep, dropout_p=p)[0], (q, k, v))
    with fastattn.record() as calls:
        ours = run(lambda *t: dropout_call(*t, kwargs, p, seed), (q, k, v))
    assert {c.backend for c in calls} == {name}
    for what, mine, true, base in zip(("out", "grad q", "grad k", "grad v"), ours, truth, baseline):
        ratio = GRADIENT_RATIO if what != "out" else 2.0
        assert_error_ratio(mine, true, base, ratio=ratio, name=what)


def test_dropout_keeps_the_expected_fraction_and_replays(backend_device):
    _, device = backend_device
    q, k = torch.randn(2, 4, 64, 16, device=device), torch.randn(2, 4, 64, 16, device=device)
    v = torch.eye(64, device=device).expand(2, 4, 64, 64)  # out = the dropped-out probabilities themselves
    torch.manual_seed(7)
    probs = fastattn.attention(q, k, v, dropout_p=0.3)
    kept = (probs > 0).double().mean().item()
    assert abs(kept - 0.7) < 0.01, kept  # 32768 draws: the standard deviation is 0.0025
    for key_word in range(4):  # each of Philox's four words, which serve keys j % 4
        assert abs((probs[..., key_word::4] > 0).double().mean().item() - 0.7) < 0.02
    full = fastattn.attention(q, k, v)
    torch.testing.assert_close(probs[probs > 0], full[probs > 0] / 0.7)  # kept entries are rescaled
    torch.manual_seed(7)
    assert torch.equal(probs, fastattn.attention(q, k, v, dropout_p=0.3))  # reproducible under manual_seed
    assert not torch.equal(probs, fastattn.attention(q, k, v, dropout_p=0.3))  # a new draw: another mask


def test_dropout_gradient_replays_the_mask(backend_device):
    name, device = backend_device
    skip_unsupported(name, torch.float64)  # gradcheck needs float64
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3))

    def f(*tensors):
        torch.manual_seed(3)
        return fastattn.attention(*tensors, dropout_p=0.4)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)  # fast: one random direction per input


# ---------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention: a drop-in for torch's.
# ---------------------------------------------------------------------------------------------------------

SDPA_CASES = [
    dict(shape=(2, 3, 7, 16), kv=(2, 3, 9, 16)),
    dict(shape=(2, 3, 7, 16), kv=(2, 3, 9, 16), is_causal=True),
    dict(shape=(2, 3, 9, 16), kv=(2, 3, 5, 16), v=(2, 3, 5, 8), is_causal=True),
    dict(shape=(4, 7, 16), kv=(4, 9, 16), mask=(7, 9)),
    dict(shape=(4, 7, 16), kv=(4, 9, 16), mask=(4, 7, 9), float_mask=True, scale=0.3),
    dict(shape=(2, 2, 4, 5, 8), kv=(2, 2, 2, 6, 8), enable_gqa=True, mask=(2, 1, 1, 6)),
    dict(shape=(2, 4, 5, 8), kv=(2, 1, 6, 8), enable_gqa=True, is_causal=True),
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_sdpa_matches_torch(case):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(case["shape"], generator=g, dtype=torch.float64)
    k = torch.randn(case["kv"], generator=g, dtype=torch.float64)
    v = torch.randn(case.get("v", case["kv"]), generator=g, dtype=torch.float64)
    kwargs = {key: case[key] for key in ("is_causal", "scale", "enable_gqa") if key in case}
    if "mask" in case:
        mask = torch.rand(case["mask"], generator=g)
        kwargs["attn_mask"] = mask.double() if case.get("float_mask") else mask > 0.2
    ours = fastattn.scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    assert_close(ours, theirs, atol=1e-12)


def test_sdpa_errors_like_torch():
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fastattn.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="attn_mask must be None when is_causal=True"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True)


# ---------------------------------------------------------------------------------------------------------
# The op: opcheck, torch.compile, bad input.
# ---------------------------------------------------------------------------------------------------------


def test_opcheck(backend_device):
    name, device = backend_device
    case = replace(CASES[4], seq_q=5, seq_k=9)
    q, k, v, kwargs = make_inputs(case, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = kwargs["attn_mask"]
    args = (q, k, v, mask, kwargs["key_padding_mask"], None, 0.25, 4, -1, 0, 0.3, torch.tensor([5]))
    with fastattn.backend(name, "reference"):
        torch.library.opcheck(torch.ops.fastattn.attention.default, args)


def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, kwargs = make_inputs(CASES[4], torch.float32, torch.device("cpu"))
    q.requires_grad_()
    f = lambda t: fastattn.attention(t * 2, k, v, **kwargs).square()  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q), f(q))
    (g1,) = torch.autograd.grad(compiled(q).sum(), q)
    (g2,) = torch.autograd.grad(f(q).sum(), q)
    torch.testing.assert_close(g1, g2)

    dropped = lambda t: fastattn.attention(t, k, v, **kwargs, dropout_p=0.5)  # noqa: E731
    compiled = torch.compile(dropped, fullgraph=True, backend="aot_eager")  # the seed draw traces: no .item()
    torch.manual_seed(1)
    out = compiled(q)
    torch.manual_seed(1)
    torch.testing.assert_close(out, dropped(q))  # the compiled graph draws the eager seed


def _qkv(hq=4, hkv=4, d=8, dtype=torch.float32):
    return torch.randn(2, hq, 5, d, dtype=dtype), torch.randn(2, hkv, 6, d, dtype=dtype), torch.randn(2, hkv, 6, d)


BAD = [
    (lambda q, k, v: fastattn.attention(q, k[:1], v[:1]), ValueError, "batch sizes differ"),
    (lambda q, k, v: fastattn.attention(q, k[:, :3], v[:, :3]), ValueError, "multiple of the key/value heads"),
    (lambda q, k, v: fastattn.attention(q, k[..., :4], v), ValueError, "head dims differ"),
    (lambda q, k, v: fastattn.attention(q, k, v.double()), TypeError, "must share a dtype"),
    (lambda q, k, v: fastattn.attention(q.int(), k, v), TypeError, "q must be float16"),
    (lambda q, k, v: fastattn.attention(q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: fastattn.attention(q, k.to("meta"), v), ValueError, "one device"),
    (lambda q, k, v: fastattn.attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError,
     "does not broadcast"),
    (lambda q, k, v: fastattn.attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int64)), TypeError,
     "attn_mask must be bool"),
    (lambda q, k, v: fastattn.attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
     "key_padding_mask must be"),
    (lambda q, k, v: fastattn.attention(q, k, v, key_padding_mask=torch.ones(2, 6)), TypeError, "bool Tensor"),
    (lambda q, k, v: fastattn.attention(q, k, v, alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must be"),
    (lambda q, k, v: fastattn.attention(q, k, v, dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (lambda q, k, v: fastattn.attention(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
    (lambda q, k, v: fastattn.attention(q, k, v, window=(2,)), TypeError, "window must be"),
    (lambda q, k, v: fastattn.attention(q, k, v, window=(-2, 0)), ValueError, "window bounds"),
    (lambda q, k, v: fastattn.attention(*_qkv(d=264)), ValueError, "above the supported 256"),
    (lambda q, k, v: fastattn.attention(q, k, v, attn_mask=torch.zeros(5, 6, requires_grad=True)), ValueError,
     "attn_mask are not supported"),
]


@pytest.mark.parametrize("call,error,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call(*_qkv())


def test_gradient_through_lse(backend_device):
    """A loss that uses lse (e.g. a z-loss) gets its gradient too, not only the one through out."""
    name, device = backend_device
    q, k, v, kwargs = make_inputs(CASES[4], torch.float64, device)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with fastattn.backend(name, "reference"):
        out, lse = fastattn.attention(*inputs, return_lse=True, **kwargs)
        ours = torch.autograd.grad(out.sum() + lse.square().sum(), inputs)
    out, lse = reference_call(*inputs, kwargs)
    truth = torch.autograd.grad(out.sum() + lse.square().sum(), inputs)
    for arg, mine, true in zip("qkv", ours, truth):
        assert_close(mine, true, atol=1e-10, name=f"grad {arg}")
