"""fastattn.attention_with_kvcache on every backend: the in-place append, per-batch positions, and the
decoding kernels (Triton's split-KV kernel, the C++ CPU path) against float64 per-sequence attention."""

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.testing import LSE_EXTRA_ULPS, assert_close, assert_error_ratio

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_cache(batch, heads, kv_heads, n_q, max_seq, dim, dim_v, dtype, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return rand(batch, heads, n_q, dim), rand(batch, kv_heads, max_seq, dim), rand(batch, kv_heads, max_seq, dim_v)


@pytest.mark.parametrize("n_new", [0, 1, 3], ids=lambda n: f"new{n}")
@pytest.mark.parametrize("features", ["plain", "window-alibi", "noncausal"])
def test_appends_in_place_and_attends_per_sequence(backend_device, n_new, features):
    """Against attention over each sequence the caches hold after appending, one batch at a time."""
    name, device = backend_device
    batch, heads, kv_heads, max_seq, dim, n_q = 3, 4, 2, 40, 16, max(n_new, 2)
    q, k_cache, v_cache = make_cache(batch, heads, kv_heads, n_q, max_seq, dim, dim, torch.float32, device)
    g = torch.Generator().manual_seed(3)
    k_new, v_new = (torch.randn(batch, kv_heads, n_new, dim, generator=g).to(device) for _ in range(2))
    if not n_new:
        k_new = v_new = None
    cache_seqlens = torch.tensor([5, 0 if n_new else 2, 37 - n_new], device=device)
    kwargs = dict(causal=features != "noncausal")
    if features == "window-alibi":
        kwargs.update(window=(6, 0), alibi_slopes=torch.rand(heads, generator=g).to(device))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    with fastattn.record() as calls:
        out, lse = fastattn.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens, k_new, v_new, return_lse=True, **kwargs
        )
    assert [c.backend for c in calls] == [name]
    for b in range(batch):
        start, length = int(cache_seqlens[b]), int(cache_seqlens[b]) + n_new
        if n_new:
            expected_k[b, :, start:length], expected_v[b, :, start:length] = k_new[b], v_new[b]
        torch.testing.assert_close(k_cache[b], expected_k[b], rtol=0, atol=0)  # appended in place, nothing else
        torch.testing.assert_close(v_cache[b], expected_v[b], rtol=0, atol=0)
        keys, values = expected_k[b : b + 1, :, :length].double(), expected_v[b : b + 1, :, :length].double()
        truth_out, truth_lse = reference.attention(
            q[b : b + 1].double(), keys, values, None, None, kwargs.get("alibi_slopes"), None, length - n_q,
            *(kwargs.get("window") or (-1, -1))[:1], 0 if kwargs["causal"] else -1,
        )  # fmt: skip
        assert_close(out[b : b + 1], truth_out, atol=1e-5, name=f"out of batch {b}")
        assert_close(lse[b : b + 1], truth_lse, atol=1e-5, name=f"lse of batch {b}")


# (heads, kv_heads, n queries, max_seq, head dim, head dim v, lengths, window, alibi)
DECODE_CASES = [
    (8, 1, 1, 300, 72, 72, [300, 1], None, False),  # MQA decoding, a long and a 1-key sequence
    (8, 2, 16, 150, 40, 24, [150, 16, 77], (20, 0), True),  # GQA, 16 queries: 64 rows a program
    (6, 6, 3, 90, 64, 64, [0, 45], None, True),  # an empty cache: out 0, lse -inf
    # every sequence of one length (batched generation): the CPU runs plain attention, no mask
    (8, 2, 1, 64, 40, 40, [33, 33], None, False),  # one query: each kv head's query group folded
    (4, 4, 1, 64, 40, 40, [20, 20], (5, 0), False),  # a left window tells the positions apart: not folded
    (8, 2, 4, 64, 72, 72, [50, 50, 50], (7, 0), True),  # 4 queries, window and ALiBi
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"h{c[0]}kv{c[1]}n{c[2]}s{c[3]}d{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoding_error_ratio(backend_device, case, dtype):
    """Causal decoding against the float64 reference, the error-ratio rule against PyTorch in the same dtype."""
    name, device = backend_device
    if dtype == torch.float64 and name == "cuda":
        pytest.skip("the cuda backend runs float16/bfloat16/float32 (float64 goes to the next backend)")
    heads, kv_heads, n_q, max_seq, dim, dim_v, lengths, window, alibi = case
    batch = len(lengths)
    q, k_cache, v_cache = make_cache(batch, heads, kv_heads, n_q, max_seq, dim, dim_v, dtype, device)
    lengths = torch.tensor(lengths, device=device)
    slopes = torch.rand(batch, heads, device=device) if alibi else None
    with fastattn.record() as calls:
        out, lse = fastattn.attention_with_kvcache(
            q, k_cache, v_cache, lengths, alibi_slopes=slopes, window=window, return_lse=True
        )
    assert [c.backend for c in calls] == [name]
    left = window[0] if window else -1
    truth = reference.attention_kvcache(q.double(), k_cache.double(), v_cache.double(), lengths, slopes, None, left, 0)
    baseline = reference.attention_kvcache(q, k_cache, v_cache, lengths, slopes, None, left, 0, upcast=False)
    assert_error_ratio(out, truth[0], baseline[0])
    assert_error_ratio(lse, truth[1], baseline[1].to(truth[1].dtype), name="lse", extra_ulps=LSE_EXTRA_ULPS)
    empty = lengths == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty])) and torch.isneginf(lse[empty]).all()


@pytest.mark.parametrize("split_size", [16, 48, 512])
def test_split_kv_merges_any_split(split_size):
    """Triton's split-KV kernel gives the same answer for any number of splits (one split: no merging)."""
    from fastattn.triton_kernels.kvcache import attention_kvcache  # noqa: PLC0415

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k_cache, v_cache = make_cache(2, 4, 2, 2, 100, 32, 32, torch.float64, device)
    lengths = torch.tensor([100, 33], device=device)
    slopes = torch.rand(2, 4, device=device)
    out, lse = attention_kvcache(q, k_cache, v_cache, lengths, slopes, 0.2, 30, 0, split_size)
    truth_out, truth_lse = reference.attention_kvcache(q, k_cache, v_cache, lengths, slopes, 0.2, 30, 0)
    assert_close(out, truth_out, atol=1e-12)
    assert_close(lse, truth_lse, atol=1e-12, name="lse")


def test_refuses_overflow():
    q, cache = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    new = torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match=r"cache_seqlens \+ n_new must lie in \[0, 4\]"):
        fastattn.attention_with_kvcache(q, cache, cache.clone(), torch.tensor([3]), new, new)


def test_opcheck():
    q, k_cache, v_cache = make_cache(2, 4, 2, 2, 20, 16, 16, torch.float32, torch.device("cpu"))
    args = (q, k_cache, v_cache, torch.tensor([20, 7]), torch.rand(2, 4), 0.25, 5, 0)
    torch.library.opcheck(torch.ops.fastattn.attention_kvcache.default, args)
